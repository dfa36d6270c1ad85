"""A jitted optax training loop with resumable orbax checkpoints and JSONL metrics.

The loop is model-agnostic: it takes ``loss_fn(params, batch) -> (loss,
metrics)`` and ``batch_fn(step) -> batch``. Because the batch of every step is
a pure function of the step number, a run resumed from a checkpoint replays
exactly the batches an uninterrupted run would have seen, and reaches the same
parameters.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from core.checkpoint import CheckpointManager

PyTree = Any
LossFn = Callable[[PyTree, dict], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 64
  lr: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
  weight_decay: float = 0.01  # applied to matrices only, not norms or biases
  grad_clip: float = 1.0      # global-norm clipping; 0 disables
  seed: int = 0
  log_every: int = 50
  eval_every: int = 0         # 0: evaluate only at the end
  ckpt_every: int = 200       # used when a workdir is given

  def __post_init__(self):
    for f in ("steps", "batch_size", "log_every", "ckpt_every"):
      if getattr(self, f) < 1:
        raise ValueError(f"TrainConfig.{f} must be >= 1, got {getattr(self, f)}")
    if self.eval_every < 0:
      raise ValueError(f"TrainConfig.eval_every must be >= 0 (0: only at the end), got "
                       f"{self.eval_every}")
    if not 0 <= self.warmup_steps <= self.steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, steps={self.steps}]")
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"lr must be a finite positive number, got {self.lr}")
    for f in ("min_lr_ratio", "weight_decay", "grad_clip"):
      v = getattr(self, f)
      if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"TrainConfig.{f} must be finite and >= 0, got {v}")

  def identity(self) -> dict:
    """The fields that decide the trained parameters (not how often the run
    logs, evaluates or checkpoints): a resumed run must agree on all of them."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in _BOOKKEEPING}


_BOOKKEEPING = ("log_every", "eval_every", "ckpt_every")


class ConfigMismatchError(ValueError):
  """A workdir holds a run made with another config (see ``train(restart=)``)."""


@dataclasses.dataclass
class TrainResult:
  params: PyTree
  history: list[dict]        # every logged record, train and eval
  final_eval: dict           # eval_fn at the last step ({} without eval_fn)
  steps_per_sec: float       # measured in this process, after compilation
  resumed_from: int | None   # checkpoint step this run started from


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.steps, end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW with warmup+cosine, global-norm clipping, decay on ndim >= 2 leaves:
  the plain optax recipe, which ``train`` reproduces with a shared compilation."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(lr_schedule(cfg), weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)


# ``make_optimizer``'s state layout (so checkpoints written by either restore into
# the other) with no hyperparameter inside: the clipping slot is never applied and
# AdamW runs at lr 1, no decay. The train step clips, decays and scales by the
# learning rate itself, from traced values, so one compilation serves every recipe.
_ADAMW = optax.adamw(lambda count: 1.0, weight_decay=0.0, mask=_decay_mask)


def _layout(has_clip: bool) -> optax.GradientTransformation:
  return optax.chain(*([optax.clip_by_global_norm(1.0)] if has_clip else []), _ADAMW)


def step_hyperparams(cfg: TrainConfig) -> Callable[[int], dict[str, np.ndarray]]:
  """step -> the train step's traced scalars: that step's learning rate (optax's
  warmup+cosine, evaluated once for the run), weight decay, clipping norm."""
  lr = np.asarray(jax.vmap(lr_schedule(cfg))(jnp.arange(cfg.steps)), np.float32)
  wd, clip = np.float32(cfg.weight_decay), np.float32(cfg.grad_clip)
  return lambda step: {"lr": lr[step], "wd": wd, "clip": clip}


_STEPS: "collections.OrderedDict[tuple, Callable]" = collections.OrderedDict()
_STEP_CACHE_SIZE = 8   # compiled steps kept (their loss functions stay alive while cached)


def make_train_step(loss_fn: LossFn, has_clip: bool) -> Callable:
  """``step(state, batch, hp) -> (state, metrics)`` with ``hp`` this step's
  scalars (``step_hyperparams``), jitted once per ``loss_fn``
  (and parameter shapes) whatever the learning rate, decay or schedule length:
  equal to ``make_optimizer``'s update (tests/test_train.py checks it)."""
  try:
    key = (loss_fn, has_clip)
    hash(key)
  except TypeError:   # an unhashable callable (e.g. a non-frozen dataclass): not cached
    key = None
  if key in _STEPS:
    _STEPS.move_to_end(key)
    return _STEPS[key]

  @jax.jit
  def train_step(state, batch, hp):
    params = state["params"]
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    g_norm = optax.global_norm(grads)
    if has_clip:   # as optax.clip_by_global_norm, with a traced norm
      grads = jax.tree_util.tree_map(
          lambda t: jax.lax.select(g_norm < hp["clip"], t, (t / g_norm.astype(t.dtype))
                                   * hp["clip"]), grads)
    adam, inner = _ADAMW.update(grads, state["opt_state"][-1], params)   # -(Adam direction)
    lr = hp["lr"]
    updates = jax.tree_util.tree_map(lambda u, p, decay: lr * (u - hp["wd"] * p) if decay
                                     else lr * u, adam, params, _decay_mask(params))
    opt_state = (*state["opt_state"][:-1], inner)
    metrics = dict(metrics, grad_norm=g_norm)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
            "step": state["step"] + 1}, metrics

  if key is None:
    return train_step
  _STEPS[key] = train_step
  while len(_STEPS) > _STEP_CACHE_SIZE:
    _STEPS.popitem(last=False)
  return train_step


