"""Model FLOPs counted from a function's jaxpr: 2 x (output elements) x
(contracted elements) for every ``dot_general``, 2 x output x (kernel window x
input features per group) for every ``conv_general_dilated``. Element-wise work
(softmax, norms, optimiser updates) is not counted: the roofline judges a path
by the matmul work it must do, the convention of model-FLOP utilisation.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
from jax.extend import core as jex_core
import numpy as np


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


LINEAR = ("dot_general", "conv_general_dilated")


def op_flops(eqn) -> float:
  """FLOPs of one ``dot_general`` or ``conv_general_dilated`` equation."""
  return _dot(eqn) if eqn.primitive.name == "dot_general" else _conv(eqn)


def linear_eqns(jaxpr: jex_core.Jaxpr, times: float = 1.0) -> Iterator[tuple[Any, float]]:
  """Every matmul/conv equation of a (closed or open) jaxpr with how many times
  one call runs it, recursing into sub-jaxprs: a ``scan`` runs its body
  ``length`` times, a ``cond`` is counted by its costliest branch. A ``while``
  loop's trip count is unknown when traced, so it is refused: count one
  iteration's function instead."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in LINEAR:
      yield eqn, times
    elif name == "while":
      raise ValueError("jaxpr_flops cannot count a while loop (unknown trip count); "
                       "count the loop body's function and multiply by the iterations run")
    elif name == "scan":
      yield from linear_eqns(eqn.params["jaxpr"], times * eqn.params["length"])
    elif name == "cond":
      yield from linear_eqns(max(eqn.params["branches"], key=jaxpr_flops), times)
    else:
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
            yield from linear_eqns(sub, times)


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> float:
  """Matmul/conv FLOPs of a (closed or open) jaxpr (``linear_eqns``)."""
  return sum(t * op_flops(eqn) for eqn, t in linear_eqns(jaxpr))


def jaxpr_of(fn: Callable, *args: Any, **kwargs: Any) -> jex_core.Jaxpr:
  """``fn``'s jaxpr with dead code removed, as the compiler would: a custom
  VJP's backward computes every cotangent, and an input gradient drops the
  kernel's (``core.models.cnn``'s convolution; without this, PGD's count
  included weight-gradient convolutions XLA never runs)."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  # JAX's own DCE pass (internal: jax.extend exposes no DCE; revisit on upgrades)
  from jax._src.interpreters import partial_eval as pe
  # instantiate: every input kept, so positions still match the arguments
  return pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)[0]


def flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """Matmul/conv FLOPs of one call ``fn(*args, **kwargs)`` (traced, not run)."""
  return jaxpr_flops(jaxpr_of(fn, *args, **kwargs))
