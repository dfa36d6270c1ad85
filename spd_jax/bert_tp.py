"""Tensor-parallel BERT (``core.models.bert``, post-LN) with droppable attention syncs.

Megatron's split as for the LM (``sharding``: heads over devices, MLP w_in
column- and w_out row-parallel, LayerNorms and embeddings replicated), two
all-reduces per block. Post-LN puts a LayerNorm between the attention residual
and the MLP's, so the two partial sums cannot be added into one payload as in
the pre-norm LM (``tp.tp_block``). An SPD block here keeps one sync point that
carries both, stacked (2x the payload, one collective):

    y_i = LN1(X + O_i + b_o)                      device i's heads only (the approximation)
    O, Z = psum_i(O_i, Z_i(y_i))                  the one remaining all-reduce
    out = LN2(LN1(X + O + b_o) + Z + b_out)

so the attention contribution to the residual stream stays exact, only the MLP's
input is approximate -- the same trade as the LM's SPD block. Bytes sent are
those of the dense block; what is dropped is a synchronisation point (latency).

One body serves both paths: ``make_forward`` runs it under ``jax.shard_map``
over real devices; ``embed`` runs it under ``jax.vmap(axis_name=TP)`` over the
stacked shards on one device (the psums become sums over the mapped axis),
which is what the accuracy study uses.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from core.models import bert, check_params, layers
from spd_jax import sharding, strategies
from spd_jax.sharding import TP
from spd_jax.tp import SyncPlan


def _ln(p: dict, x: jax.Array, cfg: bert.BertConfig) -> jax.Array:
  return layers.layer_norm(x, p["scale"], p["bias"], cfg.norm_eps)


def _sync(x: jax.Array) -> jax.Array:
  return jax.lax.psum(x, TP)


def tp_block(p: dict, x_BxLxD: jax.Array, mask_BxL: jax.Array, cfg: bert.BertConfig, *,
             drop_attn_sync: bool) -> jax.Array:
  """One block on one device's shard (inside shard_map or vmap over ``TP``)."""
  a, m = p["attn"], p["mlp"]
  o_i = jnp.einsum("blhk,hkd->bld", bert.attention_heads(a, x_BxLxD, mask_BxL), a["wo"])
  z_of = lambda y: bert.mlp_hidden(m, y) @ m["w_out"]  # this device's MLP partial sum
  if not drop_attn_sync:
    y = _ln(p["attn_norm"], x_BxLxD + _sync(o_i) + a["bo"], cfg)
    return _ln(p["mlp_norm"], y + _sync(z_of(y)) + m["b_out"], cfg)
  z_i = z_of(_ln(p["attn_norm"], x_BxLxD + o_i + a["bo"], cfg))
  o, z = _sync(jnp.stack([o_i, z_i]))
  y = _ln(p["attn_norm"], x_BxLxD + o + a["bo"], cfg)
  return _ln(p["mlp_norm"], y + z + m["b_out"], cfg)


def run_block(p: dict, x_BxLxD: jax.Array, mask_BxL: jax.Array, cfg: bert.BertConfig,
              drop: Any) -> jax.Array:
  """``tp_block`` for a static (Python bool) or traced drop flag."""
  if isinstance(drop, (bool, np.bool_)):
    return tp_block(p, x_BxLxD, mask_BxL, cfg, drop_attn_sync=bool(drop))
  return jax.lax.cond(drop, functools.partial(tp_block, cfg=cfg, drop_attn_sync=True),
                      functools.partial(tp_block, cfg=cfg, drop_attn_sync=False),
                      p, x_BxLxD, mask_BxL)


def _local_embedding(params: dict, ids_BxL, mask_BxL, *, cfg: bert.BertConfig,
                     drop: Sequence[Any]) -> jax.Array:
  x = bert.embed(params, ids_BxL, cfg)
  for i in range(cfg.n_layers):
    x = run_block(params[bert.block_key(i)], x, mask_BxL, cfg, drop[i])
  pooled = bert.mean_pool(x, mask_BxL)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _check(cfg: bert.BertConfig, tp: int, plan: SyncPlan) -> None:
  sharding.check_tp_size(cfg, tp)
  if plan.n_layers != cfg.n_layers:
    raise ValueError(f"sync plan has {plan.n_layers} blocks, model has {cfg.n_layers}")
  if any(c != "plain" for c in plan.attn_codec + plan.mlp_codec):
    raise NotImplementedError("compressed syncs are not implemented for BERT; use drop/keep")


