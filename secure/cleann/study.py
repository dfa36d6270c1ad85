"""The CLEANN study: backdoored victims, the shield and its peers on the same
held-out images, the defender-set size, the adaptive attacker, the
fixed-point datapath, the FPGA model and the OMP benchmark. Computes records
(JSON-able dicts); ``section`` renders them.

Development vs report: the shield's hyperparameters were chosen on victims
trained with seed 0 on mnist5k (see ``shield.ShieldConfig``); the reported
victims use other seeds (``Plan.seeds``), and every number comes from the
held-out test split.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from core.cache import RunCache
from secure import combine, detection, sparse
from secure.cleann import (adaptive, consistency, fixed_point, fpga_model, neural_cleanse,
                           shield, strip, victims)

CODE_VERSION = "cleann-4"


@dataclasses.dataclass(frozen=True)
class Plan:
  datasets: tuple[str, ...] = ("mnist5k", "fashion_mnist")
  model: str = "cnn"
  triggers: tuple[str, ...] = ("patch", "patch_anywhere", "blend", "sig", "warp")
  rates: tuple[float, ...] = (0.05,)
  extra: tuple[tuple[str, float], ...] = (("blend", 0.01),)   # (trigger, rate) beyond the grid
  seeds: tuple[int, ...] = (1,)
  max_test: int | None = 2000     # test images per victim (the first; None: all)
  steps: dict = dataclasses.field(default_factory=lambda: {"mnist5k": 1500,
                                                           "fashion_mnist": 3000})
  shield: shield.ShieldConfig = shield.ShieldConfig()
  strip: strip.StripConfig = strip.StripConfig()
  nc: neural_cleanse.NCConfig = neural_cleanse.NCConfig()
  peers: tuple[str, ...] = ("strip", "nc", "scale_up", "teco", "ibd_psc")
  defender_sizes: tuple[int, ...] = ()
  adaptive: adaptive.AdaptiveConfig = adaptive.AdaptiveConfig()
  adaptive_on: tuple[str, ...] = ()
  fixed_bits: tuple[int, ...] = (4, 6, 8, 10, 12, 16)
  fixed_on: tuple[str, ...] = ()
  resplits: int = 200             # bootstrap re-draws of the validation images
  bench_signals: int = 4096
  bench_reps: int = 5


_SHIELDS: dict = {}   # (victim tag, workdir, shield config) -> fitted shield, this process


def _shield_for(v: victims.Victim, plan: Plan, workdir: str | None) -> shield.Shield:
  """The shield of a victim, fitted once per process (the adaptive run and the
  OMP benchmark reuse the one fitted for the victim's own run)."""
  key = (v.cfg.tag, workdir, repr(plan.shield))
  if key not in _SHIELDS:
    _SHIELDS[key] = shield.fit(v, plan.shield)
  return _SHIELDS[key]


def _thin(curve: dict, n: int = 120) -> dict:
  """A ROC curve with at most ``n`` points (for the JSON and the plot)."""
  idx = np.unique(np.linspace(0, len(curve["fpr"]) - 1, n).astype(int))
  return {"auc": curve["auc"], "fpr": np.asarray(curve["fpr"])[idx].tolist(),
          "tpr": np.asarray(curve["tpr"])[idx].tolist()}


def _held_out(v: victims.Victim, plan: Plan):
  """(clean x, y, triggered x, true y): the first ``max_test`` test images and
  the triggered versions of the non-target ones among them."""
  n = plan.max_test or len(v.ds.x_test)
  x, y = v.ds.x_test[:n], v.ds.y_test[:n]
  keep = y != v.cfg.target
  return x, y, v.trigger(x[keep]), y[keep]


def evaluate_detector(score: Callable[[np.ndarray], np.ndarray], thresholds: dict,
                      v: victims.Victim, held: tuple) -> dict:
  """BackdoorBench's metrics for a detect-and-reject defence (a flagged input
  gets no label: it counts against C-Acc and never as recovered)."""
  x_c, y_c, x_t, y_t = held
  t0 = time.perf_counter()
  s_trig = score(x_t)
  ms = 1e3 * (time.perf_counter() - t0) / len(x_t)
  s_clean = score(x_c)
  pred_t, pred_c = v.predict(x_t), v.predict(x_c)
  out = {"ms_per_image": ms, "roc": _thin(detection.roc(s_clean, s_trig))}
  for f, thr in thresholds.items():
    ft, fc = s_trig > thr, s_clean > thr
    out[f"fpr{f:g}"] = {"tpr": 100 * float(ft.mean()), "fpr_test": 100 * float(fc.mean()),
                        "ra": 100 * float(np.mean(~ft & (pred_t == y_t))),
                        "asr_after": 100 * float(np.mean(~ft & (pred_t == v.cfg.target))),
                        "c_acc_after": 100 * float(np.mean(~fc & (pred_c == y_c)))}
  return out


def shield_record(sh: shield.Shield, v: victims.Victim, held: tuple) -> dict:
  x_c, y_c, x_t, y_t = held
  shield.warm_up(sh, x_t[:64])
  m, s_clean, s_trig = shield.evaluate(sh, x_c, y_c, x_t, y_t, v.cfg.target,
                                       return_scores=True)
  m["roc"] = {k: _thin(r) for k, r in m["roc"].items()}
  return m, s_clean, s_trig


def resplit_record(sh: shield.Shield, s_val, s_clean, s_trig, n: int, seed: int = 0) -> dict:
  """The threshold's variability over the defender's validation draw: the
  combination re-fitted on ``n`` bootstrap re-draws of the validation
  images' scores, and the test FPR / TPR it gives at each target FPR
  (10th / 50th / 90th percentiles)."""
  rng = np.random.default_rng(seed)
  out = {}
  for f in sh.combiners:
    fp, tp = [], []
    for _ in range(n):
      c = combine.fit(s_val[rng.integers(0, len(s_val), len(s_val))], sh.cfg.rule, f)
      fp.append(100 * np.mean(c.flags(s_clean)))
      tp.append(100 * np.mean(c.flags(s_trig)))
    out[f"{f:g}"] = {"fpr_test": np.percentile(fp, [10, 50, 90]).tolist(),
                     "tpr": np.percentile(tp, [10, 50, 90]).tolist()}
  return out


def peer_records(v: victims.Victim, plan: Plan, x_fit, x_val, held) -> dict:
  """Every peer of ``plan.peers`` on the same victim and images."""
  out = {}
  params = v.params
  for name in plan.peers:
    t0 = time.perf_counter()
    if name == "strip":
      d = strip.fit(v.apply, x_fit, x_val, plan.strip)
    elif name == "nc":
      d = neural_cleanse.fit(v.apply, v.features, x_fit, x_val, v.ds.num_classes, plan.nc)
    elif name == "scale_up":
      d = consistency.fit(consistency.ScaleUp(v.classifier.apply, params), x_val)
    elif name == "teco":
      d = consistency.fit(consistency.TeCo(v.classifier.apply, params), x_val)
    elif name == "ibd_psc":
      d = consistency.fit(consistency.IbdPsc(v.classifier.apply, params), x_val)
    else:
      raise ValueError(f"unknown peer {name!r}")
    fit_s = time.perf_counter() - t0
    out[name] = evaluate_detector(d.scores, d.thresholds, v, held) | {"fit_s": fit_s}
    if name == "nc":
      out[name] |= {"anomaly_index": d.anomaly_index, "suspect": d.suspect,
                    "infected": bool(d.infected)}
  return out


def victim_run(cfg: victims.VictimConfig, plan: Plan, workdir: str | None,
               progress: bool) -> dict:
  """Everything measured on one backdoored victim."""
  v = victims.build(cfg, workdir=workdir, progress=progress)
  rec = {"victim": dataclasses.asdict(cfg), "threat": victims.threat(v),
         "n_defender": len(v.defender_x)}
  held = _held_out(v, plan)
  rec["held_out"] = {"n_clean": len(held[0]), "n_attack": len(held[2])}
  t0 = time.perf_counter()
  sh = _shield_for(v, plan, workdir)
  rec["shield_fit_s"] = time.perf_counter() - t0
  rec["shield"], s_clean, s_trig = shield_record(sh, v, held)
  x_fit, x_val = victims.defender_split(v.defender_x, plan.shield.fit_fraction)
  rec["resplits"] = resplit_record(sh, sh.module_scores(x_val), s_clean, s_trig, plan.resplits)
  rec["peers"] = peer_records(v, plan, x_fit, x_val, held)
  if cfg.rate == plan.rates[0] and plan.defender_sizes:
    sizes = {}
    for n in plan.defender_sizes:
      if n > len(v.defender_x):
        continue
      m = rec["shield"] if n == len(v.defender_x) else shield.evaluate(
          shield.fit(v, plan.shield, defender_x=v.defender_x[:n]), *held, v.cfg.target)
      sizes[str(n)] = {"auc": m["roc"][plan.shield.rule]["auc"],
                       **{f"tpr{f:g}": m[f"{plan.shield.rule}{f:g}"]["tpr"] for f in (0.01, 0.05)},
                       **{f"ra{f:g}": m[f"{plan.shield.rule}{f:g}"]["ra"] for f in (0.01, 0.05)}}
    rec["defender_sizes"] = sizes
  if cfg.trigger in plan.fixed_on and cfg.rate == plan.rates[0]:
    rec["fixed_point"] = fixed_point_sweep(sh, v, x_val, held, plan.fixed_bits)
  return rec


def fixed_point_sweep(sh: shield.Shield, v: victims.Victim, x_val, held, bits) -> list[dict]:
  """Input-analyzer detection (threshold re-set on the validation split, as a
  deployed datapath would be calibrated) and recovery against word length
  (all three formats at the same width)."""
  x_clean, _, x_trig, y_att = held
  ranges = fixed_point.calibrate_ranges(sh.input, x_val)
  out = []
  for b in (*bits, None):
    if b is None:
      an = sh.input
      score, rec = an.score, lambda x: an.reconstruct(x, tol=None)
    else:
      fp = fixed_point.FixedPointAnalyzer(sh.input, fixed_point.FixedPoint(b, b, b), ranges)
      score, rec = fp.score, fp.reconstruct
    thr = detection.threshold_for_fpr(score(x_val), 0.01)
    s_t, s_c = score(x_trig), score(x_clean)
    out.append({"bits": b or 32, "tpr1": 100 * float(np.mean(s_t > thr)),
                "fpr_test": 100 * float(np.mean(s_c > thr)),
                "auc": detection.roc(s_c, s_t)["auc"],
                "recovery": 100 * float(np.mean(v.predict(rec(x_trig)) == y_att))})
  return out


def adaptive_run(dataset: str, plan: Plan, workdir: str | None, progress: bool) -> dict:
  """The adaptive attacker against the patch victim of ``dataset``."""
  cfg = victims.VictimConfig(dataset=dataset, model=plan.model, trigger="patch",
                             rate=plan.rates[0], steps=plan.steps[dataset], seed=plan.seeds[0])
  v = victims.build(cfg, workdir=workdir, progress=progress)
  sh = _shield_for(v, plan, workdir)
  trig, hist = adaptive.adaptive_trigger(v, sh, plan.adaptive)
  x_c, y_c, _, y_t = _held_out(v, plan)
  before = shield.evaluate(sh, x_c, y_c, trig(x_c[y_c != cfg.target]), y_t, cfg.target)
  v2 = victims.build(cfg, workdir=workdir, progress=progress, trigger=trig,
                     tag=cfg.tag + "_adaptive")
  sh2 = shield.fit(v2, plan.shield)
  rec = shield_record(sh2, v2, _held_out(v2, plan))[0]
  return {"dataset": dataset, "history": hist, "linf": float(np.abs(trig.delta).max()),
          "threat": victims.threat(v2), "shield": rec,
          "on_original_victim": {"asr": before["asr_before"],
                                 "tpr1": before[f"{plan.shield.rule}0.01"]["tpr"]},
          "delta": trig.delta[..., 0].round(4).tolist()}


def omp_benchmark(an_dictionary: np.ndarray, signals: np.ndarray, n_nonzero: int,
                  reps: int) -> dict:
  """Batched JAX OMP vs scikit-learn's ``orthogonal_mp_gram`` on the same
  signals and dictionary (same sparsity, no tolerance), interleaved; cold =
  the first JAX call after clearing compilation caches."""
  from sklearn.linear_model import orthogonal_mp_gram
  d = np.asarray(an_dictionary, np.float64)
  x = np.asarray(signals, np.float32)
  gram, xy = d @ d.T, d @ x.T.astype(np.float64)
  jax.clear_caches()
  t0 = time.perf_counter()
  codes = jax.block_until_ready(sparse.omp(x, d, n_nonzero))
  cold = time.perf_counter() - t0
  jt, st = [], []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(sparse.omp(x, d, n_nonzero))
    jt.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = orthogonal_mp_gram(gram, xy, n_nonzero_coefs=n_nonzero, copy_Gram=True, copy_Xy=True)
    st.append(time.perf_counter() - t0)
  ref = np.asarray(ref).T
  same_support = float(np.mean(np.all((np.asarray(codes) != 0) == (ref != 0), axis=1)))
  return {"n": len(x), "features": x.shape[1], "atoms": len(d), "k": n_nonzero, "reps": reps,
          "jax_warm_s": float(np.median(jt)), "jax_cold_s": cold,
          "sklearn_s": float(np.median(st)), "speedup": float(np.median(st) / np.median(jt)),
          "support_agreement": same_support,
          "median_coef_diff": float(np.median(np.abs(np.asarray(codes) - ref).max(axis=1)))}


def fpga_record(plan: Plan, image_hw=(28, 28), latent_features: int = 128) -> dict:
  from secure.cleann import analyzers
  cfg = plan.shield
  n_patches = len(analyzers._starts(image_hw[0], cfg.patch.size, cfg.patch.stride)) * len(
      analyzers._starts(image_hw[1], cfg.patch.size, cfg.patch.stride))
  out = {}
  for b in (8, 16):
    w = fpga_model.Workload(n_patches, cfg.patch.size, cfg.input_dict.n_atoms,
                            cfg.input_dict.n_nonzero, latent_features,
                            cfg.latent_dict.n_atoms, cfg.latent_dict.n_nonzero, b, b)
    out[str(b)] = fpga_model.estimate(w)
  return out


def run(plan: Plan, outdir: str, mode: str, progress: bool = True) -> dict:
  """All records of ``plan`` (resumable: finished runs are cached)."""
  workdir = os.path.join(outdir, "models", f"cleann_{mode}")
  cache = RunCache(os.path.join(outdir, "cleann", f"{mode}.json"),
                   meta={"plan": dataclasses.asdict(plan), "code": CODE_VERSION})
  skipped, runs = [], []
  grid = [(t, r) for t in plan.triggers for r in plan.rates] + list(plan.extra)
  todo = [(ds, t, r, s) for ds in plan.datasets for t, r in grid for s in plan.seeds]
  for ds, t, r, s in tqdm(todo, desc="cleann victims", disable=not progress):
    cfg = victims.VictimConfig(dataset=ds, model=plan.model, trigger=t, rate=r,
                               steps=plan.steps[ds], seed=s)
    try:
      runs.append(cache.get(cfg.tag, lambda: victim_run(cfg, plan, workdir, progress)))
    except FileNotFoundError as e:   # a dataset missing on this machine
      skipped.append(f"{cfg.tag}: {e}")
  adapt = []
  for ds in plan.adaptive_on:
    if any(ds in s for s in skipped):
      continue
    adapt.append(cache.get(f"adaptive_{ds}", lambda: adaptive_run(ds, plan, workdir, progress)))

  def bench():
    v = victims.build(victims.VictimConfig(dataset=plan.datasets[0], model=plan.model,
                                           trigger="patch",
                                           rate=plan.rates[0], steps=plan.steps[plan.datasets[0]],
                                           seed=plan.seeds[0]), workdir=workdir,
                      progress=progress)
    sh = _shield_for(v, plan, workdir)
    from secure.cleann import analyzers
    p = np.asarray(analyzers.dct_patches(v.ds.x_test, sh.input.patch)).reshape(
        -1, sh.input.patch.size ** 2)
    p = p[np.random.default_rng(0).choice(len(p), plan.bench_signals, replace=False)]
    return omp_benchmark(sh.input.dictionary, p, sh.input.n_nonzero, plan.bench_reps)

  return {"runs": runs, "adaptive": adapt, "skipped": skipped,
          "omp_benchmark": cache.get("omp_benchmark", bench), "fpga": fpga_record(plan),
          "fpga_constants": {k: dataclasses.asdict(c) for k, c in fpga_model.DEVICE.items()},
          "fpga_reference": fpga_model.REFERENCE, "plan": dataclasses.asdict(plan)}

