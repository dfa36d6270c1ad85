"""Arg-max / arg-min over the last axis by halving: element-wise compares and
selects that vectorise, where XLA:CPU's variadic row reduction does not (6.3
vs 1.4 ms on (32768, 64) in ``accel.kmeans``; the argmax in OMP's inner loop
likewise). Same answer as ``jnp.argmax`` / ``jnp.argmin``, first index on ties
and NaN counted as the extreme, with the extreme value itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def argmax(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index, value) of the maximum over the last axis of ``a`` (any leading
  shape; the axis is padded to a power of two with -inf)."""
  k = a.shape[-1]
  if k == 0:
    raise ValueError("argmax over an empty axis")
  p = 1 << (k - 1).bit_length()
  if p > k:
    pad = [(0, 0)] * (a.ndim - 1) + [(0, p - k)]
    a = jnp.pad(a, pad, constant_values=-jnp.inf)
  idx = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), a.shape)
  while a.shape[-1] > 1:
    h = a.shape[-1] // 2
    al, ar, il, ir = a[..., :h], a[..., h:], idx[..., :h], idx[..., h:]
    # the left index is not always the smaller one after the first halving
    keep = (al > ar) | ((al == ar) & (il < ir)) | (jnp.isnan(al) & ~(jnp.isnan(ar) & (ir < il)))
    a, idx = jnp.where(keep, al, ar), jnp.where(keep, il, ir)
  return idx[..., 0], a[..., 0]


def argmin(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index, value) of the minimum over the last axis (``argmax`` of -a)."""
  i, v = argmax(-a)
  return i, -v
