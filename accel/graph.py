"""The linear operations of any JAX model, found in its jaxpr: every
``dot_general`` and ``conv_general_dilated`` that ``apply(params, x)`` runs,
with a stable name, its shapes, its multiplies, and whether one operand is a
stored weight (it depends on ``params`` alone) or both are activations
(attention's Q.K^T and P.V). This is what a datapath replaces and what its
multiply accounting counts (issue 25's first step; ``accel.program``'s hand
op lists cover two model types).

Names are ``<order>_<dot|conv>_<lhs shape>_<rhs shape>`` (order: the op's place in the
traced program, nested calls flattened): the same for the same model code
and input shape, so configurations and codebooks can refer to them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

from bench import flops as flops_lib

LINEAR = flops_lib.LINEAR


@dataclasses.dataclass(frozen=True)
class LinearOp:
  name: str
  primitive: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  multiplies: int           # multiply-accumulates per call, times how often it runs
  weight: bool              # an operand depends on params alone (else activation x activation)


def _shape(s) -> str:
  return "x".join(map(str, s)) or "scalar"


def _walk(jaxpr, static_in: list[bool], times: int, out: list) -> list[bool]:
  """Appends (eqn, times, weight) for linear eqns; returns which outputs depend
  on params alone. ``static_in``: per invar, whether it does."""
  static = {v: s for v, s in zip(jaxpr.invars, static_in)}
  for v in jaxpr.constvars:
    static[v] = True
  is_static = lambda a: isinstance(a, jex_core.Literal) or static.get(a, False)
  for eqn in jaxpr.eqns:
    ins = [is_static(a) for a in eqn.invars]
    name = eqn.primitive.name
    if name in LINEAR:
      out.append((eqn, times, ins[0] or ins[1]))
      res = [all(ins)] * len(eqn.outvars)
    elif name == "while":
      raise ValueError("a while loop's trip count is unknown when traced: its linear ops "
                       "cannot be counted (use a scan or a Python loop)")
    elif name == "scan":
      body = eqn.params["jaxpr"]
      res = _walk(body.jaxpr, ins, times * eqn.params["length"], out)
      res = res + [False] * (len(eqn.outvars) - len(res))
    else:
      subs = [v for v in eqn.params.values()
              if isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
      if len(subs) == 1:                  # pjit, custom_vjp/jvp calls, remat: one body
        sub = getattr(subs[0], "jaxpr", subs[0])
        if len(sub.invars) == len(ins):
          res = _walk(sub, ins, times, out)
        else:
          _walk(sub, [False] * len(sub.invars), times, out)
          res = [all(ins)] * len(eqn.outvars)
      elif name == "cond":
        raise ValueError("a cond's branches may run different linear ops: not supported")
      else:
        res = [all(ins)] * len(eqn.outvars)
    for v, s in zip(eqn.outvars, res):
      static[v] = s
  return [is_static(v) for v in jaxpr.outvars]


def linear_ops(apply: Callable[[Any, Any], Any], params: Any, x: Any) -> tuple[LinearOp, ...]:
  """Every linear op of ``apply(params, x)`` in program order (traced, not
  run; dead code removed, as the compiler would)."""
  n_params = len(jax.tree.leaves(params))
  jaxpr = flops_lib.jaxpr_of(apply, params, x)
  found: list = []
  _walk(jaxpr, [True] * n_params + [False] * (len(jaxpr.invars) - n_params), 1, found)
  ops = []
  for i, (eqn, times, weight) in enumerate(found):
    lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars[:2])
    prim = "dot" if eqn.primitive.name == "dot_general" else "conv"
    ops.append(LinearOp(f"{i:03d}_{prim}_{_shape(lhs)}_{_shape(rhs)}", eqn.primitive.name,
                        lhs, rhs, tuple(eqn.outvars[0].aval.shape),
                        int(round(times * flops_lib.op_flops(eqn) / 2)), weight))
  return tuple(ops)


def multiplies(ops: tuple[LinearOp, ...]) -> dict[str, int]:
  """Total multiplies: all, those against stored weights, activation x activation."""
  w = sum(o.multiplies for o in ops if o.weight)
  a = sum(o.multiplies for o in ops if not o.weight)
  return {"total": w + a, "weight": w, "activation": a}