class MetricsLog:
  """Append-only JSONL of metric records; on resume, records past the restored
  step are dropped so the file reads as if the run had never stopped."""

  def __init__(self, path: str | None, resume_step: int | None):
    self.path = path
    self.records: list[dict] = []
    if path and os.path.exists(path):
      with open(path) as f:
        old = [json.loads(line) for line in f if line.strip()]
      self.records = [r for r in old if resume_step is not None and r["step"] <= resume_step]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.records)
      os.replace(tmp, path)

  def write(self, record: dict) -> None:
    self.records.append(record)
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


RUN_FILE = "run_config.json"


def _claim_workdir(workdir: str, identity: dict, restart: bool) -> None:
  """Records what run ``workdir`` holds; refuses to resume a different one."""
  identity = json.loads(json.dumps(identity, default=str))
  path = os.path.join(workdir, RUN_FILE)
  ckpts = os.path.join(workdir, "checkpoints")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != identity and not restart:
      # Name the fields that differ ("train.lr", "run.model_config"), not whole dicts.
      flat = lambda d: {f"{part}.{k}": v for part, sub in d.items() for k, v in (sub or {}).items()}
      old, new = flat(saved), flat(identity)
      diff = ", ".join(f"{k}: saved {old.get(k)!r}, now {new.get(k)!r}"
                       for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k))
      raise ConfigMismatchError(
          f"{workdir} holds a run made with another config ({diff}); resuming would mix the "
          "two. Use another workdir, or restart=True (--restart in the binaries) to discard "
          "the old run.")
  elif os.path.isdir(ckpts) and os.listdir(ckpts) and not restart:
    raise ConfigMismatchError(f"{workdir} holds checkpoints but no {RUN_FILE}, so there is no "
                              "telling what run they belong to; use restart=True to discard "
                              "them or another workdir")
  if restart:
    shutil.rmtree(ckpts, ignore_errors=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
      os.remove(metrics)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(identity, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _to_floats(metrics: dict) -> dict:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def train(loss_fn: LossFn, params: PyTree, batch_fn: Callable[[int], dict],
          cfg: TrainConfig, *, eval_fn: Callable[[PyTree], dict] | None = None,
          workdir: str | None = None, progress: bool = True, desc: str = "train",
          stop_after: int | None = None, run_meta: dict | None = None,
          restart: bool = False) -> TrainResult:
  """Trains ``params`` for ``cfg.steps`` steps, resuming from ``workdir`` if it
  holds a checkpoint of the same run: ``cfg.identity()`` and ``run_meta``
  (JSON-able, e.g. the model config) are stored beside the checkpoints, and a
  workdir made with others raises ``ConfigMismatchError`` unless ``restart``,
  which discards the old run and starts over. ``stop_after`` ends this call
  after that many steps (to test interruption; no checkpoint is written at
  the stop)."""
  state = {"params": params, "opt_state": _layout(cfg.grad_clip > 0).init(params),
           "step": jnp.asarray(0, jnp.int32)}
  mngr, resumed_from = None, None
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    _claim_workdir(workdir, {"train": cfg.identity(), "run": run_meta}, restart)
    mngr = CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = mngr.restore(state)
    if restored is not None:
      resumed_from, state = restored
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl") if workdir else None, resumed_from)
  train_step, hp = make_train_step(loss_fn, cfg.grad_clip > 0), step_hyperparams(cfg)
  start = int(state["step"])
  end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)

  final_eval: dict = {}
  t_compiled, n_timed = None, 0
  bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=desc,
             disable=not progress, dynamic_ncols=True,
             mininterval=0.1 if sys.stderr.isatty() else 10.0)
  for step in bar:
    state, metrics = train_step(state, batch_fn(step), hp(step))
    done = step + 1
    if t_compiled is None:
      jax.block_until_ready(state)
      t_compiled = time.perf_counter()
    else:
      n_timed += 1
    if done % cfg.log_every == 0 or done == cfg.steps:
      m = _to_floats(metrics)
      log.write({"step": done, "split": "train", **m})
      bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
    if eval_fn is not None and (done == cfg.steps or
                                (cfg.eval_every and done % cfg.eval_every == 0)):
      final_eval = _to_floats(eval_fn(state["params"]))
      log.write({"step": done, "split": "eval", **final_eval})
    if mngr is not None and (done % cfg.ckpt_every == 0 or done == cfg.steps):
      mngr.save(done, state)
  bar.close()
  if eval_fn is not None and not final_eval and end == cfg.steps:
    final_eval = _to_floats(eval_fn(state["params"]))  # resumed a finished run
  jax.block_until_ready(state)
  elapsed = time.perf_counter() - t_compiled if t_compiled else 0.0
  if mngr is not None:
    mngr.close()
  return TrainResult(params=state["params"], history=log.records, final_eval=final_eval,
                     steps_per_sec=n_timed / elapsed if elapsed > 0 else float("nan"),
                     resumed_from=resumed_from)
