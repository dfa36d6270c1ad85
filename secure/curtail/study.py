"""The CuRTAIL study: victims, their vulnerability profile, CuRTAIL's MRR and
its peers on the same attacks and images, the adaptive attacker, and the
defender spread over devices and processes. Computes records (JSON-able
dicts); ``section`` renders them.

Development vs report: the defender settings (latent layers, fine-tuning
steps, input dictionaries) were chosen on the seed-0 mnist5k MLP victim
(its validation split and first test images); the reported victims are
trained with ``Plan.seed`` (1). Thresholds come from each victim's validation
split (held out of all training); every metric uses held-out test images.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from core.cache import RunCache
from secure import attacks, detection
from secure.curtail import adaptive, defences, modules, mrr, parallel, victims

CODE_VERSION = "curtail-3"

# label -> (attack in secure.attacks, keyword arguments); JSMA's target is a
# random other class (seeded).
ATTACKS = {
    "fgsm": ("fgsm", {"eps": 0.1}),
    "bim": ("bim", {"eps": 0.1, "steps": 10}),
    "pgd_linf": ("pgd", {"eps": 0.1, "steps": 40}),
    "pgd_l2": ("pgd", {"eps": 1.5, "steps": 40, "norm": "l2"}),
    "deepfool": ("deepfool", {"steps": 50}),
    "cw_l2": ("cw_l2", {"binary_steps": 6, "steps": 200}),
    "jsma": ("jsma", {"gamma": 0.1}),
}
ALL_DEFENCES = tuple(defences.BUILDERS)
FPR = 0.05       # the operating point: OR of the modules flags 5% of clean validation images


@dataclasses.dataclass(frozen=True)
class Plan:
  victims: tuple[tuple[str, str], ...] = (("mnist5k", "mlp"), ("fashion_mnist", "mlp"),
                                          ("mnist5k", "cnn"), ("fashion_mnist", "cnn"))
  steps: dict = dataclasses.field(default_factory=lambda: {"mnist5k": 2000,
                                                           "fashion_mnist": 4000})
  seed: int = 1
  attacks: dict = dataclasses.field(default_factory=lambda: dict(ATTACKS))
  n_attack: int = 200            # correctly classified test images attacked
  n_jsma: int = 100              # JSMA is the slowest attack (pixel-pair saliency)
  n_clean: int = 1000            # clean test images for the false-positive rate
  eps_linf: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
  eps_l2: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
  n_profile: int = 100
  defences: defences.CurtailConfig = defences.CurtailConfig()
  defence_names: tuple[str, ...] = ALL_DEFENCES   # CuRTAIL and the peers
  adaptive: adaptive.AdaptiveConfig = adaptive.AdaptiveConfig()
  adaptive_on: tuple[tuple[str, str], ...] = (("mnist5k", "mlp"), ("mnist5k", "cnn"))
  n_adaptive: int = 100
  throughput_images: int = 512   # 0: no throughput measurement
  throughput_rounds: int = 3
  bench_images: int = 100
  bench_reps: int = 1              # foolbox's CW runs eagerly: minutes per call
  bench_attacks: tuple[str, ...] = ("fgsm", "pgd_linf", "deepfool", "cw_l2")


_DEFENCES: dict = {}   # (victim tag, workdir, defence config) -> fitted defences, this process


def _defences_for(v: victims.Victim, plan: Plan, workdir: str | None) -> dict:
  """The victim's defences, fitted once per process (the throughput run reuses
  the first victim's)."""
  key = (v.cfg.tag, workdir, repr(plan.defences), plan.defence_names)
  if key not in _DEFENCES:
    _DEFENCES[key] = defences.fit(v, plan.defences, names=plan.defence_names)
  return _DEFENCES[key]


