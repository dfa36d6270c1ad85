"""The subcloning training-speed studies: a half-width child of a trained LM
(on KJV) and of a trained ViT (on Fashion-MNIST), trained from random init and
from the subcloned init with the same data order per seed.

Protocol, per model:
1. Sweep seed: random init over ``random_grid`` (the reference is the recipe
   with the lowest final loss) and the subcloned child over ``sub_grid`` (the
   best speed-up wins). Selection uses only ``sweep_seed``.
2. Report seeds (disjoint from the sweep seed): random vs subcloned at the
   chosen recipes; speed-up per seed.
3. Ablations and peers (LM; the chosen subcloned recipe, same budget, on the
   sweep seed and ``ablation_seeds``): each variant's speed-up against the
   random-init run of the same seed.
4. Iso-loss budget curves (``iso_budgets``; full mode): every init at the
   chosen recipe, trained to each budget with a schedule of that length, on the
   report seeds; the speed-up at the random run's final loss for budget b is b
   over the budget the other init needs for that loss (``subclone.isoloss``).
Every finished run is cached in a JSON file so an interrupted study resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax

from core import data, evaluation
from core.cache import RunCache, params_fingerprint
from core.checkpoint import CheckpointManager
from core.models import lm, vit
from core.recipes import classifier_loss
from subclone import isoloss, peers
from subclone.importance import lm_importance, vit_importance
from subclone.speedup import Budget, Recipe, speedup, train_run
from subclone.surgery import ChildSpec, child_config, subclone_lm, subclone_vit

ABLATIONS = ("no scaling", "first d' (no reordering)", "random indices", "remove last blocks",
             "weight selection (peer)", "block influence (peer)")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  budget: Budget
  random_grid: tuple[Recipe, ...]
  sub_grid: tuple[Recipe, ...]
  seeds: tuple[int, ...] = (1, 2, 3)
  sweep_seed: int = 0
  ablations: tuple[str, ...] = ABLATIONS
  ablation_seeds: tuple[int, ...] = ()  # besides the sweep seed
  depth_frac: float = 2 / 3      # child depth / parent depth (1 keeps every block)
  calib: int = 16                # calibration sequences / images for importance
  eval_size: int = 16            # validation windows (LM) / hundreds of test images (ViT)
  seq_len: int = 128
  iso_budgets: tuple[int, ...] = ()  # step 4; empty: skipped
  iso_seeds: tuple[int, ...] = (1, 2)
  # (random, subcloned) recipes: skip steps 1-3 and run step 4 at these (e.g. a
  # full study's earlier choice); None: steps 1-3 choose them.
  recipes: tuple[Recipe, Recipe] | None = None

  def __post_init__(self):
    if self.recipes is not None and not self.iso_budgets:
      raise ValueError("StudyConfig.recipes skips steps 1-3, so it needs iso_budgets (step 4)")


def child_spec(cfg: Any, depth_frac: float) -> ChildSpec:
  """About half the width (whole heads) and ``depth_frac`` of the depth."""
  return ChildSpec(d_model=cfg.d_model // 2, n_heads=max(1, cfg.n_heads // 2),
                   d_ff=cfg.d_ff // 2, n_layers=max(1, round(depth_frac * cfg.n_layers)))


def load_parent(workdir: str, config_cls=lm.LMConfig) -> tuple[dict, Any]:
  """Params and config of a model trained by a ``core.recipes`` run in ``workdir``."""
  with open(os.path.join(workdir, "summary.json")) as f:
    raw = json.load(f)["model_config"]
  if "input_shape" in raw:
    raw["input_shape"] = tuple(raw["input_shape"])
  cfg = config_cls(**raw)
  restored = CheckpointManager(os.path.join(workdir, "checkpoints")).restore(None)
  if restored is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
  return restored[1]["params"], cfg


def _nan_low(x: float) -> float:
  return -math.inf if x is None or math.isnan(x) else x


def _compare(children: dict[str, Callable[[], Any]], random_init: Callable[[int], Any],
             cfg: StudyConfig, run: Callable[[str, Any, Recipe, int], dict],
             select_run: Callable[[str, Any, Recipe, int], dict] | None = None) -> dict:
  """Steps 1-3 of the protocol for one model; ``children['subcloned']`` is the method.
  ``select_run`` (default ``run``) trains the sweep seed's runs, e.g. evaluated on a
  validation split where ``run`` evaluates on the test split."""
  select_run = select_run or run
  s0 = cfg.sweep_seed
  refs = {r.tag: select_run("random", lambda: random_init(s0), r, s0) for r in cfg.random_grid}
  rand = min(cfg.random_grid, key=lambda r: refs[r.tag]["final_loss"])
  ref0 = refs[rand.tag]
  subs = {r.tag: select_run("subcloned", children["subcloned"], r, s0) for r in cfg.sub_grid}
  sweep = {tag: speedup(ref0, r) for tag, r in subs.items()}
  best = max(cfg.sub_grid, key=lambda r: (_nan_low(sweep[r.tag]["speedup"]),
                                          -subs[r.tag]["final_loss"]))
  seeds = {}
  for s in cfg.seeds:
    ref, sub = run("random", lambda: random_init(s), rand, s), run("subcloned",
                                                                    children["subcloned"], best, s)
    seeds[s] = {"random": ref, "subcloned": sub, **speedup(ref, sub)}
  inits = {"subcloned": children["subcloned"]} | {n: children[n] for n in cfg.ablations}
  per_seed = {}
  for s in (s0, *cfg.ablation_seeds):
    r_fn = select_run if s == s0 else run
    ref = ref0 if s == s0 else run("random", lambda: random_init(s), rand, s)
    runs = {n: r_fn(n, init, best, s) for n, init in inits.items()} | {"random init": ref}
    per_seed[s] = {n: {**speedup(ref, r), "run": r} for n, r in runs.items()}
  # The sweep seed chose the recipe (best of the grid there), so its speed-ups are
  # flattered: the spread over seeds is over the other seeds only.
  spread = {n: [per_seed[s][n]["speedup"] for s in cfg.ablation_seeds] for n in per_seed[s0]}
  return {"random_recipe": dataclasses.asdict(rand), "random_sweep": refs,
          "sub_recipe": dataclasses.asdict(best), "sweep": sweep, "seeds": seeds,
          "variants": per_seed[s0], "variant_speedups": spread,
          "ablation_seeds": list(cfg.ablation_seeds)}


def _compare_or_fixed(children, random_init, cfg: StudyConfig, run, select_run=None) -> dict:
  if cfg.recipes is None:
    return _compare(children, random_init, cfg, run, select_run)
  rand, sub = cfg.recipes
  return {"random_recipe": dataclasses.asdict(rand), "sub_recipe": dataclasses.asdict(sub),
          "recipes_given": True}


# Bump when a change here alters what a cached run would contain.
CODE_VERSION = "subclone-study-2 (validation selection)"


def _run_meta(parent_cfg: Any, cfg: StudyConfig, parent: Any) -> dict:
  """What every cached run depends on: the parent (config and weights), the
  budget and this module's version. Recipes, seeds and variants are in the run
  keys, so widening a sweep or adding seeds reuses the finished runs."""
  keep = ("budget", "depth_frac", "calib", "eval_size", "seq_len")
  return {"parent": dataclasses.asdict(parent_cfg), "parent_weights": params_fingerprint(parent),
          "study": {k: v for k, v in dataclasses.asdict(cfg).items() if k in keep},
          "code": CODE_VERSION}


def _runner(cache: RunCache, init_loss: Callable, batch_fn: Callable, eval_fn: Callable,
            budget: Budget, progress: bool, key_prefix: str = ""
            ) -> Callable[[str, Any, Recipe, int], dict]:
  def run(name: str, init: Callable[[], Any], recipe: Recipe, seed: int) -> dict:
    return cache.get(f"{key_prefix}{name}|{recipe.tag}|seed{seed}", lambda: train_run(
        init(), init_loss, functools.partial(batch_fn, seed), eval_fn, recipe, budget, seed,
        desc=f"{name} {recipe.tag} seed {seed}", progress=progress))
  return run


def iso_runner(cache_path: str | None, meta: dict, init_loss: Callable, batch_fn: Callable,
               eval_fn: Callable, budget: Budget, progress: bool,
               final_fn: Callable[[Any], dict] | None = None) -> Callable:
  """Like ``_runner`` with the step budget as an argument: its own cache file,
  whose fingerprint leaves the study's step budget out (``meta['study']``)."""
  meta = {**meta, "study": {k: v for k, v in meta["study"].items() if k != "budget"},
          "batch": budget.batch, "warmup_frac": budget.warmup_frac}
  cache = RunCache(cache_path, meta)

  def run(name: str, init: Callable[[], Any], recipe: Recipe, seed: int, steps: int) -> dict:
    b = dataclasses.replace(budget, steps=steps, eval_every=max(10, steps // 10))
    return cache.get(f"{name}|{recipe.tag}|seed{seed}|steps{steps}", lambda: train_run(
        init(), init_loss, functools.partial(batch_fn, seed), eval_fn, recipe, b, seed,
        desc=f"{name} {recipe.tag} seed {seed} ({steps} steps)", progress=progress,
        final_fn=final_fn))
  return run


def iso_curves(inits: dict[str, tuple[Callable[[int], Any], Recipe]], run: Callable,
               budgets: tuple[int, ...], seeds: tuple[int, ...]) -> dict:
  """Step 4: ``inits`` maps a name to (init as a function of the seed, recipe);
  'random init' is the reference. ``run(name, init, recipe, seed, steps)``
  trains one run. Returns per init and seed the final losses at ``budgets``
  and the iso-loss speed-ups at the reference's final losses."""
  if "random init" not in inits:
    raise ValueError("iso_curves needs a 'random init' entry as the reference")
  if len(budgets) < 2:
    raise ValueError(f"an iso-loss curve needs at least 2 budgets, got {budgets}")
  finals = {name: {s: [run(name, lambda: init(s), recipe, s, b)["final_loss"] for b in budgets]
                   for s in seeds} for name, (init, recipe) in inits.items()}
  ref = finals["random init"]
  speedups = {name: {s: isoloss.speedup_curve((budgets, ref[s]), (budgets, f), ref[s])
                     for s, f in per.items()}
              for name, per in finals.items() if name != "random init"}
  return {"budgets": list(budgets), "seeds": list(seeds), "final_loss": finals,
          "speedup": speedups}


def _iso_path(cache_path: str | None) -> str | None:
  return None if cache_path is None else cache_path.removesuffix(".json") + "_iso.json"


def _iso_inits(children: dict, random_init: Callable, cfg: StudyConfig, out: dict) -> dict:
  """Step 4's inits at the recipes steps 1-3 chose (the children ignore the seed)."""
  rand, best = Recipe(**out["random_recipe"]), Recipe(**out["sub_recipe"])
  names = ["subcloned", *(n for n in cfg.ablations if n in children)]
  return {"random init": (random_init, rand)} | {
      n: ((lambda s, f=children[n]: f()), best) for n in names}


def lm_study(parent: dict, parent_cfg: lm.LMConfig, cfg: StudyConfig, cache_path: str | None,
             progress: bool = True) -> dict:
  """The LM study (protocol above) for a trained parent; returns JSON-ready results."""
  ds = data.load("kjv")
  windows = data.text_eval_windows(ds.x_test, cfg.seq_len, cfg.eval_size)
  calib = data.text_batch(ds.x_train, cfg.calib, cfg.seq_len, seed=4321, step=0)["tokens"][:, :-1]
  spec = child_spec(parent_cfg, cfg.depth_frac)
  imp = lm_importance(parent, calib, parent_cfg)
  sub = lambda **kw: subclone_lm(parent, parent_cfg, imp, spec, **kw)[0]
  ccfg = child_config(parent_cfg, spec)
  bi = peers.block_influence(parent, calib, parent_cfg)
  children = {
      "subcloned": sub,
      "no scaling": lambda: sub(scale=False),
      "first d' (no reordering)": lambda: sub(order="first"),
      "random indices": lambda: sub(order="random"),
      "remove last blocks": lambda: sub(blocks="last"),
      "weight selection (peer)": lambda: peers.weight_selection(parent, parent_cfg, spec)[0],
      "block influence (peer)": lambda: sub(blocks=peers.blocks_by_influence(bi, spec.n_layers)),
  }
  apply = functools.partial(lm.apply, cfg=ccfg)
  meta = _run_meta(parent_cfg, cfg, parent)
  # One loss function for every run of the study: core.train compiles its step once.
  loss_fn = functools.partial(lm.loss, cfg=ccfg)
  batch_fn = lambda seed, step: data.text_batch(ds.x_train, cfg.budget.batch, cfg.seq_len,
                                                seed, step)
  eval_fn = lambda p: evaluation.lm_metrics(apply, p, windows)["loss"]
  run = _runner(RunCache(cache_path, meta), loss_fn, batch_fn, eval_fn, cfg.budget, progress)
  random_init = lambda s: lm.init(jax.random.key(s), ccfg)
  out = _compare_or_fixed(children, random_init, cfg, run)
  if cfg.iso_budgets:
    iso_run = iso_runner(_iso_path(cache_path), meta, loss_fn, batch_fn, eval_fn, cfg.budget,
                         progress)
    out["iso"] = iso_curves(_iso_inits(children, random_init, cfg, out), iso_run,
                            cfg.iso_budgets, cfg.iso_seeds)
  return {"parent_config": dataclasses.asdict(parent_cfg), "child_config": dataclasses.asdict(ccfg),
          "block_influence": bi.tolist(), **out}


def vit_study(parent: dict, parent_cfg: vit.ViTConfig, ds: data.Dataset, cfg: StudyConfig,
              cache_path: str | None, progress: bool = True, *,
              val: tuple[Any, Any] | None = None) -> dict:
  """The ViT study: the subcloned child against random init (no ablations).

  ``ds`` is the training data the parent saw; ``val`` = (x, y) a validation
  split carved from training images (``data.holdout``): the sweep seed's runs
  are evaluated on it, so recipes are chosen there and the report seeds are
  evaluated on the test split. Without ``val`` the sweep uses the test split."""
  n_eval = min(len(ds.x_test), 100 * cfg.eval_size)
  x_eval, y_eval = ds.x_test[:n_eval], ds.y_test[:n_eval]
  spec = child_spec(parent_cfg, cfg.depth_frac)
  imp = vit_importance(parent, ds.x_train[:cfg.calib], parent_cfg)
  child, ccfg = subclone_vit(parent, parent_cfg, imp, spec)
  apply = functools.partial(vit.apply, cfg=ccfg)
  meta = {**_run_meta(parent_cfg, cfg, parent), "dataset": ds.name,
          "n_val": None if val is None else len(val[0])}
  cache = RunCache(cache_path, meta)
  loss_fn = classifier_loss(apply)   # one for every run: one compiled train step
  batch_fn = lambda seed, step: data.image_batch(ds, cfg.budget.batch, seed, step)
  eval_on = lambda x, y: lambda p: evaluation.classifier_metrics(apply, p, x, y)["loss"]
  make = lambda x, y, prefix: _runner(cache, loss_fn, batch_fn, eval_on(x, y), cfg.budget,
                                      progress, key_prefix=prefix)
  run = make(x_eval, y_eval, "")
  select_run = make(val[0][:n_eval], val[1][:n_eval], "val|") if val is not None else run
  random_init = lambda s: vit.init(jax.random.key(s), ccfg)
  children = {"subcloned": lambda: child}
  out = _compare_or_fixed(children, random_init, dataclasses.replace(cfg, ablations=()), run,
                          select_run)
  if cfg.iso_budgets:
    iso_run = iso_runner(_iso_path(cache_path), meta, loss_fn, batch_fn, eval_on(x_eval, y_eval),
                         cfg.budget, progress)
    out["iso"] = iso_curves(_iso_inits(children, random_init, cfg, out), iso_run,
                            cfg.iso_budgets, cfg.iso_seeds)
  return {"parent_config": dataclasses.asdict(parent_cfg), "child_config": dataclasses.asdict(ccfg),
          "dataset": ds.name, "selection": "validation" if val is not None else "test", **out}
