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
from secure import detection, sparse
from secure.cleann import (adaptive, fixed_point, fpga_model, neural_cleanse, shield, strip,
                           victims)

CODE_VERSION = "cleann-2"


@dataclasses.dataclass(frozen=True)
class Plan:
  datasets: tuple[str, ...] = ("mnist5k", "fashion_mnist")
  model: str = "cnn"
  triggers: tuple[str, ...] = ("patch", "blend", "warp")
  rates: tuple[float, ...] = (0.05, 0.01)
  seeds: tuple[int, ...] = (1,)
  steps: dict = dataclasses.field(default_factory=lambda: {"mnist5k": 1500,
                                                           "fashion_mnist": 3000})
  shield: shield.ShieldConfig = shield.ShieldConfig()
  strip: strip.StripConfig = strip.StripConfig()
  nc: neural_cleanse.NCConfig = neural_cleanse.NCConfig()
  defender_sizes: tuple[int, ...] = (100, 300, 600)
  adaptive: adaptive.AdaptiveConfig = adaptive.AdaptiveConfig()
  adaptive_on: tuple[str, ...] = ("mnist5k", "fashion_mnist")
  fixed_bits: tuple[int, ...] = (4, 6, 8, 10, 12, 16)
  fixed_on: tuple[str, ...] = ("patch", "blend")
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


def evaluate_detector(score: Callable[[np.ndarray], np.ndarray], thresholds: dict,
                      v: victims.Victim, x_trig: np.ndarray) -> dict:
  """Metrics of a detect-and-reject defence (flagged inputs get no label, so
  they count against clean accuracy and never as recovered)."""
  x_att, y_att = v.attack_set()
  t0 = time.perf_counter()
  s_trig = score(x_trig)
  ms = 1e3 * (time.perf_counter() - t0) / len(x_trig)
  s_clean = score(v.ds.x_test)
  pred_t, pred_c = v.predict(x_trig), v.predict(v.ds.x_test)
  out = {"ms_per_image": ms, "roc": _thin(detection.roc(s_clean, s_trig))}
  for f, thr in thresholds.items():
    ft, fc = s_trig > thr, s_clean > thr
    out[f"fpr{f:g}"] = {"tpr": 100 * float(ft.mean()), "fpr_test": 100 * float(fc.mean()),
                        "ra": 100 * float(np.mean(~ft & (pred_t == y_att))),
                        "asr_after": 100 * float(np.mean(~ft & (pred_t == v.cfg.target))),
                        "c_acc_after": 100 * float(np.mean(~fc & (pred_c == v.ds.y_test)))}
  return out


def shield_record(sh: shield.Shield, v: victims.Victim, x_trig: np.ndarray | None = None
                  ) -> dict:
  x_att, _ = v.attack_set()
  shield.warm_up(sh, x_att)
  m = shield.evaluate(sh, v, x_trig)
  m["roc"] = {k: _thin(r) for k, r in m["roc"].items()}
  return m


def victim_run(cfg: victims.VictimConfig, plan: Plan, workdir: str | None,
               progress: bool) -> dict:
  """Everything measured on one backdoored victim."""
  v = victims.build(cfg, workdir=workdir, progress=progress)
  rec = {"victim": dataclasses.asdict(cfg), "threat": victims.threat(v),
         "n_defender": len(v.defender_x)}
  t0 = time.perf_counter()
  sh = _shield_for(v, plan, workdir)
  rec["shield_fit_s"] = time.perf_counter() - t0
  rec["shield"] = shield_record(sh, v)
  x_att, _ = v.attack_set()
  x_trig = v.trigger(x_att)
  x_fit, x_val = victims.defender_split(v.defender_x, plan.shield.fit_fraction)
  st = strip.fit(v.apply, x_fit, x_val, plan.strip)
  rec["strip"] = evaluate_detector(st.scores, st.thresholds, v, x_trig)
  t0 = time.perf_counter()
  ncl = neural_cleanse.fit(v.apply, v.features, x_fit, x_val, v.ds.num_classes, plan.nc)
  rec["nc"] = evaluate_detector(ncl.scores, ncl.thresholds, v, x_trig)
  rec["nc"] |= {"fit_s": time.perf_counter() - t0, "anomaly_index": ncl.anomaly_index,
                "suspect": ncl.suspect, "infected": bool(ncl.infected),
                "mask_norms": ncl.mask_norms.tolist(), "reversed_asr": ncl.reversed_asr.tolist()}
  if cfg.rate == plan.rates[0]:
    sizes = {}
    for n in plan.defender_sizes:
      if n > len(v.defender_x):
        continue
      m = rec["shield"] if n == len(v.defender_x) else shield.evaluate(
          shield.fit(v, plan.shield, defender_x=v.defender_x[:n]), v)
      sizes[str(n)] = {"auc": m["roc"]["combined"]["auc"],
                       **{f"tpr{f:g}": m[f"fpr{f:g}"]["tpr"] for f in (0.01, 0.05)},
                       **{f"ra{f:g}": m[f"fpr{f:g}"]["ra"] for f in (0.01, 0.05)}}
    rec["defender_sizes"] = sizes
  if cfg.trigger in plan.fixed_on and cfg.rate == plan.rates[0]:
    rec["fixed_point"] = fixed_point_sweep(sh, v, x_val, x_trig, plan.fixed_bits)
  return rec


def fixed_point_sweep(sh: shield.Shield, v: victims.Victim, x_val, x_trig, bits) -> list[dict]:
  """Input-analyzer detection (threshold re-set on the validation split, as a
  deployed datapath would be calibrated) and recovery against word length
  (all three formats at the same width)."""
  _, y_att = v.attack_set()
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
    s_t, s_c = score(x_trig), score(v.ds.x_test)
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
  x_att, _ = v.attack_set()
  before = shield.evaluate(sh, v, trig(x_att))
  v2 = victims.build(cfg, workdir=workdir, progress=progress, trigger=trig,
                     tag=cfg.tag + "_adaptive")
  sh2 = shield.fit(v2, plan.shield)
  rec = shield_record(sh2, v2)
  return {"dataset": dataset, "history": hist, "linf": float(np.abs(trig.delta).max()),
          "threat": victims.threat(v2), "shield": rec,
          "on_original_victim": {"asr": before["asr_before"],
                                 "tpr1": before["fpr0.01"]["tpr"]},
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
  todo = [(ds, t, r, s) for ds in plan.datasets for t in plan.triggers for r in plan.rates
          for s in plan.seeds]
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

