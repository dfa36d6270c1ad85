"""Neuron importance for weight subcloning: mean |activation| on calibration data.

* Residual-stream (embedding) neurons: one global score per neuron, the sum
  over every residual-connected layer (the embedding output and each block's
  output) of its mean |activation| -- the same neurons matter in every layer
  because y = x + f(x) is dominated by x.
* MLP hidden units: per block, mean |input of the down projection|.
* Attention heads: per block, whole heads, by the mean |head output| before the
  out-projection (for grouped KV heads the group's query heads are summed,
  since a KV group must be kept or removed whole).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from core.models import bert, check_params, layers, lm, vit


@dataclasses.dataclass(frozen=True)
class Importance:
  residual: np.ndarray          # (D,)
  heads: tuple[np.ndarray, ...]  # per block, (K,) scores of KV groups (= heads for MHA)
  mlp: tuple[np.ndarray, ...]    # per block, (F,)


def lm_importance(params: dict, tokens_BxL, cfg: lm.LMConfig) -> Importance:
  """Scores of every residual neuron, KV-head group and MLP unit of the LM."""
  check_params(lm.init, params, cfg, "lm_importance")
  return _importance(_lm_scores(params, jnp.asarray(tokens_BxL), cfg))


def _importance(scores) -> Importance:
  residual, heads, mlp = jax.device_get(scores)
  return Importance(np.asarray(residual), tuple(map(np.asarray, heads)),
                    tuple(map(np.asarray, mlp)))


# Module-level jits with the config static: one compilation per (config, shape),
# shared by every call (a study or a test scores the same parent many times).
@functools.partial(jax.jit, static_argnums=2)
def _lm_scores(params, tokens, cfg):
  pos = jnp.asarray(0, jnp.int32)
  x = lm.embed(params, tokens)
  residual = jnp.mean(jnp.abs(x), axis=(0, 1))
  heads, mlp = [], []
  g = cfg.n_heads // cfg.kv_heads
  for i in range(cfg.n_layers):
    p = params[lm.block_key(i)]
    h = layers.rms_norm(x, p["attn_norm"]["scale"], cfg.norm_eps)
    o_BxLxHxDh, _ = lm.attention_heads(p["attn"], h, pos, cfg)
    per_head = jnp.mean(jnp.abs(o_BxLxHxDh), axis=(0, 1, 3))
    heads.append(per_head.reshape(cfg.kv_heads, g).sum(-1))
    y = x + jnp.einsum("blhk,hkd->bld", o_BxLxHxDh, p["attn"]["wo"]) + p["attn"].get("bo", 0.0)
    hidden = lm.mlp_hidden(p["mlp"], layers.rms_norm(y, p["mlp_norm"]["scale"], cfg.norm_eps))
    mlp.append(jnp.mean(jnp.abs(hidden), axis=(0, 1)))
    x = y + hidden @ p["mlp"]["w_down"] + p["mlp"].get("b_down", 0.0)
    residual = residual + jnp.mean(jnp.abs(x), axis=(0, 1))
  return residual, heads, mlp


def ranking(scores: np.ndarray) -> np.ndarray:
  """Indices from most to least important (stable for ties)."""
  return np.argsort(-np.asarray(scores), kind="stable")


def vit_importance(params: dict, images, cfg: vit.ViTConfig) -> Importance:
  """The same three rankings for the ViT (heads are its attention heads)."""
  check_params(vit.init, params, cfg, "vit_importance")
  return _importance(_vit_scores(params, jnp.asarray(images), cfg))


@functools.partial(jax.jit, static_argnums=2)
def _vit_scores(params, x, cfg):
  h = vit.embed(params, x, cfg)
  residual = jnp.mean(jnp.abs(h), axis=(0, 1))
  heads, mlp = [], []
  for i in range(cfg.n_layers):
    p = params[f"block_{i}"]
    o = vit.attention_heads(p["attn"], layers.layer_norm(h, **p["ln1"], eps=cfg.norm_eps))
    heads.append(jnp.mean(jnp.abs(o), axis=(0, 1, 3)))
    h = h + jnp.einsum("bthk,hkd->btd", o, p["attn"]["wo"]) + p["attn"]["bo"]
    hidden = vit.mlp_hidden(p["mlp"], layers.layer_norm(h, **p["ln2"], eps=cfg.norm_eps))
    mlp.append(jnp.mean(jnp.abs(hidden), axis=(0, 1)))
    h = h + hidden @ p["mlp"]["w2"] + p["mlp"]["b2"]
    residual = residual + jnp.mean(jnp.abs(h), axis=(0, 1))
  return residual, heads, mlp


def bert_importance(params: dict, ids_BxL, mask_BxL, cfg: bert.BertConfig) -> Importance:
  """The three rankings for post-LN BERT, averaged over unpadded tokens only. The
  residual stream is the LayerNorm output after the embeddings and after each
  block (post-LN renormalises it every block, so those are what later layers read)."""
  check_params(bert.init, params, cfg, "bert_importance")
  return _importance(_bert_scores(params, jnp.asarray(ids_BxL), jnp.asarray(mask_BxL), cfg))


@functools.partial(jax.jit, static_argnums=3)
def _bert_scores(params, ids, mask, cfg):
  w = mask.astype(jnp.float32)[..., None]
  mean = lambda a: jnp.sum(jnp.abs(a) * (w if a.ndim == 3 else w[..., None]),
                           axis=(0, 1)) / jnp.sum(w)
  x = bert.embed(params, ids, cfg)
  residual, heads, mlp = mean(x), [], []
  for i in range(cfg.n_layers):
    p = params[bert.block_key(i)]
    heads.append(jnp.mean(mean(bert.attention_heads(p["attn"], x, mask)), axis=-1))
    x_mid = bert.block_attention_residual(p, x, mask, cfg)
    mlp.append(mean(bert.mlp_hidden(p["mlp"], x_mid)))
    x = bert.block(p, x, mask, cfg)
    residual = residual + mean(x)
  return residual, heads, mlp
