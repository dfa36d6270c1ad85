"""Training-speed study: a child LM trained from a subcloned init vs from random
init, same data order. Speed-up = steps random init needs to reach its own
final validation loss / steps the subcloned child needs to reach that loss."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax

from core import data, evaluation
from core.checkpoint import CheckpointManager
from core.models import lm
from core.train import TrainConfig, train
from subclone.importance import lm_importance
from subclone.surgery import ChildSpec, subclone_lm


@dataclasses.dataclass(frozen=True)
class SpeedupConfig:
  spec: ChildSpec
  steps: int = 300
  batch: int = 16
  seq_len: int = 128
  eval_every: int = 25
  eval_windows: int = 16
  random_lr: float = 3e-3     # the usual recipe for random init
  random_wd: float = 0.1
  sub_lr: float = 1e-3        # subcloned children want a lower lr and weight decay
  sub_wd: float = 0.001
  seeds: tuple[int, ...] = (0,)
  calib_seqs: int = 16


def steps_to_reach(history: list[dict], target: float) -> int | None:
  """First evaluated step whose validation loss is <= ``target`` (None: never)."""
  for r in history:
    if r["split"] == "eval" and r["loss"] <= target:
      return r["step"]
  return None


def load_parent(workdir: str) -> tuple[dict, lm.LMConfig]:
  """Params and config of an LM trained by ``experiments.train_lm`` in ``workdir``."""
  with open(os.path.join(workdir, "summary.json")) as f:
    cfg = lm.LMConfig(**json.load(f)["model_config"])
  restored = CheckpointManager(os.path.join(workdir, "checkpoints")).restore(None)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
  return restored[1]["params"], cfg


def lm_speedup(parent: dict, parent_cfg: lm.LMConfig, cfg: SpeedupConfig,
               progress: bool = True) -> dict:
  """Per seed: initial and final losses, steps to target, speed-up; plus the curves."""
  ds = data.load("kjv")
  windows = data.text_eval_windows(ds.x_test, cfg.seq_len, cfg.eval_windows)
  calib = data.text_batch(ds.x_train, cfg.calib_seqs, cfg.seq_len, seed=4321, step=0)["tokens"]
  child, ccfg = subclone_lm(parent, parent_cfg, lm_importance(parent, calib[:, :-1], parent_cfg),
                            cfg.spec)
  apply = functools.partial(lm.apply, cfg=ccfg)
  eval_fn = lambda p: {"loss": evaluation.lm_metrics(apply, p, windows)["loss"]}
  loss_fn = functools.partial(lm.loss, cfg=ccfg)
  out = {"child_config": dataclasses.asdict(ccfg), "seeds": {}}
  for seed in cfg.seeds:
    batch_fn = lambda s, seed=seed: data.text_batch(ds.x_train, cfg.batch, cfg.seq_len, seed, s)
    runs = {}
    for name, init, lr, wd in (("random", lm.init(jax.random.key(seed), ccfg), cfg.random_lr,
                                cfg.random_wd), ("subcloned", child, cfg.sub_lr, cfg.sub_wd)):
      tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=lr, weight_decay=wd,
                         warmup_steps=max(1, cfg.steps // 10), seed=seed,
                         eval_every=cfg.eval_every, log_every=cfg.eval_every)
      res = train(loss_fn, init, batch_fn, tcfg, eval_fn=eval_fn, progress=progress,
                  desc=f"{name} seed {seed}")
      runs[name] = {"initial_loss": eval_fn(init)["loss"], "final_loss": res.final_eval["loss"],
                    "curve": [(r["step"], r["loss"]) for r in res.history if r["split"] == "eval"],
                    "history": res.history}
    target = runs["random"]["final_loss"]
    n_random = steps_to_reach(runs["random"]["history"], target)
    n_sub = steps_to_reach(runs["subcloned"]["history"], target)
    for r in runs.values():
      del r["history"]
    out["seeds"][seed] = {**runs, "target": target, "steps_random": n_random,
                          "steps_subcloned": n_sub,
                          "speedup": n_random / n_sub if n_sub else float("nan")}
  return out