def make_forward(cfg: bert.BertConfig, mesh: Mesh, plan: SyncPlan | None = None):
  """A jitted TP forward over ``mesh``: ``f(params, ids, mask) -> sentence embeddings``
  (mean-pooled, L2-normalised, replicated); ``params`` placed by ``sharding.shard_params``.
  ``f.lower`` is the jitted function's, for reading the compiled HLO."""
  plan = plan or SyncPlan.dense(cfg.n_layers)
  _check(cfg, mesh.shape[TP], plan)
  p_specs = sharding.param_specs(jax.eval_shape(bert.init, jax.random.key(0), cfg))
  body = functools.partial(_local_embedding, cfg=cfg, drop=plan.drop_attn)
  jitted = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(p_specs, P(), P()), out_specs=P()))

  def forward(params, ids_BxL, mask_BxL):
    check_params(bert.init, params, cfg, "bert tp forward")
    bert.check_inputs(ids_BxL, mask_BxL, cfg, "bert tp forward")
    return jitted(params, ids_BxL, mask_BxL)
  forward.lower = jitted.lower
  return forward


def _vmapped(fn, params: dict, n_devices: int):
  stacked, axes = sharding.device_stack(params, n_devices)
  return jax.vmap(fn, in_axes=(axes,), axis_name=TP)(stacked)[0]  # every device agrees


def embed(params: dict, ids_BxL: jax.Array, mask_BxL: jax.Array, cfg: bert.BertConfig,
          drop_L: Any, n_devices: int) -> jax.Array:
  """Sentence embeddings of the model at TP size ``n_devices``, emulated on one device;
  ``drop_L``: per block, drop the attention sync (a tuple of bools, or a traced bool
  vector so one compilation serves every plan)."""
  sharding.check_tp_size(cfg, n_devices)
  if len(drop_L) != cfg.n_layers:
    raise ValueError(f"sync plan has {len(drop_L)} blocks, model has {cfg.n_layers}")
  return _vmapped(lambda p: _local_embedding(p, ids_BxL, mask_BxL, cfg=cfg, drop=list(drop_L)),
                  params, n_devices)


def spd_block(p_block: dict, inputs: tuple[jax.Array, jax.Array], cfg: bert.BertConfig,
              n_devices: int, residual: str = "sum") -> jax.Array:
  """One SPD block (attention sync dropped) emulated for ``n_devices``; ``inputs`` is
  (hidden states, attention mask). For ``strategies`` (``residual``: only "sum").
  Padded positions come out as zeros, as in ``teacher_io``: nothing reads them, so
  the strategies' error ignores them."""
  if residual != "sum":
    raise ValueError(f"BERT's SPD block has no residual modes, got {residual!r}")
  x, mask = inputs
  out = _vmapped(lambda p: tp_block(p, x, mask, cfg, drop_attn_sync=True), p_block, n_devices)
  return out * mask[..., None]


def teacher_io(params: dict, calib: tuple[np.ndarray, np.ndarray], cfg: bert.BertConfig
               ) -> tuple[list, list]:
  """The dense model's per-block inputs ((hidden, mask) pairs) and outputs (zero at
  padded positions) on calibration ``(ids, mask)``."""
  ids, mask = (jnp.asarray(a) for a in calib)
  x = bert.embed(params, ids, cfg)
  xs, ys = [], []
  for i in range(cfg.n_layers):
    xs.append((x, mask))
    x = bert.block(params[bert.block_key(i)], x, mask, cfg)
    ys.append(x * mask[..., None])
  return xs, ys


FAMILY = strategies.Family(teacher_io, spd_block)  # B2B and head grouping on BERT
