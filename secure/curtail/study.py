"""The CuRTAIL study: victims, CuRTAIL's MRR and its peers on the same attacks
and images, strength sweeps, the adaptive attacker against epsilon (with the
Tramer check), randomised redundancy, and the defender spread over devices
and processes. Computes records (JSON-able dicts); ``section`` renders them.

Development vs report: the defender settings (latent layers, fine-tuning
steps, input and residual dictionaries) were chosen on the seed-0 mnist5k
MLP victim (its validation split and first test images); the combination
rule is chosen by ``choose_rule`` on that victim's *validation* images
attacked by the sweep's attacks (full mode; quick mode uses the full study's
choice). The reported victims are trained with ``Plan.seed`` (1). Thresholds
come from each victim's validation split (held out of all training); every
metric uses held-out test images.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from tqdm.auto import tqdm

from core.cache import RunCache
from secure import attacks, combine, detection
from secure.curtail import (adaptive, calibration, defences, parallel, pool, profile,
                            tramer, victims)

CODE_VERSION = "curtail-4"

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
FPR = 0.05       # the operating point: the combination flags 5% of clean validation images


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Attack strength sweeps: PGD L-inf over the vulnerability profile's
  epsilons and L2 over its radii, run long enough to converge, and CW-L2 at
  confidence margins kappa."""
  eps_linf: tuple[float, ...] = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
  eps_l2: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)
  kappas: tuple[float, ...] = (0.0, 5.0, 10.0, 20.0)
  pgd_steps: int = 100
  cw: tuple[tuple[str, int], ...] = (("binary_steps", 6), ("steps", 200))

  def attacks(self) -> dict[str, list[tuple[float, tuple]]]:
    """kind -> [(strength, (attack, kwargs))]."""
    return {"pgd_linf": [(e, ("pgd", {"eps": e, "steps": self.pgd_steps}))
                         for e in self.eps_linf],
            "pgd_l2": [(e, ("pgd", {"eps": e, "steps": self.pgd_steps, "norm": "l2"}))
                       for e in self.eps_l2],
            "cw_kappa": [(k, ("cw_l2", dict(self.cw, confidence=k))) for k in self.kappas]}


@dataclasses.dataclass(frozen=True)
class Plan:
  victims: tuple[tuple[str, str], ...] = (("mnist5k", "mlp"), ("fashion_mnist", "mlp"),
                                          ("mnist5k", "cnn"), ("fashion_mnist", "cnn"))
  steps: dict = dataclasses.field(default_factory=lambda: {"mnist5k": 2000,
                                                           "fashion_mnist": 4000})
  # validation images carved from training (thresholds): more where training has them to
  # spare, since the 5% point's quantile is only as good as the images behind it
  val_images: dict = dataclasses.field(default_factory=lambda: {"fashion_mnist": 2000})
  seed: int = 1
  attacks: dict = dataclasses.field(default_factory=lambda: dict(ATTACKS))
  n_attack: int = 200            # correctly classified test images attacked
  n_jsma: int = 100              # JSMA is the slowest attack (pixel-pair saliency)
  n_clean: int = 1000            # clean test images for the false-positive rate
  sweep: Sweep = Sweep()
  defences: defences.CurtailConfig = defences.CurtailConfig()
  defence_names: tuple[str, ...] = ALL_DEFENCES   # CuRTAIL and the peers
  rules: tuple[str, ...] = combine.RULES
  rule: str = "auto"             # headline rule; "auto": chosen by choose_rule on the dev victim
  adaptive: adaptive.AdaptiveConfig = adaptive.AdaptiveConfig()
  # epsilons per victim model (the CNN's attacks cost ~7x the MLP's)
  adaptive_eps: dict = dataclasses.field(default_factory=lambda: {
      "mlp": (0.05, 0.1, 0.2, 0.3), "cnn": (0.1,)})
  adaptive_on: tuple[tuple[str, str], ...] = (("mnist5k", "mlp"), ("fashion_mnist", "mlp"),
                                              ("mnist5k", "cnn"))
  n_adaptive: int = 100
  pool: pool.PoolConfig | None = pool.PoolConfig()
  pool_on: tuple[tuple[str, str], ...] = (("mnist5k", "mlp"), ("fashion_mnist", "mlp"))
  pool_eps: tuple[float, ...] = (0.1,)
  pool_known_draws: int = 3      # draws attacked one by one (known to the attacker)
  throughput_images: int = 512   # 0: no throughput measurement
  throughput_rounds: int = 3
  bench_images: int = 100
  bench_reps: int = 1              # foolbox's CW runs eagerly: minutes per call
  bench_attacks: tuple[str, ...] = ("fgsm", "pgd_linf", "deepfool", "cw_l2")

  def __post_init__(self):
    if self.rule != "auto" and self.rule not in self.rules:
      raise ValueError(f"rule {self.rule!r} is not among the plan's rules {self.rules}")


