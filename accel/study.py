"""The RAPIDNN quality study: float model vs the clustered datapath over a
(u, w) grid, before and after centroid-preserving retraining; the smallest
tables within the paper's 0.3-point quality bound; an emulator cross-check
and throughput; JAX k-means against scikit-learn on the layers' own data.

Grid accuracies come from ``float_forward`` (the centroid-substituted float
network); ``emulate`` -- the lookup datapath itself -- is run on the chosen
cell and must agree with it (the exactness test pins this in CI).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from accel import rapidnn
from accel.kmeans import kmeans
from accel.program import linear_layers, program
from accel.retrain import RetrainConfig, retrain
from core import data, evaluation
from core.cache import RunCache
from core.models import CLASSIFIERS
from core.recipes import train_classifier
from core.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class GridPlan:
  runs: tuple[tuple[str, str, int], ...]   # (dataset, model, float training steps)
  sizes: tuple[int, ...] = (4, 8, 16, 32, 64)
  retrain: RetrainConfig = RetrainConfig()
  calib_images: int = 512
  bound: float = 0.3        # accuracy points of quality loss allowed (the paper's < 0.3%)
  check_images: int = 512   # emulator cross-check and throughput
  act_levels: tuple[int, ...] = (4, 8, 16, 32)  # activation tables tried at the chosen cell
  float_lr: float = 2e-3


def train_float(ds: data.Dataset, model: str, steps: int, plan: GridPlan, workdir: str | None,
                progress: bool = True):
  """The float model (trained, or resumed/loaded from ``workdir``)."""
  res = train_classifier(ds, model, TrainConfig(
      steps=steps, batch_size=64, lr=plan.float_lr, warmup_steps=max(1, steps // 10),
      log_every=max(1, steps // 20), ckpt_every=max(1, steps // 2)), workdir=workdir,
      progress=progress)
  return res.params, res.model_config, 100 * res.metrics["accuracy"]


def _accuracy(apply, cb, ds: data.Dataset) -> float:
  return 100 * evaluation.classifier_metrics(apply, cb, ds.x_test, ds.y_test)["accuracy"]


def smallest_within(cells: dict, float_acc: float, bound: float, key: str = "after"):
  """(u, w) with the smallest table u*w whose accuracy is within ``bound`` points."""
  ok = [(u * w, max(u, w), u, w) for (u, w), c in cells.items() if c[key] >= float_acc - bound]
  return min(ok)[2:] if ok else None


def _time(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def emulator_check(cb, ops, params, model: str, mcfg, x: np.ndarray, reps: int = 5) -> dict:
  """Lookup datapath vs centroid-substituted float network on ``x``: prediction
  agreement, largest logit gap; images/s of the emulator and of the float model."""
  x = jnp.asarray(x)
  emu = rapidnn.emulate(cb, x, ops)
  ref = jax.jit(functools.partial(rapidnn.float_forward, ops=ops))(cb, x=x)
  float_fn = jax.jit(functools.partial(CLASSIFIERS[model].apply, cfg=mcfg))
  float_fn(params, x).block_until_ready()
  t_emu, t_float = [], []
  for _ in range(reps):  # interleaved, so drift hits both
    t_emu.append(_time(lambda: rapidnn.emulate(cb, x, ops)))
    t_float.append(_time(lambda: float_fn(params, x)))
  n = len(x)
  return {"agree": float(jnp.mean(emu.argmax(-1) == ref.argmax(-1))),
          "max_logit_diff": float(jnp.max(jnp.abs(emu - ref))),
          "emulator_img_s": n / float(np.median(t_emu)),
          "float_img_s": n / float(np.median(t_float))}


def cell_meta(plan: GridPlan, ds_name: str, model: str, float_acc: float) -> dict:
  """What every cached cell depends on (the grid's extent and the checks do not)."""
  return {"retrain": dataclasses.asdict(plan.retrain), "calib_images": plan.calib_images,
          "ds": ds_name, "model": model, "float_acc": round(float_acc, 4)}


def grid_run(ds: data.Dataset, model: str, steps: int, plan: GridPlan, workdir: str | None,
             cache_path: str | None, progress: bool = True) -> tuple[dict, dict, Any]:
  """Every (u, w) cell for one (dataset, model): accuracy before and after
  retraining. Returns (JSON-ready results, float params, model config)."""
  params, mcfg, float_acc = train_float(ds, model, steps, plan, workdir, progress)
  ops = program(model, mcfg)
  acts = rapidnn.layer_activations(params, ops, ds.x_train[:plan.calib_images])
  codebook = lambda cfg: rapidnn.build(params, ops, None, cfg, activations=acts)
  apply = lambda cb, x: rapidnn.float_forward(cb, ops, x)
  cache = RunCache(cache_path, cell_meta(plan, ds.name, model, float_acc))
  cells = {}
  pairs = [(u, w) for u in plan.sizes for w in plan.sizes]
  for u, w in tqdm(pairs, desc=f"{model}/{ds.name} grid", disable=not progress):
    def cell(u=u, w=w):
      cb = codebook(rapidnn.RapidConfig(u=u, w=w))
      before = _accuracy(apply, cb, ds)
      after = _accuracy(apply, retrain(cb, ops, ds, plan.retrain), ds)
      return {"before": before, "after": after}
    cells[(u, w)] = cache.get(f"u{u}_w{w}", cell)
  best = smallest_within(cells, float_acc, plan.bound)
  chosen = best or (max(plan.sizes), max(plan.sizes))
  cb = retrain(codebook(rapidnn.RapidConfig(*chosen)), ops, ds, plan.retrain)
  check = emulator_check(cb, ops, params, model, mcfg, ds.x_test[:plan.check_images])
  # The third knob: snap pre-activations to a few levels before the ReLU (no retraining).
  levels = {a: _accuracy(apply, codebook(rapidnn.RapidConfig(*chosen, act_levels=a)), ds)
            for a in plan.act_levels}
  res = {"dataset": ds.name, "model": model, "float_acc": float_acc,
         "weights": sum(int(np.prod(p["kernel"].shape)) for p in params.values()),
         "cells": {f"{u},{w}": c for (u, w), c in cells.items()}, "chosen": list(chosen),
         "within_bound": best is not None,
         "check": check, "act_levels": {str(a): v for a, v in levels.items()},
         "chosen_before": cells[chosen]["before"]}
  return res, params, mcfg


def kmeans_benchmark(values: dict[str, np.ndarray], ks: tuple[int, ...], reps: int = 3,
                     seed: int = 0) -> list[dict]:
  """JAX k-means vs scikit-learn's KMeans (Lloyd, k-means++, one init) on the
  same 1-D data: wall time (JAX warm, and its first call with compilation) and inertia."""
  from sklearn.cluster import KMeans
  rows = []
  for name, v in values.items():
    v = np.asarray(v, np.float32).reshape(-1)
    for k in ks:
      t0 = time.perf_counter()
      res = kmeans(v, k, seed=seed)
      first = time.perf_counter() - t0
      t_jax, t_sk, sk = [], [], None
      for r in range(reps):  # interleaved
        t0 = time.perf_counter()
        res = kmeans(v, k, seed=seed)
        t_jax.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sk = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed + r,
                    algorithm="lloyd").fit(v[:, None])
        t_sk.append(time.perf_counter() - t0)
      rows.append({"data": name, "n": len(v), "k": k, "jax_s": float(np.median(t_jax)),
                   "jax_first_s": first, "sklearn_s": float(np.median(t_sk)),
                   "jax_inertia": res.inertia, "sklearn_inertia": float(sk.inertia_),
                   "jax_iters": res.n_iter, "sklearn_iters": int(sk.n_iter_)})
  return rows


def layer_values(params: dict, ops, x_calib: np.ndarray, max_points: int = 65536,
                 seed: int = 0) -> dict[str, Any]:
  """Each linear layer's weights and (sampled) float inputs: what RAPIDNN clusters."""
  seen = rapidnn.layer_activations(params, ops, x_calib)
  rng = np.random.default_rng(seed)
  out = {}
  for n in linear_layers(ops):
    out[f"{n} weights"] = np.asarray(params[n]["kernel"]).reshape(-1)
    v = np.asarray(seen[n]["input"]).reshape(-1)
    out[f"{n} inputs"] = rng.choice(v, min(max_points, len(v)), replace=False)
  return out
