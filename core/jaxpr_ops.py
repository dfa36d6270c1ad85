"""The matmuls and convolutions a JAX function runs, read from its jaxpr: the
one walker that ``bench.flops`` counts FLOPs with and ``accel.graph`` names
and classifies a model's linear ops with.

Each ``dot_general`` / ``conv_general_dilated`` comes with how many times one
call runs it (a ``scan`` runs its body ``length`` times; a ``cond`` is counted
by its costliest branch; a ``while`` loop's trip count is unknown when traced,
so it is refused) and whether one operand depends only on the inputs marked
static (a model's params: a stored weight, against attention's activation x
activation products), followed through scans and nested calls.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core

LINEAR = ("dot_general", "conv_general_dilated")


def _dot(eqn) -> float:
  (lc, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in lc]))


def _conv(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  # rhs_spec = (out feature dim, in feature dim, spatial...): per output element,
  # in-features-per-group x window multiply-adds.
  o, i, *sp = dn.rhs_spec
  return 2.0 * float(np.prod(out)) * rhs[i] * float(np.prod([rhs[d] for d in sp]))


def op_flops(eqn) -> float:
  """FLOPs of one ``dot_general`` (2 x output x contracted elements) or
  ``conv_general_dilated`` (2 x output x window x input features per group)."""
  return _dot(eqn) if eqn.primitive.name == "dot_general" else _conv(eqn)


def closed_jaxpr_of(fn: Callable, *args: Any, **kwargs: Any) -> jex_core.ClosedJaxpr:
  """``fn``'s jaxpr with dead code removed, as the compiler would: a custom
  VJP's backward computes every cotangent, and an input gradient drops the
  kernel's (``core.models.cnn``'s convolution; without this, PGD's count
  included weight-gradient convolutions XLA never runs). Every input is kept,
  so positions still match the arguments; constants are kept with it."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  # JAX's own DCE pass (internal: jax.extend exposes no DCE; revisit on upgrades)
  from jax._src.interpreters import partial_eval as pe
  jaxpr = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)[0]
  return jex_core.ClosedJaxpr(jaxpr, closed.consts)


def jaxpr_of(fn: Callable, *args: Any, **kwargs: Any) -> jex_core.Jaxpr:
  """``closed_jaxpr_of`` without its constants (they count as static inputs)."""
  return closed_jaxpr_of(fn, *args, **kwargs).jaxpr


def sub_jaxprs(eqn) -> list:
  """The jaxprs nested in an equation's params (a call's body, a scan's body,
  a cond's branches)."""
  return [s for v in eqn.params.values() for s in (v if isinstance(v, (tuple, list)) else (v,))
          if isinstance(s, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]


def has_linear(jaxpr) -> bool:
  """Whether a jaxpr runs a linear op anywhere, nested bodies included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  return any(e.primitive.name in LINEAR or any(has_linear(s) for s in sub_jaxprs(e))
             for e in jaxpr.eqns)


Walk = Generator[tuple[Any, float, bool], None, list[bool]]


def linear_eqns(jaxpr, static_in: Sequence[bool] | None = None, times: float = 1.0) -> Walk:
  """Yields (eqn, times run per call, (lhs static, rhs static)) for every linear
  equation of a (closed or open) jaxpr; an operand is static when it depends
  only on invars marked True in ``static_in`` (default: none): a stored
  weight. Returns, to a ``yield from``, which outvars depend only on static
  inputs."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  static = dict(zip(jaxpr.invars, static_in or [False] * len(jaxpr.invars)))
  static.update((v, True) for v in jaxpr.constvars)
  is_static = lambda a: isinstance(a, jex_core.Literal) or static.get(a, False)
  for eqn in jaxpr.eqns:
    ins = [is_static(a) for a in eqn.invars]
    name = eqn.primitive.name
    res = None
    if name in LINEAR:
      yield eqn, times, (ins[0], ins[1])
    elif name == "while":
      raise ValueError("cannot count a while loop's linear ops (unknown trip count); count "
                       "the loop body's function and multiply by the iterations run")
    elif name == "scan":     # invars: consts, carry, xs, as the body's
      res = yield from linear_eqns(eqn.params["jaxpr"], ins, times * eqn.params["length"])
    elif name == "cond":     # invars: the branch index, then the branches' operands
      costliest = max(eqn.params["branches"], key=lambda b: sum(
          t * op_flops(e) for e, t, _ in linear_eqns(b)))
      res = yield from linear_eqns(costliest, ins[1:], times)
    else:                    # pjit, custom_vjp/jvp calls, remat, shard_map: nested bodies
      subs = sub_jaxprs(eqn)
      for sub in subs:
        body = getattr(sub, "jaxpr", sub)
        mapped = len(subs) == 1 and len(body.invars) == len(ins)
        out = yield from linear_eqns(sub, ins if mapped else None, times)
        if mapped:
          res = out
    res = (res or []) + [all(ins)] * (len(eqn.outvars) - len(res or []))
    for v, s in zip(eqn.outvars, res):
      static[v] = s
  return [is_static(v) for v in jaxpr.outvars]