_DEFENCES: dict = {}   # (victim tag, workdir, defence config, name) -> fitted defence


def _defences_for(v: victims.Victim, plan: Plan, workdir: str | None,
                  names: tuple[str, ...] | None = None) -> dict:
  """The victim's defences, each fitted once per process (the rule choice,
  the throughput run and the victim's own run share them)."""
  out = {}
  for n in names or plan.defence_names:
    key = (v.tag, workdir, repr(plan.defences), n)
    if key not in _DEFENCES:
      _DEFENCES[key] = defences.fit(v, plan.defences, names=(n,))[n]
    out[n] = _DEFENCES[key]
  return out


def attack_set(v: victims.Victim, n: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``n`` test images the victim classifies correctly (and labels)."""
  ok = np.flatnonzero(v.predict(v.x_test) == v.y_test)[:n]
  return v.x_test[ok], v.y_test[ok]


def run_attack(v: victims.Victim, label: str, x, y, spec: tuple, seed: int = 0
               ) -> attacks.AttackResult:
  name, kw = spec
  if name == "jsma":
    c = v.num_classes
    target = (y + 1 + np.random.default_rng([seed, 11]).integers(0, c - 1, len(y))) % c
    return attacks.jsma(v.logits_fn, x, target, **kw)
  return attacks.get(name)(v.logits_fn, x, y, **kw)


def detection_record(d: defences.Defence, val, clean, adv, success, rules=combine.RULES,
                     roc: bool = False) -> dict:
  """A defence on one attack, per combination rule (thresholds on validation
  at the 5% operating point): ROC AUC of the combined statistic, the TPR
  (successful adversarial inputs flagged), the clean test FPR and the
  residual attack success (attacked images that fool the victim and pass
  undetected); and each module's AUC alone."""
  rec = {"n_attacked": int(len(adv)), "n_success": int(success.sum()), "n_clean": int(len(clean))}
  succ = adv[success]
  if len(succ):
    rec["module_auc"] = {m: detection.roc(clean[:, i], succ[:, i])["auc"]
                         for i, m in enumerate(d.modules)}
  for rule in rules:
    c = combine.fit(val, rule, FPR, p_values=calibration.P_VALUES)
    flag_adv = c.flags(adv) if len(adv) else np.zeros(0, bool)
    r = {"fpr": 100 * float(c.flags(clean).mean()),
         "residual": 100 * float(np.mean(success & ~flag_adv)) if len(adv) else 0.0}
    if len(succ):
      t_clean, t_adv = np.asarray(c.statistic(clean)), np.asarray(c.statistic(succ))
      curve = detection.roc(t_clean, t_adv)
      r |= {"auc": curve["auc"], "tpr": 100 * float(flag_adv[success].mean())}
      if roc:
        keep = np.unique(np.linspace(0, len(curve["fpr"]) - 1, 60).astype(int))
        r["roc"] = {"fpr": curve["fpr"][keep].tolist(), "tpr": curve["tpr"][keep].tolist()}
    rec[rule] = r
  return rec


def _timed_scores(d: defences.Defence, x) -> tuple[np.ndarray, float]:
  d.scores(x[:8])   # compile outside the timing
  t0 = time.perf_counter()
  s = d.scores(x)
  return s, 1e3 * (time.perf_counter() - t0) / len(x)


def _attack_record(ds, val, clean, r, t, rules, roc=False) -> dict:
  ok = r.success
  a = {"success": 100 * float(ok.mean()), "n": len(ok), "s": t,
       "median_l2": float(np.median(r.l2[ok])) if ok.any() else None,
       "median_linf": float(np.median(r.linf[ok])) if ok.any() else None,
       "median_l0": float(np.median(r.l0[ok])) if ok.any() else None}
  a["defences"] = {k: detection_record(d, val[k], clean[k], d.scores(r.x_adv), ok, rules, roc)
                   for k, d in ds.items()}
  return a


def sweep_run(v, ds, val, clean, x, y, plan: Plan) -> dict:
  """Detection against attack strength (``Plan.sweep``) for every defence."""
  out = {}
  for kind, pts in plan.sweep.attacks().items():
    out[kind] = []
    for strength, spec in pts:
      t0 = time.perf_counter()
      r = run_attack(v, kind, x, y, spec, seed=plan.seed)
      out[kind].append({"strength": strength} |
                       _attack_record(ds, val, clean, r, time.perf_counter() - t0,
                                      plan.rules))
  return out


def victim_run(vcfg: victims.VictimConfig, plan: Plan, rule: str, workdir: str | None,
               progress: bool) -> dict:
  v = victims.build(vcfg, workdir=workdir, progress=progress)
  acc = float(np.mean(v.predict(v.x_test) == v.y_test))
  rec = {"victim": dataclasses.asdict(vcfg), "accuracy": 100 * acc, "n_test": len(v.y_test)}
  ds = _defences_for(v, plan, workdir)
  rec["fit_s"] = {k: d.fit_s for k, d in ds.items()}
  rec["fit_info"] = {k: d.info for k, d in ds.items() if d.info}
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
    rec["attacks"][lbl] = _attack_record(ds, val, clean, r, time.perf_counter() - t0,
                                         plan.rules, roc=lbl in ("pgd_linf", "cw_l2"))
    minimal[lbl] = (r.x_adv[r.success], ys[r.success], r.l2[r.success])
  rec["sweep"] = sweep_run(v, ds, val, clean, x, y, plan)
  if "curtail" in ds:
    rec["profile"] = profile.profile(v, ds["curtail"], minimal)
  pair = (vcfg.dataset, vcfg.model)
  if pair in plan.adaptive_on and plan.adaptive_eps.get(vcfg.model):
    rec["adaptive"] = adaptive_run(v, ds, val, clean, plan, rule, 100 * acc)
  if plan.pool and pair in plan.pool_on and "curtail" in ds:
    rec["pool"] = pool_run(v, plan, rule)
  return rec


def adaptive_run(v: victims.Victim, ds: dict, val: dict, clean: dict, plan: Plan, rule: str,
                 clean_acc: float) -> dict:
  """Each defence against the attacker that knows it (its modules, the
  combination ``rule`` and its threshold at the 5% operating point), at each
  epsilon; with the Tramer check of each result."""
  x, y = attack_set(v, plan.n_adaptive)
  out = {}
  for eps in plan.adaptive_eps[v.cfg.model]:
    cfg = dataclasses.replace(plan.adaptive, eps=eps)
    out[str(eps)] = {}
    for k, d in ds.items():
      c = combine.fit(val[k], rule, FPR, p_values=calibration.P_VALUES)
      t0 = time.perf_counter()
      xa, evaded = adaptive.attack(adaptive.Target.of(d, c), v.logits_fn, x, y, cfg)
      success = v.predict(xa) != y
      r = detection_record(d, val[k], clean[k], d.scores(xa), success, (rule,))[rule]
      flagged_clean = c.flags(d.scores(x))
      r |= {"s": time.perf_counter() - t0, "evaded_in_attack": 100 * float(evaded.mean()),
            "n_success": int(success.sum()), "n_attacked": len(x),
            "tramer": tramer.check(v.cfg.dataset if v.cfg else v.name, eps, clean_acc,
                                   flagged_clean, evaded)}
      out[str(eps)][k] = r
  return out


def pool_run(v: victims.Victim, plan: Plan, rule: str) -> dict:
  """Randomised redundancy: the adaptive attacker that knows the draw (a few
  draws, one by one) against the one that does not (EOT over every draw),
  judged on each draw as deployed; residual success averaged over draws."""
  pl = pool.fit(v, plan.defences, plan.pool)
  val = pl.defence.scores(v.x_val)
  x, y = attack_set(v, plan.n_adaptive)
  rng = np.random.default_rng([plan.seed, 17])
  known = sorted(rng.choice(len(pl.draws), min(plan.pool_known_draws, len(pl.draws)),
                            replace=False).tolist())
  out = {"n_draws": len(pl.draws), "modules": list(pl.defence.modules), "fit_s": pl.defence.fit_s,
         "known_draws": known, "n": len(x)}
  everything = pl.target(val, rule, FPR)
  for eps in plan.pool_eps:
    # one restart: the pool's attacks score every pool module (twice CuRTAIL's
    # work per step) and run once per known draw
    cfg = dataclasses.replace(plan.adaptive, eps=eps, restarts=1)
    t0 = time.perf_counter()
    xa, _ = adaptive.attack(everything, v.logits_fn, x, y, cfg)
    per_draw = adaptive.residual_success(everything, v.logits_fn, xa, y)      # (D, N)
    t_eot = time.perf_counter() - t0
    res_known = []
    for i in known:
      tgt = pl.target(val, rule, FPR, draws=(i,))
      xk, _ = adaptive.attack(tgt, v.logits_fn, x, y, cfg)
      res_known.append(float(adaptive.residual_success(tgt, v.logits_fn, xk, y)[0].mean()))
    out[str(eps)] = {"unknown_eot": 100 * float(per_draw.mean()),
                     "unknown_eot_on_known_draws": 100 * float(per_draw[known].mean()),
                     "unknown_eot_per_draw_range": [100 * float(per_draw.mean(1).min()),
                                                    100 * float(per_draw.mean(1).max())],
                     "known": 100 * float(np.mean(res_known)),
                     "known_per_draw": [100 * r for r in res_known],
                     "s_eot": t_eot, "s": time.perf_counter() - t0}
  return out


def choose_rule(vcfg: victims.VictimConfig, plan: Plan, workdir: str | None, progress: bool
                ) -> dict:
  """The combination rule, chosen on the development victim's *validation*
  images only (``calibration.choose``): thresholds from half of them, the
  sweep's attacks on the other half. No test image is used."""
  v = victims.build(vcfg, workdir=workdir, progress=progress)
  d = _defences_for(v, plan, workdir, ("curtail",))["curtail"]
  ok = np.random.default_rng([vcfg.seed, 19]).permutation(
      np.flatnonzero(v.predict(v.x_val) == v.y_val))
  half = len(ok) // 2
  cal, xs, ys = v.x_val[ok[:half]], v.x_val[ok[half:]], v.y_val[ok[half:]]
  adversarial = (d.scores(r.x_adv[r.success]) for r in (
      run_attack(v, kind, xs, ys, spec, seed=vcfg.seed)
      for kind, pts in plan.sweep.attacks().items() for _, spec in pts))
  return {"victim": dataclasses.asdict(vcfg), "n_cal": half, "n_attacked": len(xs)} | \
      calibration.choose(d.scores(cal), adversarial, plan.rules, FPR)


def fpr_stage(vcfg: victims.VictimConfig, plan: Plan, workdir: str | None, progress: bool
              ) -> dict:
  """CuRTAIL's clean FPR at the validation point over re-splits of the
  victim's clean validation and test images (``calibration.fpr_resplits``)."""
  v = victims.build(vcfg, workdir=workdir, progress=progress)
  names = tuple(n for n in ("curtail",) if n in plan.defence_names)
  return {k: calibration.fpr_resplits(d.scores(v.x_val), d.scores(v.x_test[:plan.n_clean]),
                                      plan.rules, FPR)
          for k, d in _defences_for(v, plan, workdir, names).items()}


def run(plan: Plan, outdir: str, mode: str, progress: bool = True) -> dict:
  """All records of ``plan`` (resumable: finished victims are cached)."""
  from secure import attack_benchmark
  workdir = os.path.join(outdir, "models", f"curtail_{mode}")
  cache = RunCache(os.path.join(outdir, "curtail", f"{mode}.json"),
                   meta={"plan": dataclasses.asdict(plan), "code": CODE_VERSION})
  cfgs = [victims.VictimConfig(dataset=d, model=m, steps=plan.steps[d], seed=plan.seed,
                               val_images=plan.val_images.get(d, 500))
          for d, m in plan.victims]

  def first_victim():
    return victims.build(cfgs[0], workdir=workdir, progress=progress)

  def tput():
    v = first_victim()
    cur = _defences_for(v, plan, workdir, ("curtail",))["curtail"]
    return parallel.throughput(cur.spec, cur.params, v.x_test[:plan.throughput_images],
                               rounds=plan.throughput_rounds)

  def bench():
    v = first_victim()
    x, y = attack_set(v, plan.bench_images)
    return attack_benchmark.run(v.logits_fn, x, y, {k: plan.attacks[k]
                                                    for k in plan.bench_attacks},
                                reps=plan.bench_reps)

  no = lambda why: (lambda: {"skipped": why})
  dev = dataclasses.replace(cfgs[0], seed=0) if cfgs else None
  try:
    choice = cache.get("rule_choice", (lambda: choose_rule(dev, plan, workdir, progress))
                       if plan.rule == "auto" and dev else
                       no(f"fixed by the plan: {plan.rule}"))
  except FileNotFoundError as e:
    choice = {"skipped": str(e)}
  rule = choice.get("rule", plan.rule if plan.rule != "auto" else "or")
  # The first victim's measurements come first: the slow victims cannot starve them.
  try:
    speed = {"throughput": cache.get("throughput", tput if plan.throughput_images and cfgs
                                     and "curtail" in plan.defence_names
                                     else no("not in this plan")),
             "attack_benchmark": cache.get("attack_benchmark", bench if plan.bench_attacks
                                           and cfgs else no("not in this plan"))}
  except FileNotFoundError as e:   # the first victim's dataset is missing here
    speed = {"throughput": {"skipped": str(e)}, "attack_benchmark": {"skipped": str(e)}}
  runs, skipped, fpr = [], [], {}
  for c in tqdm(cfgs, desc="curtail victims", disable=not progress):
    try:
      runs.append(cache.get(c.tag, lambda: victim_run(c, plan, rule, workdir, progress)))
      fpr[c.tag] = cache.get(f"fpr_resplits:{c.tag}",
                             lambda: fpr_stage(c, plan, workdir, progress))
    except FileNotFoundError as e:   # a dataset missing on this machine
      skipped.append(f"{c.tag}: {e}")
  return {"runs": runs, "skipped": skipped, **speed, "rule": rule, "rule_choice": choice,
          "fpr_resplits": fpr, "plan": dataclasses.asdict(plan)}
