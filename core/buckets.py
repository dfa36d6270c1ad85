"""Shape bucketing for jitted functions called on row counts that vary (the
images an attack fooled, a split's remainder): rows are zero-padded to one of
a few sizes, so a run compiles a handful of shapes instead of one per count.
For row-wise functions only (a row's output depends on that row alone)."""

from __future__ import annotations

import numpy as np


def bucket(n: int, cap: int | None = None, floor: int = 16) -> int:
  """The padded size for ``n`` rows: the next power of two, at least
  ``floor``, at most ``cap`` (callers split longer inputs into ``cap`` rows)."""
  if n < 0:
    raise ValueError(f"row count must be >= 0, got {n}")
  size = max(floor, 1 << max(n - 1, 0).bit_length())
  return size if cap is None else min(cap, size)


def pad_rows(a, size: int) -> np.ndarray:
  """``a`` (N, ...) with zero rows appended up to ``size`` rows, as NumPy."""
  a = np.asarray(a)
  if len(a) > size:
    raise ValueError(f"{len(a)} rows do not fit in {size}")
  return np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])
