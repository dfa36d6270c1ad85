"""A small Vision Transformer (pre-LayerNorm, class token, learned positions).

Attention weights keep an explicit head axis (wq: (D, H, Dh), wo: (H, Dh, D)),
the same layout as the LM, so head-level surgery and sharding look alike.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from core.models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  input_shape: tuple[int, ...] = (28, 28, 1)
  patch: int = 7
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  d_ff: int = 256
  num_classes: int = 10
  norm_eps: float = 1e-6

  def __post_init__(self):
    h, w, _ = self.input_shape
    if h % self.patch or w % self.patch:
      raise ValueError(f"patch={self.patch} does not tile {h}x{w} images")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

  @property
  def num_patches(self) -> int:
    h, w, _ = self.input_shape
    return (h // self.patch) * (w // self.patch)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


@functools.partial(jax.jit, static_argnums=1)  # one compile instead of one per leaf shape
def init(key: jax.Array, cfg: ViTConfig) -> dict:
  d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
  pdim = cfg.patch * cfg.patch * cfg.input_shape[-1]
  keys = jax.random.split(key, cfg.n_layers + 3)
  params = {"patch_embed": {"kernel": layers.normal_init(keys[0], (pdim, d), pdim),
                            "bias": jnp.zeros((d,))},
            "cls": jnp.zeros((d,)),
            "pos_embed": 0.02 * jax.random.normal(keys[1], (cfg.num_patches + 1, d))}
  out_scale = 1.0 / jnp.sqrt(2.0 * cfg.n_layers)
  for i in range(cfg.n_layers):
    kq, kk, kv, ko, k1, k2 = jax.random.split(keys[i + 2], 6)
    params[f"block_{i}"] = {
        "ln1": layers.layer_norm_params(d),
        "attn": {"wq": layers.normal_init(kq, (d, h, dh), d), "bq": jnp.zeros((h, dh)),
                 "wk": layers.normal_init(kk, (d, h, dh), d), "bk": jnp.zeros((h, dh)),
                 "wv": layers.normal_init(kv, (d, h, dh), d), "bv": jnp.zeros((h, dh)),
                 "wo": layers.normal_init(ko, (h, dh, d), d) * out_scale,
                 "bo": jnp.zeros((d,))},
        "ln2": layers.layer_norm_params(d),
        "mlp": {"w1": layers.normal_init(k1, (d, f), d), "b1": jnp.zeros((f,)),
                "w2": layers.normal_init(k2, (f, d), f) * out_scale, "b2": jnp.zeros((d,))}}
  params["final_norm"] = layers.layer_norm_params(d)
  params["head"] = {"kernel": jnp.zeros((d, cfg.num_classes)),
                    "bias": jnp.zeros((cfg.num_classes,))}
  return params


def patchify(x_BxHxWxC: jax.Array, p: int) -> jax.Array:
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def attention_heads(a: dict, h_BxTxD: jax.Array) -> jax.Array:
  """Per-head attention outputs (B, T, H, Dh) before the out-projection."""
  q = jnp.einsum("btd,dhk->bthk", h_BxTxD, a["wq"]) + a["bq"]
  k = jnp.einsum("btd,dhk->bthk", h_BxTxD, a["wk"]) + a["bk"]
  v = jnp.einsum("btd,dhk->bthk", h_BxTxD, a["wv"]) + a["bv"]
  return layers.dot_product_attention(q, k, v, None)


def mlp_hidden(m: dict, h_BxTxD: jax.Array) -> jax.Array:
  """GELU hidden activations (B, T, F)."""
  return jax.nn.gelu(h_BxTxD @ m["w1"] + m["b1"])


def block(p: dict, x_BxTxD: jax.Array, cfg: ViTConfig) -> jax.Array:
  a = p["attn"]
  o = attention_heads(a, layers.layer_norm(x_BxTxD, **p["ln1"], eps=cfg.norm_eps))
  x = x_BxTxD + jnp.einsum("bthk,hkd->btd", o, a["wo"]) + a["bo"]
  hidden = mlp_hidden(p["mlp"], layers.layer_norm(x, **p["ln2"], eps=cfg.norm_eps))
  return x + hidden @ p["mlp"]["w2"] + p["mlp"]["b2"]


def embed(params: dict, x: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Patch tokens plus class token and positions: (B, T+1, D)."""
  tokens = patchify(x, cfg.patch) @ params["patch_embed"]["kernel"] + params["patch_embed"]["bias"]
  cls = jnp.broadcast_to(params["cls"], (x.shape[0], 1, cfg.d_model))
  return jnp.concatenate([cls, tokens], axis=1) + params["pos_embed"]


def apply(params: dict, x: jax.Array, cfg: ViTConfig) -> jax.Array:
  """Logits (B, num_classes) for images (B, H, W, C)."""
  if tuple(x.shape[1:]) != tuple(cfg.input_shape):
    raise ValueError(f"ViT expects inputs (B, {cfg.input_shape}), got {x.shape}")
  h = embed(params, x, cfg)
  for i in range(cfg.n_layers):
    h = block(params[f"block_{i}"], h, cfg)
  h = layers.layer_norm(h[:, 0], **params["final_norm"], eps=cfg.norm_eps)
  return h @ params["head"]["kernel"] + params["head"]["bias"]
