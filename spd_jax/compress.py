"""Compressed all-reduce: a sync whose payload is quantised partial sums.

A plain sync is ``psum`` of each device's float32 partial sum. A compressed
sync runs the two halves of a ring all-reduce as explicit collectives on a
smaller payload (the layout of ZeRO++'s quantised gradient reduction):

  1. split the hidden axis into N chunks and encode each (``CODECS``);
  2. ``all_to_all``: device j receives chunk j of every device (reduce-scatter
     without the reduction), decodes the N copies and sums them in float32;
  3. re-encodes its reduced chunk and ``all_gather`` s the N reduced chunks;
  4. every device decodes the same full vector.

Each device sends 2 (N - 1) / N of the encoded vector, as a ring all-reduce
does of the float vector, so the traffic shrinks by the encoding's ratio.
That is ``two_shot``; ``one_shot`` all-gathers every device's encoded partial
sum and each device decodes and sums the N of them (one collective instead of
two, (N - 1) / N * N of the encoded vector per device, no re-encoding: the
low-latency kind, best for small messages and N = 2). An int8 payload carries
its float32 scales bit-cast into the same int8 buffer, so every step is one
collective.

Codecs: ``f32`` (lossless; the decomposition alone), ``bf16`` (round to
bfloat16), ``int8`` (symmetric, one float32 scale per token and chunk: scale =
max|x| / 127 over the chunk's D / N values), ``int4`` (block-wise, as the TP
activation compression of arXiv 2411.09510: symmetric values in [-7, 7], two per
byte, one float32 scale = max|x| / 7 per block of ``INT4_BLOCK`` consecutive
values of a chunk; 0.75 bytes per value at the block of 16, 5.3x under float32).
Rounding error per element is at most half a scale per encoding, so for int8

    |compressed - exact| <= sum_i max|chunk_i| / 254 + max|reduced chunk| / 254

and for int4 the same with blocks for chunks and 14 for 254 (``error_bound``;
one-shot has the first term only). ``emulated_sum``
computes the two-shot values on one device from the stacked partial sums (the
accuracy studies use it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CODECS = ("f32", "bf16", "int8", "int4")
ALGORITHMS = ("two_shot", "one_shot")
_INT8_MAX = 127.0
_INT4_MAX = 7.0
# Values per int4 scale. 16, not the 32 or 128 common on GPUs: the two-shot sync encodes
# chunks of D / N values, 16 for the deep study LM at TP=8 (d=128), and a block must
# not straddle two chunks.
INT4_BLOCK = 16


def check_codec(codec: str) -> None:
  if codec not in CODECS:
    raise ValueError(f"unknown compression codec {codec!r}; choose one of {CODECS}")


def check_algorithm(algorithm: str) -> None:
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown compressed all-reduce algorithm {algorithm!r}; choose one of "
                     f"{ALGORITHMS}")


def payload_bytes_per_element(codec: str, chunk: int) -> float:
  """Bytes on the wire per activation element (int8 adds a float32 scale per chunk)."""
  check_codec(codec)
  if codec == "int4":
    _check_int4_chunk(chunk)
  return {"f32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / chunk,
          "int4": 0.5 + 4.0 / INT4_BLOCK}[codec]


def _check_int4_chunk(chunk: int) -> None:
  if chunk % INT4_BLOCK:
    raise ValueError(f"an int4 sync needs chunks of a multiple of INT4_BLOCK={INT4_BLOCK} "
                     f"values; this payload's chunks have {chunk} (hidden size / TP size)")


def _chunks(x: jax.Array, n: int) -> jax.Array:
  if x.shape[-1] % n:
    raise ValueError(f"hidden size {x.shape[-1]} is not divisible by the {n} devices "
                     "a compressed sync splits it over")
  return x.reshape(*x.shape[:-1], n, x.shape[-1] // n)


def encode(x: jax.Array, codec: str) -> tuple[jax.Array, jax.Array | None]:
  """(payload, scale) of float32 chunks ``x`` (..., C); scale is per chunk (..., 1)."""
  check_codec(codec)
  if codec == "f32":
    return x.astype(jnp.float32), None
  if codec == "bf16":
    return x.astype(jnp.bfloat16), None
  if codec == "int4":  # scale per block: (..., C / INT4_BLOCK, 1)
    _check_int4_chunk(x.shape[-1])
    xb = x.reshape(*x.shape[:-1], -1, INT4_BLOCK)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / _INT4_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(xb / scale), -_INT4_MAX, _INT4_MAX).astype(jnp.int8)
    return q.reshape(x.shape), scale
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(amax > 0, amax / _INT8_MAX, 1.0).astype(jnp.float32)  # all-zero chunk: 0s
  return jnp.clip(jnp.round(x / scale), -_INT8_MAX, _INT8_MAX).astype(jnp.int8), scale


def decode(payload: jax.Array, scale: jax.Array | None) -> jax.Array:
  x = payload.astype(jnp.float32)
  if scale is None:
    return x
  if scale.ndim == x.ndim:  # int8: one scale per chunk (..., 1)
    return x * scale
  xb = x.reshape(*x.shape[:-1], scale.shape[-2], -1)  # int4: per block (..., blocks, 1)
  return (xb * scale).reshape(x.shape)


def pack_nibbles(q: jax.Array) -> jax.Array:
  """int4 values in [-7, 7] (..., C), C even -> bytes (..., C / 2): value 2j in the low
  nibble and 2j + 1 in the high one, each offset by 8."""
  u = (q.astype(jnp.int32) + 8).astype(jnp.uint8)
  return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(b: jax.Array) -> jax.Array:
  """The inverse of ``pack_nibbles`` (int8 values)."""
  lo = (b & 0xF).astype(jnp.int8) - 8
  hi = (b >> 4).astype(jnp.int8) - 8
  return jnp.stack([lo, hi], -1).reshape(*b.shape[:-1], 2 * b.shape[-1])


def _pack(q: jax.Array, s: jax.Array | None) -> jax.Array:
  """One buffer per collective: int8 values (int4: two per byte) with their float32
  scales' bytes appended; bf16 travels bit-cast as uint16 (XLA:CPU would widen a bf16
  collective to float32)."""
  if q.dtype == jnp.bfloat16:
    return jax.lax.bitcast_convert_type(q, jnp.uint16)
  if s is None:
    return q
  if s.ndim == q.ndim:  # int8: (..., 1) scales
    return jnp.concatenate([q, jax.lax.bitcast_convert_type(s[..., 0], jnp.int8)], axis=-1)
  s_bytes = jax.lax.bitcast_convert_type(s[..., 0], jnp.uint8)  # int4: (..., blocks, 4)
  return jnp.concatenate([pack_nibbles(q), s_bytes.reshape(*q.shape[:-1], -1)], axis=-1)


def _unpack(buf: jax.Array, codec: str) -> jax.Array:
  if codec == "bf16":
    return decode(jax.lax.bitcast_convert_type(buf, jnp.bfloat16), None)
  if codec == "int4":  # C / 2 value bytes, then 4 bytes per block of 16: C = buf * 16 / 12
    c = buf.shape[-1] * INT4_BLOCK // (INT4_BLOCK // 2 + 4)
    nb = c // INT4_BLOCK
    s = jax.lax.bitcast_convert_type(buf[..., c // 2:].reshape(*buf.shape[:-1], nb, 4),
                                     jnp.float32)
    return decode(unpack_nibbles(buf[..., :c // 2]), s[..., None])
  if codec != "int8":
    return decode(buf, None)
  scale = jax.lax.bitcast_convert_type(buf[..., -4:], jnp.float32)[..., None]
  return decode(buf[..., :-4], scale)


def compressed_psum(x: jax.Array, codec: str, axis_name: str,
                    algorithm: str = "two_shot") -> jax.Array:
  """``psum(x, axis_name)`` over a ``codec``-encoded payload (inside shard_map)."""
  check_codec(codec)
  check_algorithm(algorithm)
  n = jax.lax.axis_size(axis_name)
  xc = _chunks(x.astype(jnp.float32), n)              # (..., N, D/N)
  ax = xc.ndim - 2
  # 'invarying': every device ends with the same vector, as after a psum (keeps the
  # shard_map replication check on for the logits).
  gather = lambda a, axis: jax.lax.all_gather(a, axis_name, axis=axis, tiled=True,
                                              to="invarying")
  if algorithm == "one_shot":
    everyone = gather(_pack(*encode(xc, codec))[None], 0)  # (N sources, ..., N, D/N [+4])
    return jnp.sum(_unpack(everyone, codec), 0).reshape(x.shape).astype(x.dtype)
  mine = jax.lax.all_to_all(_pack(*encode(xc, codec)), axis_name, ax, ax, tiled=True)
  reduced = jnp.sum(_unpack(mine, codec), axis=ax, keepdims=True)  # my chunk, float32
  out = _unpack(gather(_pack(*encode(reduced, codec)), ax), codec)
  return out.reshape(x.shape).astype(x.dtype)


def round_trip(x: jax.Array, codec: str) -> jax.Array:
  """decode(encode(x)) without leaving float32. For bf16 this is ``reduce_precision``:
  XLA may elide a float32 -> bf16 -> float32 convert pair (excess precision allowed),
  which would understate the error of a payload that really crossed a wire as bf16."""
  if codec == "bf16":
    return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
  return decode(*encode(x, codec))


def emulated_sum(parts_NxD: jax.Array, codec: str) -> jax.Array:
  """What ``compressed_psum`` returns, from the N partial sums stacked on axis 0."""
  n = parts_NxD.shape[0]
  xc = _chunks(parts_NxD.astype(jnp.float32), n)      # (N, ..., N chunks, D/N)
  reduced = jnp.sum(round_trip(xc, codec), axis=0)
  out = round_trip(reduced, codec)
  return out.reshape(parts_NxD.shape[1:]).astype(parts_NxD.dtype)


def error_bound(parts_NxD: jax.Array, codec: str = "int8") -> jax.Array:
  """Elementwise bound on |two-shot int8 or int4 sync - exact sum| (module docstring):
  half a scale per encoding, the scale's block being the chunk (int8) or ``INT4_BLOCK``
  values (int4)."""
  if codec not in ("int8", "int4"):
    raise ValueError(f"error_bound covers int8 and int4, got {codec!r}")
  n = parts_NxD.shape[0]
  xc = _chunks(parts_NxD.astype(jnp.float32), n)
  qmax, block = (_INT8_MAX, xc.shape[-1]) if codec == "int8" else (_INT4_MAX, INT4_BLOCK)
  if xc.shape[-1] % block:
    _check_int4_chunk(xc.shape[-1])
  half_scale = lambda a: jnp.repeat(jnp.max(jnp.abs(a.reshape(*a.shape[:-1], -1, block)), -1),
                                    block, -1) / (2 * qmax)
  reduced = jnp.sum(round_trip(xc, codec), axis=0)
  bound = jnp.sum(half_scale(xc), 0) + half_scale(reduced)
  return bound.reshape(parts_NxD.shape[1:])

