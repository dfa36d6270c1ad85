"""BERT encoder (post-LayerNorm, GELU, learned absolute positions, token types)
as pure functions over a nested-dict pytree, in the same head-explicit layout
as the LM and ViT (wq: (D, H, Dh), wo: (H, Dh, D)) so surgery and sharding
read alike. ``core.hf_checkpoint`` maps Hugging Face BERT checkpoints onto it.

  embed/{word (V, D), position (P, D), token_type (T, D), norm/{scale, bias}}
  block_i/attn/{wq, wk, wv (D, H, Dh), bq, bk, bv (H, Dh), wo (H, Dh, D), bo (D)}
  block_i/attn_norm/{scale, bias}    LayerNorm after the attention residual
  block_i/mlp/{w_in (D, F), b_in (F), w_out (F, D), b_out (D)}
  block_i/mlp_norm/{scale, bias}     LayerNorm after the MLP residual
  pooler/{kernel (D, D), bias (D)}   tanh on the [CLS] state (``pooler=True``)

``sentence_embedding`` is sentence-transformers' mean pooling over the
attention mask followed by L2 normalisation (all-MiniLM-L6-v2's pipeline).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from core import guards
from core.models import layers

Params = dict


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  d_model: int = 384
  n_layers: int = 6
  n_heads: int = 12
  d_ff: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  pooler: bool = True

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_positions",
              "type_vocab_size"):
      if getattr(self, f) < 1:
        raise ValueError(f"BertConfig.{f} must be >= 1, got {getattr(self, f)}")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    """Plain multi-head attention: one KV head per query head (the LM's name, so head
    permutation and TP sharding read both configs alike)."""
    return self.n_heads


def block_key(i: int) -> str:
  return f"block_{i}"


@functools.partial(jax.jit, static_argnums=1)
def init(key: jax.Array, cfg: BertConfig) -> Params:
  """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit norms."""
  d, h, dh, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
  keys = iter(jax.random.split(key, 4 + 6 * cfg.n_layers))
  n = lambda shape: 0.02 * jax.random.normal(next(keys), shape)
  params = {"embed": {"word": n((cfg.vocab_size, d)), "position": n((cfg.max_positions, d)),
                      "token_type": n((cfg.type_vocab_size, d)), "norm": layers.layer_norm_params(d)}}
  for i in range(cfg.n_layers):
    params[block_key(i)] = {
        "attn": {"wq": n((d, h, dh)), "bq": jnp.zeros((h, dh)), "wk": n((d, h, dh)),
                 "bk": jnp.zeros((h, dh)), "wv": n((d, h, dh)), "bv": jnp.zeros((h, dh)),
                 "wo": n((h, dh, d)), "bo": jnp.zeros((d,))},
        "attn_norm": layers.layer_norm_params(d),
        "mlp": {"w_in": n((d, f)), "b_in": jnp.zeros((f,)), "w_out": n((f, d)),
                "b_out": jnp.zeros((d,))},
        "mlp_norm": layers.layer_norm_params(d)}
  if cfg.pooler:
    params["pooler"] = {"kernel": n((d, d)), "bias": jnp.zeros((d,))}
  return params


def _norm(p: dict, x: jax.Array, cfg: BertConfig) -> jax.Array:
  return layers.layer_norm(x, p["scale"], p["bias"], cfg.norm_eps)


def attention_heads(p: Params, x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Per-head bidirectional attention outputs (B, L, H, Dh) over the unpadded keys."""
  q = jnp.einsum("bld,dhk->blhk", x_BxLxD, p["wq"]) + p["bq"]
  k = jnp.einsum("bld,dhk->blhk", x_BxLxD, p["wk"]) + p["bk"]
  v = jnp.einsum("bld,dhk->blhk", x_BxLxD, p["wv"]) + p["bv"]
  mask_BxLxS = jnp.broadcast_to(mask_BxL[:, None, :].astype(bool),
                                (x_BxLxD.shape[0], x_BxLxD.shape[1], x_BxLxD.shape[1]))
  return layers.dot_product_attention(q, k, v, mask_BxLxS)


