"""Input checks that hold both eagerly and under ``jax.jit``.

A check on concrete values raises ``ValueError`` at once. Under a trace the
values are unknown until run time, so the same check is staged as a
``jax.debug.callback`` that raises inside the computation: the call then fails
with a ``JaxRuntimeError`` carrying the same message, instead of returning a
silently wrong answer (e.g. a KV-cache write clamped onto its last slot, or an
out-of-range token id gathered as NaN).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def host_value(x: Any) -> np.ndarray | None:
  """``x`` as a NumPy value when it is known on this host; None when traced.
  A replicated array spanning several processes is read from a local shard."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      return None
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def require(ok: Callable[..., bool], message: Callable[..., str], *operands: Any) -> None:
  """Raises ``ValueError(message(*values))`` unless ``ok(*values)``: immediately
  when every operand is concrete, else when the staged computation runs."""
  values = [host_value(x) for x in operands]
  if all(v is not None for v in values):
    if not ok(*values):
      raise ValueError(message(*values))
    return

  def callback(*vals):
    if not ok(*vals):
      raise ValueError(message(*vals))

  jax.debug.callback(callback, *operands)


def check_token_ids(tokens: Any, vocab_size: int, where: str) -> None:
  """Token ids must be integers in [0, vocab_size): ``jnp.take`` would fill
  NaN for ids past the end and wrap negative ones."""
  dtype = np.dtype(tokens.dtype if hasattr(tokens, "dtype") else np.asarray(tokens).dtype)
  if not np.issubdtype(dtype, np.integer):
    raise TypeError(f"{where}: token ids must be integers, got dtype {dtype}")
  if np.size(tokens) == 0:
    return
  host = host_value(tokens)
  if host is not None:
    lo, hi = host.min(), host.max()
  else:
    lo, hi = jax.numpy.min(tokens), jax.numpy.max(tokens)
  require(lambda lo, hi: 0 <= lo and hi < vocab_size,
          lambda lo, hi: f"{where}: token ids must lie in [0, {vocab_size}); got values "
                         f"from {int(lo)} to {int(hi)}", lo, hi)
