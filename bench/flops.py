"""Model FLOPs counted from a function's jaxpr: 2 x (output elements) x
(contracted elements) for every ``dot_general``, 2 x output x (kernel window x
input features per group) for every ``conv_general_dilated``. Element-wise work
(softmax, norms, optimiser updates) is not counted: the roofline judges a path
by the matmul work it must do, the convention of model-FLOP utilisation
(after dead-code elimination, as XLA compiles it).
"""

from __future__ import annotations

from typing import Any, Callable

from jax.extend import core as jex_core

from core import jaxpr_ops


def jaxpr_flops(jaxpr: jex_core.Jaxpr) -> float:
  """Matmul/conv FLOPs of a (closed or open) jaxpr (``core.jaxpr_ops``: scans
  times their length, a cond's costliest branch, while loops refused)."""
  return sum(t * jaxpr_ops.op_flops(eqn) for eqn, t, _ in jaxpr_ops.linear_eqns(jaxpr))


def flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
  """Matmul/conv FLOPs of one call ``fn(*args, **kwargs)`` (traced, not run)."""
  return jaxpr_flops(jaxpr_ops.jaxpr_of(fn, *args, **kwargs))