def mlp_hidden(p: Params, x_BxLxD: jax.Array) -> jax.Array:
  """The MLP's hidden activations (B, L, F); BERT's GELU is the exact (erf) one."""
  return jax.nn.gelu(x_BxLxD @ p["w_in"] + p["b_in"], approximate=False)


def block_attention_residual(p: Params, x_BxLxD: jax.Array, mask_BxL: jax.Array,
                             cfg: BertConfig) -> jax.Array:
  """The block's first half: LN(x + attn(x)), the MLP's input."""
  a = p["attn"]
  o = jnp.einsum("blhk,hkd->bld", attention_heads(a, x_BxLxD, mask_BxL), a["wo"]) + a["bo"]
  return _norm(p["attn_norm"], x_BxLxD + o, cfg)


def block(p: Params, x_BxLxD: jax.Array, mask_BxL: jax.Array, cfg: BertConfig) -> jax.Array:
  """One post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  x = block_attention_residual(p, x_BxLxD, mask_BxL, cfg)
  return _norm(p["mlp_norm"], x + mlp_hidden(p["mlp"], x) @ p["mlp"]["w_out"] + p["mlp"]["b_out"],
               cfg)


def check_inputs(ids_BxL, mask_BxL, cfg: BertConfig, where: str) -> None:
  shape = getattr(ids_BxL, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"{where}: token ids must be a (batch, length) integer array, got shape "
                     f"{shape}")
  if getattr(mask_BxL, "shape", None) != shape:
    raise ValueError(f"{where}: attention mask shape {getattr(mask_BxL, 'shape', None)} must "
                     f"equal the ids' {shape}")
  if shape[1] > cfg.max_positions:
    raise ValueError(f"{where}: {shape[1]} tokens exceed max_positions={cfg.max_positions}")
  guards.check_token_ids(ids_BxL, cfg.vocab_size, where)


def embed(params: Params, ids_BxL: jax.Array, cfg: BertConfig,
          token_types_BxL: jax.Array | None = None) -> jax.Array:
  """Word + position + token-type embeddings, LayerNorm-ed (B, L, D)."""
  e = params["embed"]
  types = jnp.zeros_like(ids_BxL) if token_types_BxL is None else token_types_BxL
  x = (jnp.take(e["word"], ids_BxL, axis=0) + e["position"][:ids_BxL.shape[1]][None]
       + jnp.take(e["token_type"], types, axis=0))
  return _norm(e["norm"], x, cfg)


def encode(params: Params, ids_BxL: jax.Array, mask_BxL: jax.Array, cfg: BertConfig,
           token_types_BxL: jax.Array | None = None) -> jax.Array:
  """Last hidden states (B, L, D); padded positions (mask 0) are never attended to."""
  check_inputs(ids_BxL, mask_BxL, cfg, "bert.encode")
  x = embed(params, ids_BxL, cfg, token_types_BxL)
  for i in range(cfg.n_layers):
    x = block(params[block_key(i)], x, mask_BxL, cfg)
  return x


def mean_pool(h_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Mean of the unpadded positions' states (sentence-transformers' 'mean tokens')."""
  m = mask_BxL.astype(h_BxLxD.dtype)[..., None]
  return jnp.sum(h_BxLxD * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def sentence_embedding(params: Params, ids_BxL: jax.Array, mask_BxL: jax.Array,
                       cfg: BertConfig, normalize: bool = True) -> jax.Array:
  """Mean-pooled (and by default L2-normalised) sentence embeddings (B, D)."""
  pooled = mean_pool(encode(params, ids_BxL, mask_BxL, cfg), mask_BxL)
  if not normalize:
    return pooled
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def pooled_output(params: Params, h_BxLxD: jax.Array) -> jax.Array:
  """BERT's pooler: tanh(W h_[CLS] + b)."""
  return jnp.tanh(h_BxLxD[:, 0] @ params["pooler"]["kernel"] + params["pooler"]["bias"])
