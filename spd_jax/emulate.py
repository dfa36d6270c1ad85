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

from core import guards
from core.models import layers, lm
from spd_jax import compress, sharding
from spd_jax.tp import ACTION_CODES, RESIDUAL_MODES, SyncPlan


def _device_partials(p: dict, x_BxLxD: jax.Array, cfg: lm.LMConfig, n_devices: int):
  """One block split as the N devices hold it (KV heads replicated when N exceeds them):
  each device's attention partial sum (N, B, L, D), a function giving each device's MLP
  partial sum from its own input stream (N, B, L, D), and the row-parallel biases."""
  p, cfg = sharding.replicate_kv_block(p, cfg, n_devices), sharding.tp_config(cfg, n_devices)
  attn_d = sharding.split_for_devices(p["attn"], n_devices)
  mlp_d = sharding.split_for_devices(p["mlp"], n_devices)
  pos = jnp.asarray(0, jnp.int32)
  h = layers.rms_norm(x_BxLxD, p["attn_norm"]["scale"], cfg.norm_eps)
  o_NxBxLxD = jax.vmap(lambda a: lm.attention_partial(a, h, pos, cfg)[0])(attn_d)
  mlp = lambda y_NxBxLxD: jax.vmap(lambda m, y: lm.mlp_partial(
      m, layers.rms_norm(y, p["mlp_norm"]["scale"], cfg.norm_eps)))(mlp_d, y_NxBxLxD)
  return o_NxBxLxD, mlp, p["attn"].get("bo", 0.0), p["mlp"].get("b_down", 0.0)


def spd_block(p: dict, x_BxLxD: jax.Array, cfg: lm.LMConfig, n_devices: int,
              residual: str = "sum") -> jax.Array:
  """One SPD block (attention sync dropped) emulated for ``n_devices`` (no cache)."""
  if residual not in RESIDUAL_MODES:
    raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
  o_NxBxLxD, mlp, bo, b_down = _device_partials(p, x_BxLxD, cfg, n_devices)
  y_NxBxLxD = x_BxLxD + o_NxBxLxD + bo
  z_NxBxLxD = mlp(y_NxBxLxD)
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


def _sync(parts_NxBxLxD: jax.Array, code: jax.Array) -> jax.Array:
  """The sum the devices' sync delivers, for a traced action code (keep or a codec).
  A codec this shape cannot carry (int4 with chunks not a multiple of its block) gets a
  branch that raises when a plan selects it, so other plans still run on the model."""
  chunk = parts_NxBxLxD.shape[-1] // parts_NxBxLxD.shape[0]

  def branch(c):
    if c == "int4" and chunk % compress.INT4_BLOCK:
      def refuse(a):
        guards.require(lambda _: False, lambda _: (
            f"an int4 sync needs chunks of a multiple of INT4_BLOCK={compress.INT4_BLOCK} "
            f"values; this model's are {chunk} (hidden size / TP size)"), code)
        return jnp.sum(a, 0)
      return refuse
    return lambda a: compress.emulated_sum(a, c)
  branches = [lambda a: jnp.sum(a, 0)] + [branch(c) for c in compress.CODECS]
  return jax.lax.switch(jnp.maximum(code - 1, 0), branches, parts_NxBxLxD)


def plan_block(p: dict, x_BxLxD: jax.Array, cfg: lm.LMConfig, n_devices: int,
               attn_code: jax.Array, mlp_code: jax.Array) -> jax.Array:
  """One block under any per-block action pair (``tp.ACTION_CODES``, may be traced):
  attention sync kept, dropped or compressed; MLP sync kept or compressed."""
  o_NxBxLxD, mlp, bo, b_down = _device_partials(p, x_BxLxD, cfg, n_devices)
  dropped = attn_code == ACTION_CODES["drop"]
  # Kept: every device's MLP reads the synced stream; dropped: its own heads only.
  y_NxBxLxD = jnp.where(dropped, x_BxLxD + o_NxBxLxD + bo,
                        jnp.broadcast_to(x_BxLxD + _sync(o_NxBxLxD, attn_code) + bo,
                                         o_NxBxLxD.shape))
  z_NxBxLxD = mlp(y_NxBxLxD)
  out_dropped = x_BxLxD + _sync(o_NxBxLxD + z_NxBxLxD, mlp_code) + bo + b_down
  out_kept = y_NxBxLxD[0] + _sync(z_NxBxLxD, mlp_code) + b_down
  return jnp.where(dropped, out_dropped, out_kept)


def apply_plan(params: dict, tokens_BxL: jax.Array, cfg: lm.LMConfig, attn_codes_L: jax.Array,
               mlp_codes_L: jax.Array, n_devices: int) -> jax.Array:
  """Logits under a full sync plan given as traced action codes (``SyncPlan.codes``):
  one compilation serves every plan the planner tries."""
  sharding.check_tp_size(cfg, n_devices)
  x = lm.embed(params, tokens_BxL)
  for i in range(cfg.n_layers):
    x = plan_block(params[lm.block_key(i)], x, cfg, n_devices, attn_codes_L[i], mlp_codes_L[i])
  return lm.unembed(params, x, cfg)
