"""The three SPD strategies, each ``(params, plan, calibration tokens) -> (params, plan)``.

* ``zero_shot`` (ISB): drop the sync, change nothing.
* ``b2b`` (SB): block-to-block distillation -- train only a dropped block's
  parameters, under SPD at the target TP size, to reproduce the dense block's
  output (MSE) on calibration data. The block's input is the dense teacher's
  residual stream at that block, so blocks are distilled independently.
* ``head_grouping`` (ESB): search the head-to-device assignment of a dropped
  block. A permutation of heads is free for the dense model, but under SPD it
  decides which heads' outputs each device's MLP sees. Our objective is the
  same block-output error B2B minimises (the paper's indicators -- attention
  statistics, MLP-output norm -- are proxies for it); greedy pairwise swaps of
  KV groups between devices, accepted only when the error drops. Then B2B.

The strategies work on any model family whose blocks the study can run one at a
time (``Family``): the byte LM (``LM``, the default) and BERT (``bert_tp.FAMILY``).
A block's input is a pytree whose leaves lead with the example axis (the LM: the
residual stream; BERT: (hidden states, attention mask)).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.models import lm
from spd_jax import emulate, heads
from spd_jax.tp import SyncPlan


@dataclasses.dataclass(frozen=True)
class B2BConfig:
  steps: int = 200
  lr: float = 1e-3
  batch: int = 16  # sequences per step; use thousands of calibration tokens, or it memorises
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class Family:
  """How the strategies run one model family's blocks.

  teacher_io(params, calib, cfg) -> (per-block inputs, per-block dense outputs);
  spd_block(p_block, inputs, cfg, n_devices, residual) -> the SPD block's output."""
  teacher_io: Callable[[dict, Any, Any], tuple[list, list]]
  spd_block: Callable[..., jax.Array]


def _lm_teacher_io(params: dict, tokens, cfg: lm.LMConfig) -> tuple[list, list]:
  xs = emulate.block_inputs(params, jnp.asarray(tokens), cfg)
  last = lm.block(params[lm.block_key(cfg.n_layers - 1)], xs[-1], jnp.asarray(0, jnp.int32), cfg)[0]
  return xs, xs[1:] + [last]


LM = Family(_lm_teacher_io, emulate.spd_block)


def zero_shot(params: dict, plan: SyncPlan, calib_tokens=None, **_) -> tuple[dict, SyncPlan]:
  return params, plan


def _dropped(plan: SyncPlan, blocks: Sequence[int] | None) -> list[int]:
  return [i for i in range(plan.n_layers) if plan.drop_attn[i]] if blocks is None else list(blocks)


def teacher_io(params: dict, calib, cfg, family: Family = LM) -> tuple[list, list]:
  """Dense inputs and outputs of every block on the calibration data."""
  return family.teacher_io(params, calib, cfg)


def block_error(p_block: dict, x, target, cfg, n_devices: int, residual: str = "sum",
                family: Family = LM) -> jax.Array:
  """Mean squared error of the SPD block against the dense block's output."""
  return jnp.mean(jnp.square(family.spd_block(p_block, x, cfg, n_devices, residual) - target))


def _rows(tree, idx):
  return jax.tree_util.tree_map(lambda a: a[idx], tree)


def b2b(params: dict, plan: SyncPlan, calib_tokens, *, cfg, n_devices: int,
        blocks: Sequence[int] | None = None, config: B2BConfig = B2BConfig(),
        residual: str = "sum", family: Family = LM) -> tuple[dict, SyncPlan]:
  """Distils each dropped block (or ``blocks``) under SPD; other params untouched."""
  xs, ys = teacher_io(params, calib_tokens, cfg, family)
  to_host = lambda t: jax.tree_util.tree_map(np.asarray, t)  # cheap host-side batching
  xs, ys = to_host(xs), to_host(ys)
  opt = optax.adam(config.lr)
  loss_fn = functools.partial(block_error, cfg=cfg, n_devices=n_devices, residual=residual,
                              family=family)

  @jax.jit
  def step(p, opt_state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    updates, opt_state = opt.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  out = dict(params)
  n = len(ys[0])
  for i in _dropped(plan, blocks):
    p = params[lm.block_key(i)]
    opt_state = opt.init(p)
    rng = np.random.default_rng([config.seed, i])
    for _ in range(config.steps):
      idx = rng.integers(0, n, min(config.batch, n))
      p, opt_state, _ = step(p, opt_state, _rows(xs[i], idx), ys[i][idx])
    out[lm.block_key(i)] = p
  return out, plan


def head_grouping(params: dict, plan: SyncPlan, calib_tokens, *, cfg, n_devices: int,
                  blocks: Sequence[int] | None = None, rounds: int = 3,
                  residual: str = "sum", family: Family = LM) -> tuple[dict, SyncPlan]:
  """Reorders each dropped block's heads to minimise its SPD output error.

  The dense model's function is unchanged (tested); the objective never
  increases, since only improving swaps are kept.
  """
  xs, ys = teacher_io(params, calib_tokens, cfg, family)
  g = cfg.n_heads // cfg.kv_heads
  # Units the search swaps between devices: whole KV groups, or -- when TP exceeds the
  # KV heads and each group spans several devices -- query heads within one group.
  by_group = n_devices <= cfg.kv_heads
  n_units = cfg.kv_heads if by_group else cfg.n_heads
  per_device = n_units // n_devices

  def swappable(perm, a, b):
    if a // per_device == b // per_device:
      return False  # same device: swapping changes nothing under SPD
    return by_group or perm[a] // g == perm[b] // g

  @jax.jit
  def objective(p_block, q_idx, x, y):
    return block_error(heads.reorder_block(p_block, cfg, q_idx), x, y, cfg, n_devices, residual,
                       family)

  out = dict(params)
  for i in _dropped(plan, blocks):
    p = params[lm.block_key(i)]
    perm = np.arange(n_units)
    err_of = lambda perm: float(objective(p, heads.query_indices(perm, cfg), xs[i], ys[i]))
    best = err_of(perm)
    for _ in range(rounds):
      improved = False
      for a in range(n_units):
        for b in range(a + 1, n_units):
          if not swappable(perm, a, b):
            continue
          cand = perm.copy()
          cand[a], cand[b] = cand[b], cand[a]
          err = err_of(cand)
          if err < best:
            perm, best, improved = cand, err, True
      if not improved:
        break
    out[lm.block_key(i)] = heads.permute_block(p, cfg, perm)
  return out, plan


def full_stack(params: dict, plan: SyncPlan, calib_tokens, *, cfg, n_devices: int,
               config: B2BConfig = B2BConfig(), residual: str = "sum",
               family: Family = LM) -> tuple[dict, SyncPlan]:
  """ZS + HG + B2B on every dropped block."""
  params, plan = head_grouping(params, plan, calib_tokens, cfg=cfg, n_devices=n_devices,
                               residual=residual, family=family)
  return b2b(params, plan, calib_tokens, cfg=cfg, n_devices=n_devices, config=config,
             residual=residual, family=family)
