"""Model FLOPs counted from a function's jaxpr: 2 x (output elements) x
(contracted elements) for every ``dot_general``, 2 x output x (kernel window x
input features per group) for every ``conv_general_dilated``. Element-wise work
(softmax, norms, optimiser updates) is not counted: the roofline judges a path
by the matmul work it must do, the convention of model-FLOP utilisation.
"""

from __future__ import annotations

from typing import Any, Callable

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


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> float:
  """Matmul/conv FLOPs of a (closed or open) jaxpr, recursing into sub-jaxprs;
  a ``scan`` counts its body ``length`` times. A ``while`` loop's trip count is
  unknown when traced, so it is refused: count one iteration's function instead."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot(eqn)
    elif name == "conv_general_dilated":
      total += _conv(eqn)
    elif name == "while":
      raise ValueError("jaxpr_flops cannot count a while loop (unknown trip count); "
                       "count the loop body's function and multiply by the iterations run")
    elif name == "scan":
      total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"])
    elif name == "cond":
      total += max(jaxpr_flops(b) for b in eqn.params["branches"])
    else:
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
            total += jaxpr_flops(sub)
  return total


def flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """Matmul/conv FLOPs of one call ``fn(*args, **kwargs)`` (traced, not run)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
