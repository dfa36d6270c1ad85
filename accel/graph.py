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

from core import jaxpr_ops


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


def linear_ops(apply: Callable[[Any, Any], Any], params: Any, x: Any) -> tuple[LinearOp, ...]:
  """Every linear op of ``apply(params, x)`` in program order (traced, not
  run; dead code removed, as the compiler would)."""
  n_params = len(jax.tree.leaves(params))
  jaxpr = jaxpr_ops.jaxpr_of(apply, params, x)
  static_in = [True] * n_params + [False] * (len(jaxpr.invars) - n_params)
  ops = []
  for i, (eqn, times, weight) in enumerate(jaxpr_ops.linear_eqns(jaxpr, static_in)):
    lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars[:2])
    prim = "dot" if eqn.primitive.name == "dot_general" else "conv"
    ops.append(LinearOp(f"{i:03d}_{prim}_{_shape(lhs)}_{_shape(rhs)}", eqn.primitive.name,
                        lhs, rhs, tuple(eqn.outvars[0].aval.shape),
                        int(round(times * jaxpr_ops.op_flops(eqn) / 2)), weight))
  return tuple(ops)


def multiplies(ops: tuple[LinearOp, ...]) -> dict[str, int]:
  """Total multiplies: all, those against stored weights, activation x activation."""
  w = sum(o.multiplies for o in ops if o.weight)
  a = sum(o.multiplies for o in ops if not o.weight)
  return {"total": w + a, "weight": w, "activation": a}
