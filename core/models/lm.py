"""A LLaMA-style byte-level decoder LM as pure functions over a nested-dict pytree.

RMSNorm, RoPE, SwiGLU MLP, causal multi-head attention with optional grouped
KV heads. The layout is chosen for Megatron-style tensor parallelism: every
projection keeps its head (or hidden-unit) axis explicit, so sharding by heads
is a PartitionSpec on one named axis and never a reshape:

  block_i/attn/wq  (D, H, Dh)    column-parallel over H
  block_i/attn/wk  (D, K, Dh)    column-parallel over K
  block_i/attn/wv  (D, K, Dh)
  block_i/attn/wo  (H, Dh, D)    row-parallel over H
  block_i/mlp/w_gate, w_up (D, F) column-parallel over F
  block_i/mlp/w_down (F, D)      row-parallel over F

The row-parallel halves (``attention_partial``, ``mlp_partial``) return their
sum over whatever heads/units they are given and leave their output bias out,
so a sharded caller can all-reduce and add the bias once.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from core import guards
from core.models import layers

Params = dict[str, Any]
Cache = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int = 256
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 8
  n_kv_heads: int | None = None  # None: one KV head per query head
  d_ff: int = 768                # SwiGLU hidden width
  max_seq_len: int = 256
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  use_bias: bool = False         # biases on every projection (LLaMA has none)
  tie_embeddings: bool = False

  def __post_init__(self):
    for f in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
      if getattr(self, f) < 1:
        raise ValueError(f"LMConfig.{f} must be >= 1, got {getattr(self, f)}")
    if self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads


def block_key(i: int) -> str:
  return f"block_{i}"


def _init_block(key: jax.Array, cfg: LMConfig) -> Params:
  d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff
  kq, kk, kv, ko, kg, ku, kd = jax.random.split(key, 7)
  # Output projections are scaled down with depth (GPT-2 style) so the
  # residual stream does not grow with n_layers at init.
  out_scale = 1.0 / jnp.sqrt(2.0 * cfg.n_layers)
  attn = {"wq": layers.normal_init(kq, (d, h, dh), d),
          "wk": layers.normal_init(kk, (d, k, dh), d),
          "wv": layers.normal_init(kv, (d, k, dh), d),
          "wo": layers.normal_init(ko, (h, dh, d), h * dh) * out_scale}
  mlp = {"w_gate": layers.normal_init(kg, (d, f), d),
         "w_up": layers.normal_init(ku, (d, f), d),
         "w_down": layers.normal_init(kd, (f, d), f) * out_scale}
  if cfg.use_bias:
    attn |= {"bq": jnp.zeros((h, dh)), "bk": jnp.zeros((k, dh)),
             "bv": jnp.zeros((k, dh)), "bo": jnp.zeros((d,))}
    mlp |= {"b_gate": jnp.zeros((f,)), "b_up": jnp.zeros((f,)), "b_down": jnp.zeros((d,))}
  return {"attn_norm": {"scale": jnp.ones((d,))}, "attn": attn,
          "mlp_norm": {"scale": jnp.ones((d,))}, "mlp": mlp}


@functools.partial(jax.jit, static_argnums=1)  # one compile instead of one per leaf shape
def init(key: jax.Array, cfg: LMConfig) -> Params:
  """Random parameters for ``cfg`` (float32)."""
  keys = jax.random.split(key, cfg.n_layers + 2)
  params = {"embed": {"embedding": jax.random.normal(keys[0], (cfg.vocab_size, cfg.d_model))}}
  for i in range(cfg.n_layers):
    params[block_key(i)] = _init_block(keys[i + 1], cfg)
  params["final_norm"] = {"scale": jnp.ones((cfg.d_model,))}
  if not cfg.tie_embeddings:
    params["unembed"] = {"kernel": layers.normal_init(
        keys[-1], (cfg.d_model, cfg.vocab_size), cfg.d_model)}
  return params


def init_cache(cfg: LMConfig, batch: int, max_len: int | None = None,
               dtype=jnp.float32) -> Cache:
  """An empty KV cache: per block k/v of shape (B, max_len, K, Dh)."""
  s = max_len or cfg.max_seq_len
  shape = (batch, s, cfg.kv_heads, cfg.head_dim)
  return {block_key(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for i in range(cfg.n_layers)}


def attention_heads(p: Params, h_BxLxD: jax.Array, pos: jax.Array,
                    cfg: LMConfig, kv: Cache | None = None
                    ) -> tuple[jax.Array, Cache | None]:
  """Per-head attention outputs (B, L, H, Dh) before the out-projection, for
  the heads present in ``p``; see ``attention_partial``."""
  b, l, _ = h_BxLxD.shape
  q_BxLxHxDh = jnp.einsum("bld,dhk->blhk", h_BxLxD, p["wq"])
  k_BxLxKxDh = jnp.einsum("bld,dhk->blhk", h_BxLxD, p["wk"])
  v_BxLxKxDh = jnp.einsum("bld,dhk->blhk", h_BxLxD, p["wv"])
  if "bq" in p:
    q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh = (
        q_BxLxHxDh + p["bq"], k_BxLxKxDh + p["bk"], v_BxLxKxDh + p["bv"])
  q_pos_BxL = jnp.broadcast_to(pos + jnp.arange(l), (b, l))
  cos, sin = layers.rope_tables(q_pos_BxL, cfg.head_dim, cfg.rope_theta)
  q_BxLxHxDh = layers.apply_rope(q_BxLxHxDh, cos, sin)
  k_BxLxKxDh = layers.apply_rope(k_BxLxKxDh, cos, sin)
  if kv is None:
    keys, values, k_pos = k_BxLxKxDh, v_BxLxKxDh, jnp.arange(l)
    new_kv = None
  else:
    keys = jax.lax.dynamic_update_slice(kv["k"], k_BxLxKxDh.astype(kv["k"].dtype), (0, pos, 0, 0))
    values = jax.lax.dynamic_update_slice(kv["v"], v_BxLxKxDh.astype(kv["v"].dtype), (0, pos, 0, 0))
    k_pos = jnp.arange(keys.shape[1])
    new_kv = {"k": keys, "v": values}
  mask_BxLxS = k_pos[None, None, :] <= q_pos_BxL[:, :, None]
  return layers.dot_product_attention(q_BxLxHxDh, keys, values, mask_BxLxS), new_kv


def attention_partial(p: Params, h_BxLxD: jax.Array, pos: jax.Array,
                      cfg: LMConfig, kv: Cache | None = None
                      ) -> tuple[jax.Array, Cache | None]:
  """Attention over the heads present in ``p`` (all of them, or one shard).

  ``pos`` is the absolute position of the first query token. With a KV cache
  the new keys/values are written at ``pos`` and the queries attend to every
  cached position up to their own; without one, attention is causal within
  the call. Returns the out-projection summed over the local heads, *without*
  the output bias, and the updated cache.
  """
  out_BxLxHxDh, new_kv = attention_heads(p, h_BxLxD, pos, cfg, kv)
  return jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, p["wo"]), new_kv


def mlp_hidden(p: Params, h_BxLxD: jax.Array) -> jax.Array:
  """SwiGLU hidden activations (B, L, F): the input of the down projection."""
  gate_BxLxF = h_BxLxD @ p["w_gate"]
  up_BxLxF = h_BxLxD @ p["w_up"]
  if "b_gate" in p:
    gate_BxLxF, up_BxLxF = gate_BxLxF + p["b_gate"], up_BxLxF + p["b_up"]
  return jax.nn.silu(gate_BxLxF) * up_BxLxF


def mlp_partial(p: Params, h_BxLxD: jax.Array) -> jax.Array:
  """SwiGLU over the hidden units present in ``p``, without the output bias."""
  return mlp_hidden(p, h_BxLxD) @ p["w_down"]


def block(p: Params, x_BxLxD: jax.Array, pos: jax.Array, cfg: LMConfig,
          kv: Cache | None = None) -> tuple[jax.Array, Cache | None]:
  """One pre-norm transformer block (unsharded reference)."""
  o, new_kv = attention_partial(p["attn"], layers.rms_norm(x_BxLxD, p["attn_norm"]["scale"],
                                                           cfg.norm_eps), pos, cfg, kv)
  y = x_BxLxD + o + p["attn"].get("bo", 0.0)
  z = mlp_partial(p["mlp"], layers.rms_norm(y, p["mlp_norm"]["scale"], cfg.norm_eps))
  return y + z + p["mlp"].get("b_down", 0.0), new_kv


def embed(params: Params, tokens_BxL: jax.Array) -> jax.Array:
  return jnp.take(params["embed"]["embedding"], tokens_BxL, axis=0)


def unembed(params: Params, x_BxLxD: jax.Array, cfg: LMConfig) -> jax.Array:
  h = layers.rms_norm(x_BxLxD, params["final_norm"]["scale"], cfg.norm_eps)
  if cfg.tie_embeddings:
    return h @ params["embed"]["embedding"].T
  return h @ params["unembed"]["kernel"]


def forward(params: Params, tokens_BxL: jax.Array, cfg: LMConfig, *,
            cache: Cache | None = None, pos: int | jax.Array = 0
            ) -> tuple[jax.Array, Cache | None]:
  """Logits (B, L, V) for tokens starting at absolute position ``pos``.

  With ``cache`` (from ``init_cache``) this is prefill (pos=0, L=prompt) or
  decode (L=1); the updated cache is returned.
  """
  check_inputs(tokens_BxL, cfg, cache, pos, where="lm.forward")
  pos = jnp.asarray(pos, jnp.int32)
  x, new_cache = run_blocks(params, embed(params, tokens_BxL), pos, cfg, cache,
                            lambda i, p, x, pos, kv: block(p, x, pos, cfg, kv))
  return unembed(params, x, cfg), new_cache


def cache_length(cache: Cache) -> int:
  """Positions a KV cache holds (its k/v axis 1)."""
  return cache[block_key(0)]["k"].shape[1]


def check_inputs(tokens_BxL: Any, cfg: LMConfig, cache: Cache | None, pos: Any,
                 where: str) -> None:
  """Clear errors for what the forward cannot compute: tokens not (B, L)
  integers in [0, vocab), positions past ``max_seq_len`` or past the cache (a
  KV write there would be clamped onto the last slot), a cache for another
  batch size. Traced positions and tokens are checked when the call runs."""
  shape = getattr(tokens_BxL, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"{where}: tokens must be a (batch, length) integer array, got shape "
                     f"{shape}; add a batch axis with tokens[None]")
  guards.check_token_ids(tokens_BxL, cfg.vocab_size, where)
  b, l = shape
  if cache is None:
    limit, what = cfg.max_seq_len, "max_seq_len"
  else:
    limit, what = ((cache_length(cache), "cache length") if cache_length(cache) <= cfg.max_seq_len
                   else (cfg.max_seq_len, "max_seq_len"))
    cache_b = cache[block_key(0)]["k"].shape[0]
    if cache_b != b:
      raise ValueError(f"{where}: tokens have batch {b} but the KV cache was made for batch "
                       f"{cache_b}")
  guards.require(lambda p: 0 <= p and p + l <= limit,
                 lambda p: f"{where}: positions {int(p)}..{int(p) + l - 1} do not fit the "
                           f"{what} {limit}" + (" (make a longer cache with init_cache)"
                                                if what == "cache length" else ""),
                 pos)


BlockFn = Callable[[int, Params, jax.Array, jax.Array, Cache | None],
                   tuple[jax.Array, Cache | None]]


def run_blocks(params: Params, x_BxLxD: jax.Array, pos: jax.Array, cfg: LMConfig,
               cache: Cache | None, block_fn: BlockFn) -> tuple[jax.Array, Cache | None]:
  """Threads the residual stream and the per-block KV cache through every
  block; ``block_fn(i, params_i, x, pos, kv)`` is the block (dense or sharded)."""
  new_cache = {} if cache is not None else None
  for i in range(cfg.n_layers):
    key = block_key(i)
    x_BxLxD, new_kv = block_fn(i, params[key], x_BxLxD, pos,
                               cache[key] if cache is not None else None)
    if cache is not None:
      new_cache[key] = new_kv
  return x_BxLxD, new_cache


def apply(params: Params, tokens_BxL: jax.Array, cfg: LMConfig) -> jax.Array:
  """Full-sequence causal logits (B, L, V)."""
  return forward(params, tokens_BxL, cfg)[0]


def loss(params: Params, batch: dict[str, jax.Array], cfg: LMConfig,
         apply_fn: Callable[..., jax.Array] = apply) -> tuple[jax.Array, dict]:
  """Next-byte cross-entropy on ``batch['tokens']`` of shape (B, L+1)."""
  tokens = batch["tokens"]
  logits = apply_fn(params, tokens[:, :-1], cfg)
  targets = tokens[:, 1:]
  ce = layers.cross_entropy(logits, targets)
  acc = jnp.mean(jnp.argmax(logits, -1) == targets)
  return ce, {"loss": ce, "accuracy": acc}


StepFn = Callable[[jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]


def greedy_generate(step_fn: StepFn, prompt_BxP: jax.Array, cache: Cache,
                    n_new: int) -> jax.Array:
  """Greedy decoding with any (tokens, cache, pos) -> (logits, cache) function,
  so sharded and unsharded models share one loop. Returns (B, n_new) tokens.
  The positions are known here, so a cache too short for prompt + n_new - 1
  tokens is refused before any step runs."""
  if n_new < 1:
    raise ValueError(f"n_new must be >= 1, got {n_new}")
  if getattr(prompt_BxP, "ndim", None) != 2:
    raise ValueError(f"prompt must be (batch, length), got shape {getattr(prompt_BxP, 'shape', None)}")
  need = prompt_BxP.shape[1] + n_new - 1  # the last generated token is never fed back
  if need > cache_length(cache):
    raise ValueError(f"generating {n_new} tokens after a {prompt_BxP.shape[1]}-token prompt "
                     f"writes {need} cache positions; the cache holds {cache_length(cache)}")
  logits, cache = step_fn(prompt_BxP, cache, jnp.asarray(0, jnp.int32))
  tok_Bx1 = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
  out = [tok_Bx1]
  for t in range(n_new - 1):
    pos = jnp.asarray(prompt_BxP.shape[1] + t, jnp.int32)
    logits, cache = step_fn(tok_Bx1, cache, pos)
    tok_Bx1 = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32)
    out.append(tok_Bx1)
  return jnp.concatenate(out, axis=1)


