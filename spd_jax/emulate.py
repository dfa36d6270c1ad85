"""Single-device emulation of the N-device SPD model.

``tp.make_forward`` runs the real thing under shard_map; this module computes
the same function on one device by stacking the N shards along a leading axis
and vmapping over it. It is what the accuracy studies and the strategies
(B2B training, head-grouping search) use, because on a CPU it is much faster
than N fake devices; a test pins it to the shard_map version.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core.models import layers, lm
from spd_jax import sharding
from spd_jax.tp import RESIDUAL_MODES, SyncPlan


def spd_block(p: dict, x_BxLxD: jax.Array, cfg: lm.LMConfig, n_devices: int,
              residual: str = "sum") -> jax.Array:
  """One SPD block (attention sync dropped) emulated for ``n_devices`` (no cache)."""
  if residual not in RESIDUAL_MODES:
    raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
  sharding.check_tp_size(cfg, n_devices)
  attn_d = sharding.split_for_devices(p["attn"], n_devices)
  mlp_d = sharding.split_for_devices(p["mlp"], n_devices)
  bo, b_down = p["attn"].get("bo", 0.0), p["mlp"].get("b_down", 0.0)
  pos = jnp.asarray(0, jnp.int32)
  h = layers.rms_norm(x_BxLxD, p["attn_norm"]["scale"], cfg.norm_eps)
  o_NxBxLxD = jax.vmap(lambda a: lm.attention_partial(a, h, pos, cfg)[0])(attn_d)
  y_NxBxLxD = x_BxLxD + o_NxBxLxD + bo
  z_NxBxLxD = jax.vmap(lambda m, y: lm.mlp_partial(
      m, layers.rms_norm(y, p["mlp_norm"]["scale"], cfg.norm_eps)))(mlp_d, y_NxBxLxD)
  if residual == "sum":
    return x_BxLxD + jnp.sum(o_NxBxLxD + z_NxBxLxD, 0) + bo + b_down
  return jnp.sum((x_BxLxD + o_NxBxLxD) / n_devices + z_NxBxLxD, 0) + bo + b_down


def block_forward(p: dict, x_BxLxD: jax.Array, cfg: lm.LMConfig, n_devices: int,
                  drop: bool, residual: str = "sum") -> jax.Array:
  if drop:
    return spd_block(p, x_BxLxD, cfg, n_devices, residual)
  return lm.block(p, x_BxLxD, jnp.asarray(0, jnp.int32), cfg)[0]


def apply(params: dict, tokens_BxL: jax.Array, cfg: lm.LMConfig, plan: SyncPlan,
          n_devices: int, residual: str = "sum") -> jax.Array:
  """Logits of the SPD model at TP size ``n_devices`` (full sequence, causal)."""
  if plan.n_layers != cfg.n_layers:
    raise ValueError(f"sync plan has {plan.n_layers} blocks, model has {cfg.n_layers}")
  x = lm.embed(params, tokens_BxL)
  for i in range(cfg.n_layers):
    x = block_forward(params[lm.block_key(i)], x, cfg, n_devices, plan.drop_attn[i], residual)
  return lm.unembed(params, x, cfg)


def block_inputs(params: dict, tokens_BxL: jax.Array, cfg: lm.LMConfig) -> list[jax.Array]:
  """Residual-stream inputs of every block in the dense model (calibration data)."""
  x = lm.embed(params, tokens_BxL)
  xs = []
  for i in range(cfg.n_layers):
    xs.append(x)
    x = lm.block(params[lm.block_key(i)], x, jnp.asarray(0, jnp.int32), cfg)[0]
  return xs


def apply_masked(params: dict, tokens_BxL: jax.Array, cfg: lm.LMConfig, drop_L: jax.Array,
                 n_devices: int, residual: str = "sum") -> jax.Array:
  """``apply`` with the plan as a traced bool vector (one compile serves every
  plan; each block runs only the branch its flag selects)."""
  x = lm.embed(params, tokens_BxL)
  for i in range(cfg.n_layers):
    p = params[lm.block_key(i)]
    x = jax.lax.cond(drop_L[i],
                     lambda p, x: spd_block(p, x, cfg, n_devices, residual),
                     lambda p, x: lm.block(p, x, jnp.asarray(0, jnp.int32), cfg)[0], p, x)
  return lm.unembed(params, x, cfg)