def attack_set(v: victims.Victim, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` test images the victim classifies correctly (and labels)."""
  ok = np.flatnonzero(v.predict(v.x_test) == v.y_test)[:n]
  return v.x_test[ok], v.y_test[ok]


def run_attack(v: victims.Victim, label: str, x, y, spec: tuple, seed: int = 0
               ) -> attacks.AttackResult:
  name, kw = spec
  if name == "jsma":
    c = v.model_config.num_classes
    target = (y + 1 + np.random.default_rng([seed, 11]).integers(0, c - 1, len(y))) % c
    return attacks.jsma(v.logits_fn, x, target, **kw)
  return attacks.get(name)(v.logits_fn, x, y, **kw)


def _quantiles(a) -> dict:
  a = np.asarray(a, float)
  return {f"q{q}": float(np.quantile(a, q / 100)) for q in (10, 25, 50, 75, 90)} if len(a) \
      else {}


def profile(v: victims.Victim, plan: Plan, cur: defences.Defence, minimal: dict) -> dict:
  """The victim's vulnerability: success against epsilon (L-inf and L2),
  minimal perturbations (DeepFool, CW), and where adversarial points land
  relative to the benign class densities (last latent module)."""
  x, y = attack_set(v, plan.n_profile)
  sweep = {}
  for lbl in ("fgsm", "bim", "pgd_linf", "pgd_l2"):
    if lbl not in plan.attacks:
      continue
    name, kw = plan.attacks[lbl]
    grid = plan.eps_l2 if kw.get("norm") == "l2" else plan.eps_linf
    sweep[lbl] = [{"eps": e, "success": 100 * float(run_attack(
        v, lbl, x, y, (name, dict(kw, eps=e))).success.mean()), "n": len(x)} for e in grid]
  spec, arr = cur.spec, cur.params
  lat = arr["latent"][-1]
  layer = spec.latent_layers[-1]
  nll = jax.jit(lambda xx, ll: modules.latent_score(spec, lat, layer, xx, ll))
  nll_np = lambda xx, ll: np.concatenate([np.asarray(nll(xx[i:i + 500], ll[i:i + 500]))
                                          for i in range(0, len(xx), 500)])
  train = np.sort(nll_np(v.x_train, v.y_train))
  place = {}
  for lbl, (xa, ya, _) in minimal.items():
    if not len(xa):
      continue
    pred = v.predict(xa)
    s_pred, s_true = nll_np(xa, pred), nll_np(xa, ya)
    # % of benign training images less typical of their own class than the
    # adversarial point is of the class it now claims
    pct = 100 * (1 - np.searchsorted(train, s_pred) / len(train))
    place[lbl] = {"median_train_percentile": float(np.median(pct)),
                  "below_1pct": 100 * float(np.mean(pct < 1)),
                  "closer_to_true_class": 100 * float(np.mean(s_true < s_pred)), "n": len(xa)}
  return {"eps_sweep": sweep, "latent_placement": place,
          "minimal": {k: m for k, m in ((k, _quantiles(minimal[k][2])) for k in minimal
                                        if k in ("deepfool", "cw_l2"))},
          "minimal_l2": {k: np.round(np.asarray(minimal[k][2]), 4).tolist()
                         for k in ("deepfool", "cw_l2") if k in minimal}}


def detection_record(d: defences.Defence, val, clean, adv, success) -> dict:
  """A defence on one attack: OR-sweep AUC, per-module AUCs, and at the 5%
  operating point the TPR (successful adversarial inputs flagged), the clean
  test FPR and the residual attack success (attacked images that fool the
  victim and pass undetected)."""
  thr = defences.thresholds_at(val, FPR)
  flag_adv = np.any(adv > thr, axis=1)
  flag_clean = np.any(clean > thr, axis=1)
  succ = adv[success]
  rec = {"n_attacked": int(len(adv)), "n_success": int(success.sum()),
         "fpr": 100 * float(flag_clean.mean()), "n_clean": int(len(clean)),
         "residual": 100 * float(np.mean(success & ~flag_adv))}
  if len(succ):
    sw = mrr.sweep(d.as_dict(val), d.as_dict(clean), d.as_dict(succ),
                   np.geomspace(1e-4, 0.9, 120))
    rec |= {"auc": sw["auc"], "tpr": 100 * float(flag_adv[success].mean()),
            "module_auc": {m: detection.roc(clean[:, i], succ[:, i])["auc"]
                           for i, m in enumerate(d.modules)},
            "roc": {"fpr": sw["fpr"], "tpr": sw["tpr"]}}
  return rec


def _timed_scores(d: defences.Defence, x) -> tuple[np.ndarray, float]:
  d.scores(x[:8])   # compile outside the timing
  t0 = time.perf_counter()
  s = d.scores(x)
  return s, 1e3 * (time.perf_counter() - t0) / len(x)


def victim_run(vcfg: victims.VictimConfig, plan: Plan, workdir: str | None, progress: bool
               ) -> dict:
  v = victims.build(vcfg, workdir=workdir, progress=progress)
  acc = float(np.mean(v.predict(v.x_test) == v.y_test))
  rec = {"victim": dataclasses.asdict(vcfg), "accuracy": 100 * acc, "n_test": len(v.y_test)}
  ds = _defences_for(v, plan, workdir)
  rec["fit_s"] = {k: d.fit_s for k, d in ds.items()}
  x, y = attack_set(v, plan.n_attack)
  val = {k: d.scores(v.x_val) for k, d in ds.items()}
  clean, cost = {}, {}
  for k, d in ds.items():
    clean[k], cost[k] = _timed_scores(d, v.x_test[:plan.n_clean])
  rec["ms_per_image"] = cost
  rec["attacks"], minimal = {}, {}
  for lbl, spec in plan.attacks.items():
    xs, ys = (x[:plan.n_jsma], y[:plan.n_jsma]) if lbl == "jsma" else (x, y)
    t0 = time.perf_counter()
    r = run_attack(v, lbl, xs, ys, spec, seed=plan.seed)
    a = {"success": 100 * float(r.success.mean()), "n": len(xs),
         "s": time.perf_counter() - t0,
         "median_l2": float(np.median(r.l2[r.success])) if r.success.any() else None,
         "median_linf": float(np.median(r.linf[r.success])) if r.success.any() else None,
         "median_l0": float(np.median(r.l0[r.success])) if r.success.any() else None,
         "defences": {}}
    for k, d in ds.items():
      a["defences"][k] = detection_record(d, val[k], clean[k], d.scores(r.x_adv), r.success)
    rec["attacks"][lbl] = a
    minimal[lbl] = (r.x_adv[r.success], ys[r.success], r.l2[r.success])
  rec["profile"] = profile(v, plan, ds["curtail"], minimal)
  if (vcfg.dataset, vcfg.model) in plan.adaptive_on:
    rec["adaptive"] = adaptive_run(v, ds, val, clean, plan)
  return rec


def adaptive_run(v: victims.Victim, ds: dict, val: dict, clean: dict, plan: Plan) -> dict:
  """Each defence against the attacker that knows it (thresholds at the 5%
  operating point)."""
  x, y = attack_set(v, plan.n_adaptive)
  out = {}
  for k, d in ds.items():
    thr = defences.thresholds_at(val[k], FPR)
    t0 = time.perf_counter()
    xa, evaded = adaptive.attack(d, v.logits_fn, thr, val[k].std(0), x, y, plan.adaptive)
    s = d.scores(xa)
    success = v.predict(xa) != y
    r = detection_record(d, val[k], clean[k], s, success)
    r.pop("roc", None)
    out[k] = r | {"s": time.perf_counter() - t0, "evaded_in_attack": 100 * float(evaded.mean())}
  return out


def run(plan: Plan, outdir: str, mode: str, progress: bool = True) -> dict:
  """All records of ``plan`` (resumable: finished victims are cached)."""
  from secure import attack_benchmark
  workdir = os.path.join(outdir, "models", f"curtail_{mode}")
  cache = RunCache(os.path.join(outdir, "curtail", f"{mode}.json"),
                   meta={"plan": dataclasses.asdict(plan), "code": CODE_VERSION})
  cfgs = [victims.VictimConfig(dataset=d, model=m, steps=plan.steps[d], seed=plan.seed)
          for d, m in plan.victims]

  def first_victim():
    return victims.build(cfgs[0], workdir=workdir, progress=progress)

  def tput():
    v = first_victim()
    cur = _defences_for(v, plan, workdir)["curtail"]
    spec, arr = cur.spec, cur.params
    return parallel.throughput(spec, arr, v.x_test[:plan.throughput_images],
                               rounds=plan.throughput_rounds)

  def bench():
    v = first_victim()
    x, y = attack_set(v, plan.bench_images)
    return attack_benchmark.run(v.logits_fn, x, y, {k: plan.attacks[k]
                                                    for k in plan.bench_attacks},
                                reps=plan.bench_reps)

  no = lambda why: (lambda: {"skipped": why})
  # The first victim's measurements come first: the slow victims cannot starve them.
  try:
    speed = {"throughput": cache.get("throughput", tput if plan.throughput_images and cfgs
                                     else no("not in this plan")),
             "attack_benchmark": cache.get("attack_benchmark", bench if plan.bench_attacks
                                           and cfgs else no("not in this plan"))}
  except FileNotFoundError as e:   # the first victim's dataset is missing here
    speed = {"throughput": {"skipped": str(e)}, "attack_benchmark": {"skipped": str(e)}}
  runs, skipped = [], []
  for c in tqdm(cfgs, desc="curtail victims", disable=not progress):
    try:
      runs.append(cache.get(c.tag, lambda: victim_run(c, plan, workdir, progress)))
    except FileNotFoundError as e:   # a dataset missing on this machine
      skipped.append(f"{c.tag}: {e}")
  return {"runs": runs, "skipped": skipped, **speed, "plan": dataclasses.asdict(plan)}
