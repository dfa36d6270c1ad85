"""Pure-function building blocks shared by the models (no parameters of their own).

Shape suffixes: B batch, L query length, S key length, D model width, H heads,
K key/value heads, Dh head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normal_init(key: jax.Array, shape: tuple[int, ...], fan_in: int,
                dtype=jnp.float32) -> jax.Array:
  """LeCun-normal: std 1/sqrt(fan_in), so activations keep unit scale."""
  return jax.random.normal(key, shape, dtype) / jnp.sqrt(fan_in).astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
  var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
  return (x * jax.lax.rsqrt(var + eps)).astype(x.dtype) * scale


def layer_norm_params(d: int) -> dict:
  """A LayerNorm's parameters at init: unit scale, zero bias."""
  return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float = 1e-6) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def rope_tables(positions: jax.Array, head_dim: int, theta: float = 10_000.0
                ) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables of shape positions.shape + (head_dim // 2,)."""
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  freqs = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * freqs
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BxLxHxDh: jax.Array, cos_BxLxR: jax.Array, sin_BxLxR: jax.Array
               ) -> jax.Array:
  """Rotates the two halves of each head (the 'rotate_half' RoPE convention)."""
  x1, x2 = jnp.split(x_BxLxHxDh, 2, axis=-1)
  cos, sin = cos_BxLxR[:, :, None, :], sin_BxLxR[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dot_product_attention(q_BxLxHxDh: jax.Array, k_BxSxKxDh: jax.Array,
                          v_BxSxKxDh: jax.Array, mask_BxLxS: jax.Array | None
                          ) -> jax.Array:
  """Softmax attention with grouped KV heads (H must be a multiple of K).

  Query head h reads key/value head h // (H // K), so a contiguous slice of
  query heads and the matching slice of KV heads form a self-contained shard.
  Returns (B, L, H, Dh).
  """
  b, l, h, dh = q_BxLxHxDh.shape
  k = k_BxSxKxDh.shape[2]
  if h % k:
    raise ValueError(f"{h} query heads are not a multiple of {k} KV heads")
  q_BxLxKxGxDh = q_BxLxHxDh.reshape(b, l, k, h // k, dh)
  logits_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", q_BxLxKxGxDh, k_BxSxKxDh)
  logits_BxKxGxLxS = logits_BxKxGxLxS / jnp.sqrt(dh).astype(q_BxLxHxDh.dtype)
  if mask_BxLxS is not None:
    big_neg = jnp.finfo(logits_BxKxGxLxS.dtype).min
    logits_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], logits_BxKxGxLxS, big_neg)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1)
  out_BxLxKxGxDh = jnp.einsum("bkgls,bskd->blkgd", probs, v_BxSxKxDh)
  return out_BxLxKxGxDh.reshape(b, l, h, dh)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels (computed in float32)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))
