"""Ladder Residual (Zhang et al., arXiv 2501.06589, ICML 2025) on the byte LM: the
model (unsharded); ``spd_jax.ladder`` runs the same body under tensor parallelism.

A standard pre-norm block adds each module's output to the residual stream before
the next module reads it, so every all-reduce sits on the critical path. A ladder
block lets each module read the stream *without* the previous module's output,
which is added one module later:

    x = x + a_{i-1}           block i-1's attention output, reduced while MLP i-1 ran
    a_i = Attn_i(norm(x))     its all-reduce may overlap with ...
    x = x + m_{i-1}           block i-1's MLP output, reduced while Attn_i ran
    m_i = MLP_i(norm(x))      ... this module's compute
    (after the last block: x = x + a_L + m_L)

The parameters are the LM's (``lm.init``); only the wiring differs, so a ladder
model is trained by ``core.recipes.train_lm(..., architecture="ladder")``.

SPD on a ladder block (``drop[i]``): its attention partial sums travel in the MLP's
all-reduce (one sync instead of two), so block i+1's attention reads the stream
without a_i (one module staler); everything after it sees a_i as before.

One body (``blocks``) runs unsharded (``sync`` the identity) and under shard_map
(``sync`` a psum, ``spd_jax.ladder``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from core.models import layers, lm

Sync = Callable[[jax.Array], jax.Array]


def blocks(params: dict, x_BxLxD: jax.Array, pos: jax.Array, cfg: lm.LMConfig, cache,
            sync: Sync, drop: Sequence[bool]) -> tuple[jax.Array, Any]:
  """The residual stream through every ladder block (module docstring); ``sync`` sums
  a module's partial output over devices (the identity when unsharded)."""
  prev_a = prev_m = 0.0
  new_cache = {} if cache is not None else None
  for i in range(cfg.n_layers):
    key = lm.block_key(i)
    p = params[key]
    bo, b_down = p["attn"].get("bo", 0.0), p["mlp"].get("b_down", 0.0)
    x_BxLxD = x_BxLxD + prev_a
    o_i, kv = lm.attention_partial(p["attn"], layers.rms_norm(
        x_BxLxD, p["attn_norm"]["scale"], cfg.norm_eps), pos, cfg,
        cache[key] if cache is not None else None)
    x_BxLxD = x_BxLxD + prev_m
    z_i = lm.mlp_partial(p["mlp"], layers.rms_norm(x_BxLxD, p["mlp_norm"]["scale"], cfg.norm_eps))
    if drop[i]:  # one sync carries both; block i+1's attention does without a_i
      prev_a, prev_m = 0.0, sync(o_i + z_i) + bo + b_down
    else:
      prev_a, prev_m = sync(o_i) + bo, sync(z_i) + b_down
    if cache is not None:
      new_cache[key] = kv
  return x_BxLxD + prev_a + prev_m, new_cache


def _identity(x):
  return x


def check_drop(drop, cfg: lm.LMConfig) -> tuple[bool, ...]:
  drop = (False,) * cfg.n_layers if drop is None else tuple(bool(d) for d in drop)
  if len(drop) != cfg.n_layers:
    raise ValueError(f"sync plan has {len(drop)} blocks, model has {cfg.n_layers}")
  return drop


def forward(params: dict, tokens_BxL: jax.Array, cfg: lm.LMConfig, *, cache=None, pos=0,
            drop: Sequence[bool] | None = None) -> tuple[jax.Array, Any]:
  """Logits of the ladder model (unsharded), with an optional KV cache as ``lm.forward``."""
  lm.check_inputs(tokens_BxL, cfg, cache, pos, "ladder.forward")
  x, new_cache = blocks(params, lm.embed(params, tokens_BxL), jnp.asarray(pos, jnp.int32), cfg,
                         cache, _identity, check_drop(drop, cfg))
  return lm.unembed(params, x, cfg), new_cache


def apply(params: dict, tokens_BxL: jax.Array, cfg: lm.LMConfig,
          drop: Sequence[bool] | None = None) -> jax.Array:
  """Full-sequence causal logits of the ladder model (``lm.apply``'s signature)."""
  return forward(params, tokens_BxL, cfg, drop=drop)[0]


