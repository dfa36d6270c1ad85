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
from core.cache import RunCache, params_fingerprint
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
  val_images: int = 500     # carved from training (at most a fifth of it) to choose the cell


def train_float(ds: data.Dataset, model: str, steps: int, plan: GridPlan, workdir: str | None,
                progress: bool = True):
  """The float model (trained, or resumed/loaded from ``workdir``)."""
  res = train_classifier(ds, model, TrainConfig(
      steps=steps, batch_size=64, lr=plan.float_lr, warmup_steps=max(1, steps // 10),
      log_every=max(1, steps // 20), ckpt_every=max(1, steps // 2)), workdir=workdir,
      progress=progress)
  return res.params, res.model_config


def _accuracy(apply, cb, x: np.ndarray, y: np.ndarray) -> float:
  return 100 * evaluation.classifier_metrics(apply, cb, x, y)["accuracy"]


def binomial_se(acc_pct: float, n: int) -> float:
  """Standard error (points) of an accuracy in percent measured on ``n`` images."""
  p = acc_pct / 100
  return 100 * float(np.sqrt(max(p * (1 - p), 0.0) / n))


def smallest_within(cells: dict, float_acc: float, bound: float, key: str = "val_after"):
  """(u, w) with the smallest table u*w whose accuracy (``key``, by default on
  the validation split) is within ``bound`` points of ``float_acc``."""
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


# Bump when a change here alters what a cached cell would contain.
CODE_VERSION = "rapidnn-grid-2 (validation selection)"


def cell_meta(plan: GridPlan, ds_name: str, model: str, params: Any) -> dict:
  """What every cached cell depends on (the grid's extent and the checks do not):
  the retraining recipe, the calibration size, the float weights themselves (a
  retrained float model invalidates the cells) and this module's version."""
  return {"retrain": dataclasses.asdict(plan.retrain), "calib_images": plan.calib_images,
          "ds": ds_name, "model": model, "val_images": plan.val_images,
          "float_params": params_fingerprint(params), "code": CODE_VERSION}


def grid_run(ds: data.Dataset, model: str, steps: int, plan: GridPlan, workdir: str | None,
             cache_path: str | None, progress: bool = True) -> tuple[dict, dict, Any]:
  """Every (u, w) cell for one (dataset, model): accuracy before and after
  retraining on a validation split carved from the training images (where the
  cell is chosen) and on the test split (where it is reported). The float model
  and the retraining never see the validation images. Returns (JSON-ready
  results, float params, model config)."""
  fit, x_val, y_val = data.holdout(ds, min(plan.val_images, len(ds.x_train) // 5))
  params, mcfg = train_float(fit, model, steps, plan, workdir, progress)
  ops = program(model, mcfg)
  acts = rapidnn.layer_activations(params, ops, fit.x_train[:plan.calib_images])
  codebook = lambda cfg: rapidnn.build(params, ops, None, cfg, activations=acts)
  apply = lambda cb, x: rapidnn.float_forward(cb, ops, x)
  float_apply = lambda p, x: CLASSIFIERS[model].apply(p, x, mcfg)
  float_val = _accuracy(float_apply, params, x_val, y_val)
  float_test = _accuracy(float_apply, params, ds.x_test, ds.y_test)
  cache = RunCache(cache_path, cell_meta(plan, ds.name, model, params))
  cells = {}
  pairs = [(u, w) for u in plan.sizes for w in plan.sizes]
  for u, w in tqdm(pairs, desc=f"{model}/{ds.name} grid", disable=not progress):
    def cell(u=u, w=w):
      cb = codebook(rapidnn.RapidConfig(u=u, w=w))
      cb_rt = retrain(cb, ops, fit, plan.retrain)
      return {"val_before": _accuracy(apply, cb, x_val, y_val),
              "val_after": _accuracy(apply, cb_rt, x_val, y_val),
              "before": _accuracy(apply, cb, ds.x_test, ds.y_test),
              "after": _accuracy(apply, cb_rt, ds.x_test, ds.y_test)}
    cells[(u, w)] = cache.get(f"u{u}_w{w}", cell)
  best = smallest_within(cells, float_val, plan.bound)
  chosen = best or (max(plan.sizes), max(plan.sizes))
  cb = retrain(codebook(rapidnn.RapidConfig(*chosen)), ops, fit, plan.retrain)
  check = emulator_check(cb, ops, params, model, mcfg, ds.x_test[:plan.check_images])
  # The third knob: snap pre-activations to a few levels before the ReLU (no retraining).
  levels = {a: _accuracy(apply, codebook(rapidnn.RapidConfig(*chosen, act_levels=a)),
                         ds.x_test, ds.y_test) for a in plan.act_levels}
  res = {"dataset": ds.name, "model": model, "float_acc": float_test, "float_val": float_val,
         "n_val": len(x_val), "n_test": len(ds.x_test),
         "weights": sum(int(np.prod(p["kernel"].shape)) for p in params.values()),
         "cells": {f"{u},{w}": c for (u, w), c in cells.items()}, "chosen": list(chosen),
         "within_bound": best is not None,
         "check": check, "act_levels": {str(a): v for a, v in levels.items()},
         "chosen_before": cells[chosen]["before"]}
  return res, params, mcfg


def kmeans_benchmark(values: dict[str, np.ndarray], ks: tuple[int, ...], seeds: int = 3,
                     max_iter: int = 100, tol: float = 1e-4) -> list[dict]:
  """JAX k-means vs scikit-learn's KMeans (Lloyd, k-means++, one init), both at
  the same ``max_iter`` and relative ``tol``, on each array of ``values`` ((N,)
  or (N, D)). Per side, over ``seeds`` seeds run interleaved: median warm wall
  time, median inertia and iterations; JAX's cold time is its first call for
  that shape (compilation included). 1-D data takes JAX's sorted binary-search
  assignment; D > 1 takes the brute-force (N, k, D) one."""
  from sklearn.cluster import KMeans
  rows = []
  for name, v in values.items():
    v = np.asarray(v, np.float32)
    x2 = v[:, None] if v.ndim == 1 else v
    for k in ks:
      jax.clear_caches()  # cold means compiled here, even if the grid used this shape
      t0 = time.perf_counter()
      kmeans(v, k, seed=0, max_iter=max_iter, tol=tol)
      cold = time.perf_counter() - t0
      jx, sk = [], []
      for s in range(seeds):  # interleaved, so drift hits both sides
        t0 = time.perf_counter()
        r = kmeans(v, k, seed=s, max_iter=max_iter, tol=tol)
        jx.append((time.perf_counter() - t0, r.inertia, r.n_iter))
        t0 = time.perf_counter()
        m = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=s, algorithm="lloyd",
                   max_iter=max_iter, tol=tol).fit(x2)
        sk.append((time.perf_counter() - t0, float(m.inertia_), int(m.n_iter_)))
      med = lambda rs, i: float(np.median([r[i] for r in rs]))
      rows.append({"data": name, "n": len(x2), "d": x2.shape[1], "k": k, "seeds": seeds,
                   "max_iter": max_iter, "tol": tol, "jax_first_s": cold,
                   "jax_s": med(jx, 0), "sklearn_s": med(sk, 0),
                   "jax_inertia": med(jx, 1), "sklearn_inertia": med(sk, 1),
                   "jax_iters": med(jx, 2), "sklearn_iters": med(sk, 2)})
  return rows


def image_patches(x_NxHxWx1: np.ndarray, size: int = 4, n: int = 20000, seed: int = 0
                  ) -> np.ndarray:
  """``n`` random ``size`` x ``size`` patches of the images, flattened: a
  (n, size^2) multi-dimensional k-means problem, where no 1-D shortcut applies."""
  rng = np.random.default_rng(seed)
  _, h, w, _ = x_NxHxWx1.shape
  i = rng.integers(0, len(x_NxHxWx1), n)
  r, c = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
  grid = np.arange(size)
  rows = (r[:, None, None] + grid[None, :, None])
  cols = (c[:, None, None] + grid[None, None, :])
  return x_NxHxWx1[i[:, None, None], rows, cols, 0].reshape(n, size * size).astype(np.float32)


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
