"""The CuRTAIL report section: plans for quick and full mode, and the renderer
that turns the study's records into Markdown tables and plots."""

from __future__ import annotations

import json
import os

import numpy as np

from core import report
from secure import detection, sparse
from secure.curtail import adaptive, defences, input_defender, latent, lid, peers, study, victims

# Full mode: APGD with one restart per (penalty, gradient kind) pair, i.e. four
# runs of 100 steps per image and epsilon (a second restart doubles the ~25
# minutes the adaptive attacker takes here).
FULL = study.Plan(adaptive=adaptive.AdaptiveConfig(restarts=1))
# Quick mode is a smoke check of every part in about two minutes: the mnist5k
# MLP only, fewer images, a short sweep, shorter PGD and fine-tuning (MagNet:
# fewer steps at a higher learning rate; at 300 steps of 3e-3 its auto-encoder
# is still grey and scores noisy images as *more* typical), the adaptive
# attacker at one epsilon, no randomised pool; the combination rule is the
# full study's choice.
QUICK = study.Plan(
    victims=(("mnist5k", "mlp"),), steps={"mnist5k": 1500}, n_attack=100, n_jsma=40,
    n_clean=500,
    sweep=study.Sweep(eps_linf=(0.05, 0.1, 0.3), eps_l2=(1.0, 3.0), kappas=(0.0, 20.0),
                      pgd_steps=40),
    defences=defences.CurtailConfig(
        latent=latent.LatentConfig(steps=500), magnet=peers.MagNetConfig(steps=300, lr=1e-2),
        input=input_defender.InputDefenderConfig(
            images_per_class=100, dictionary=sparse.DictConfig(n_atoms=64, n_nonzero=4,
                                                               iters=4)),
        lid=lid.LIDConfig(ks=(20,), n_train=500)),
    rule="or",
    adaptive=adaptive.AdaptiveConfig(steps=40, restarts=1, penalties=(3.0,),
                                     gradients=("exact",)),
    adaptive_eps={"mlp": (0.1,)}, adaptive_on=(("mnist5k", "mlp"),), n_adaptive=100, pool=None,
    throughput_images=256, throughput_rounds=1, bench_images=100, bench_reps=1,
    bench_attacks=("fgsm", "pgd_linf"))

NAMES = {"curtail": "CuRTAIL (MRR)", "mahalanobis": "Mahalanobis", "magnet": "MagNet",
         "feature_squeezing": "Feature Squeezing", "lid": "LID"}
KINDS = {"pgd_linf": ("PGD L-inf", "epsilon"), "pgd_l2": ("PGD L2", "epsilon"),
         "cw_kappa": ("CW-L2", "kappa")}


def _pm(pct: float | None, n: int) -> str:
  if pct is None:
    return "-"
  return f"{pct:.1f} ± {100 * detection.binomial_se(pct / 100, n):.1f}"


def _auc(r: dict) -> str:
  return f"{r['auc']:.3f}" if "auc" in r else "-"


def settings(run: dict) -> list[tuple[str, dict]]:
  """Every non-adaptive (label, attack record): the fixed attacks, then each
  sweep point."""
  out = list(run["attacks"].items())
  for kind, pts in run.get("sweep", {}).items():
    out += [(f"{kind} {p['strength']:g}", p) for p in pts]
  return out


def mean_auc(run: dict, defence: str, rule: str) -> float:
  """Mean ROC AUC of ``defence`` (combined by ``rule``) over the run's fixed attacks."""
  return float(np.mean([a["defences"][defence][rule]["auc"] for a in run["attacks"].values()
                        if "auc" in a["defences"][defence][rule]]))


def worst(run: dict, defence: str, rule: str) -> dict:
  """Over every non-adaptive attack and strength: the lowest AUC and the
  highest residual attack success (with where), and the clean test FPR."""
  rows = [(lbl, a["defences"][defence][rule]) for lbl, a in settings(run)]
  aucs = [(r["auc"], lbl) for lbl, r in rows if "auc" in r]
  res = [(r["residual"], lbl) for lbl, r in rows]
  return {"min_auc": min(aucs), "max_residual": max(res),
          "fpr": next(iter(run["attacks"].values()))["defences"][defence][rule]["fpr"]}


def _fig(parts, outdir, fig_dir, name, series, **kw):
  if series:
    path = report.line_plot(os.path.join(fig_dir, name), series, **kw)
    parts.append(f"![{kw['title']}]({os.path.relpath(path, outdir)})")


def _detection_tables(r: dict, names: list[str], rule: str) -> list[str]:
  parts = []
  hdr = ["attack"] + [NAMES[n] for n in names]
  cell = lambda d: f"{_auc(d)} / {d['tpr']:.1f}" if "tpr" in d else "-"
  rows = [[lbl] + [cell(a["defences"][n][rule]) for n in names]
          for lbl, a in r["attacks"].items()]
  rows.append(["mean AUC"] + [f"{mean_auc(r, n, rule):.3f}" for n in names])
  any_a = next(iter(r["attacks"].values()))["defences"]
  rows.append(["clean FPR % (test)"] + [_pm(any_a[n][rule]["fpr"], any_a[n]["n_clean"])
                                        for n in names])
  parts.append(f"ROC AUC / TPR % at the 5% operating point ({rule} combination; thresholds "
               "from validation images; TPR over the attack's successful examples):\n\n"
               + report.markdown_table(hdr, rows))
  rows = [[lbl] + [_pm(a["defences"][n][rule]["residual"], a["defences"][n]["n_attacked"])
                   for n in names] for lbl, a in r["attacks"].items()]
  parts.append("Residual attack success % (attacked images that fool the victim and pass "
               "undetected), same operating point:\n\n" + report.markdown_table(hdr, rows))
  return parts


def _modules_table(r: dict, rules: list[str]) -> str:
  cur = [(lbl, a["defences"]["curtail"]) for lbl, a in settings(r)]
  mods = list(next((d["module_auc"] for _, d in cur if "module_auc" in d), {}))
  rows = [[lbl] + [d.get("module_auc", {}).get(m, "-") for m in mods] +
          [f"{_auc(d[x])} / {d[x].get('tpr', 0):.0f}" for x in rules] for lbl, d in cur]
  return ("CuRTAIL's modules alone (ROC AUC) and combined (AUC / TPR % at 5%), every attack "
          "and strength:\n\n" + report.markdown_table(
              ["attack", *mods, *(f"{x}" for x in rules)], rows, digits=3))


def _sweep(r, names, rule, tag, title, fig_dir, outdir) -> list[str]:
  parts = []
  for kind, pts in r.get("sweep", {}).items():
    label, unit = KINDS[kind]
    rows = [[f"{p['strength']:g}", _pm(p["success"], p["n"])] +
            [f"{_auc(p['defences'][n][rule])} / {p['defences'][n][rule]['residual']:.1f}"
             for n in names] for p in pts]
    parts.append(f"**{label} against {unit}** ({pts[0]['n']} images): attack success %, then "
                 f"per defence AUC / residual attack success % ({rule}, 5% operating point):\n\n"
                 + report.markdown_table([unit, "success %", *(NAMES[n] for n in names)], rows))
    series = {NAMES[n]: ([p["strength"] for p in pts],
                         [p["defences"][n][rule]["residual"] for p in pts],
                         [100 * detection.binomial_se(p["defences"][n][rule]["residual"] / 100,
                                                      p["n"]) for p in pts]) for n in names}
    series["attack success (no defence)"] = ([p["strength"] for p in pts],
                                             [p["success"] for p in pts])
    _fig(parts, outdir, fig_dir, f"curtail_sweep_{kind}_{tag}.png", series, xlabel=unit,
         ylabel="residual attack success %", title=f"{label}: {title}")
  return parts


def _adaptive(r, rule, tag, title, fig_dir, outdir) -> list[str]:
  ad = r["adaptive"]
  eps = list(ad)
  names = list(ad[eps[0]])
  rows = []
  for e in eps:
    for n in names:
      a = ad[e][n]
      t = a["tramer"]
      flag = {True: " **beyond cited**", False: "", None: " (nothing cited)"}[t["beyond_cited"]]
      rows.append((e, NAMES[n], _auc(a), a["n_success"], _pm(a["residual"], a["n_attacked"]),
                   f"{t['implied']:.1f} ± {t['se']:.1f} vs {t['sota'] or '-'}{flag}", a["s"]))
  parts = [f"**Adaptive white-box attacker** (APGD on the victim's margin plus the {rule} "
           "combination's penalty, every module attacked jointly, gradients through OMP's "
           "projection and by BPDA; it knows the thresholds), and the **Tramer check**: the "
           "robust accuracy at eps/2 that each result implies, against the best cited robust "
           "classifier at eps/2 or beyond:\n\n" + report.markdown_table(
               ["eps", "defence", "AUC", "fooled", "residual %", "implied acc. at eps/2 %",
                "attack s"], rows, 3)]
  series = {NAMES[n]: ([float(e) for e in eps], [ad[e][n]["residual"] for e in eps],
                       [100 * detection.binomial_se(ad[e][n]["residual"] / 100,
                                                    ad[e][n]["n_attacked"]) for e in eps])
            for n in names}
  _fig(parts, outdir, fig_dir, f"curtail_adaptive_{tag}.png", series, xlabel="L-inf epsilon",
       ylabel="residual attack success %", title=f"Adaptive attacker: {title}")
  return parts


def _victim(r: dict, rule: str, rules: list[str], fig_dir: str, outdir: str) -> list[str]:
  v = r["victim"]
  tag, title = f"{v['dataset']}_{v['model']}", f"{v['dataset']} {v['model'].upper()}"
  names = list(next(iter(r["attacks"].values()))["defences"])
  parts = [f"#### {v['dataset']} / {v['model'].upper()} (seed {v['seed']}): test accuracy "
           f"{_pm(r['accuracy'], r['n_test'])} %"]
  rows = [(lbl, _pm(a["success"], a["n"]), a["median_l2"] or "-", a["median_linf"] or "-",
           a["median_l0"] or "-", a["s"]) for lbl, a in r["attacks"].items()]
  parts.append(report.markdown_table(["attack", "success %", "median L2", "median L-inf",
                                      "median L0", "time s"], rows, digits=3))
  parts += _detection_tables(r, names, rule)
  if "curtail" in names:
    parts.append(_modules_table(r, rules))
  parts += _sweep(r, names, rule, tag, title, fig_dir, outdir)
  cost = r["ms_per_image"]
  parts.append("Defender cost (ms per image, warm, this CPU): " + ", ".join(
      f"{NAMES[n]} {cost[n]:.3f}" for n in names) + "; fitting (s): " + ", ".join(
      f"{NAMES[n]} {r['fit_s'][n]:.0f}" for n in names) + "." + "".join(
      f" LID: k = {i['k']} chosen on validation (AUC by k: " + ", ".join(
          f"{k}: {a:.3f}" for k, a in i["val_auc_by_k"].items()) + ")."
      for n, i in r.get("fit_info", {}).items() if n == "lid"))
  if "adaptive" in r:
    parts += _adaptive(r, rule, tag, title, fig_dir, outdir)
  if "pool" in r:
    p = r["pool"]
    rows = [(e, p[e]["known"], p[e]["unknown_eot"], p[e]["unknown_eot_on_known_draws"],
             "{:.0f}-{:.0f}".format(*p[e]["unknown_eot_per_draw_range"]), p[e]["s"])
            for e in p if e[0].isdigit()]
    parts.append(f"**Randomised redundancy** ({p['n_draws']} draws from a pool of "
                 f"{len(p['modules'])} modules, {p['n']} images): residual attack success % of "
                 f"the attacker who knows the draw (draws {p['known_draws']}, one by one) and of "
                 "the one who does not (EOT over every draw, judged on each draw as deployed):"
                 "\n\n" + report.markdown_table(["eps", "known draw", "unknown (EOT), all draws",
                                                 "unknown, the known-case draws",
                                                 "unknown, range over draws", "attack s"],
                                                rows, 3))
  if "profile" in r:
    prof = r["profile"]
    rows = [(k, q["q10"], q["q25"], q["q50"], q["q75"], q["q90"])
            for k, q in prof["minimal"].items() if q]
    parts.append("Minimal L2 perturbations (successful examples; quantiles):\n\n" +
                 report.markdown_table(["attack", "10%", "25%", "50%", "75%", "90%"], rows, 3))
    rows = [(k, p["n"], p["median_train_percentile"], p["below_1pct"],
             p["closer_to_true_class"]) for k, p in prof["latent_placement"].items()]
    parts.append("Where adversarial points land in the last latent module's space: the "
                 "percentile of their log-density (under the class the victim now predicts) "
                 "among benign training images' (under their own classes), the share below "
                 "the 1% security threshold, and the share denser under their true class:\n\n"
                 + report.markdown_table(["attack", "n", "median percentile", "below 1% %",
                                          "closer to true class %"], rows, 3))
  roc = {f"{lbl} {NAMES[n]}": (np.maximum(d[rule]["roc"]["fpr"], 1e-3), d[rule]["roc"]["tpr"])
         for lbl in ("pgd_linf", "cw_l2") for n in names
         for d in [r["attacks"].get(lbl, {}).get("defences", {}).get(n, {})]
         if "roc" in d.get(rule, {})}
  _fig(parts, outdir, fig_dir, f"curtail_roc_{tag}.png", roc, xlabel="clean false-positive rate",
       ylabel="true-positive rate", title=f"ROC: {title}", logx=True)
  return parts


def _throughput(t: dict) -> list[str]:
  if "skipped" in t:
    return [f"Defender throughput: {t['skipped']}."]
  rows = [("1 process, 1 core, modules in turn (baseline)", t["baseline"]["images_per_s"], 1.0,
           t["baseline"]["cold_s"]),
          ("1 process, 1 core, two halves fused, in turn", t["same_work_one_core"]["images_per_s"],
           t["same_work_one_core"]["images_per_s"] / t["baseline"]["images_per_s"], None)]
  if "two_processes" in t:
    p = t["two_processes"]
    rows.append(("2 processes (jax.distributed, gloo), 1 core each, shard_map",
                 p["images_per_s"], p["speedup"], p["cold_s"]))
  for k, f in t["fake_devices"].items():
    rows.append((f"1 process, {k} fake CPU device(s) on {len(t['cores'])} cores, shard_map",
                 f["images_per_s"], f["images_per_s"] / t["baseline"]["images_per_s"],
                 f["cold_s"]))
  rows = [(a, b, c, "-" if d is None else d) for a, b, c, d in rows]
  diffs = ", ".join(f"{k} {v:.1e}" for k, v in t["max_abs_diff_vs_in_turn"].items())
  extra = (f"Two processes vs the same work on one core: "
           f"{t['two_processes']['speedup_same_work']:.2f}x. " if "two_processes" in t else "")
  return [f"MRR defender throughput on {t['n_images']} images (warm medians over "
          f"{t['rounds']} interleaved round(s)):\n\n" + report.markdown_table(
              ["configuration", "images/s", "vs baseline", "cold s"], rows, 3),
          extra + f"Largest score difference from the baseline (scores up to "
          f"{t['score_scale']:.0f}): {diffs}."]


def _bench(b: dict) -> list[str]:
  if "skipped" in b:
    return [f"Attack speed vs foolbox: {b['skipped']}."]
  rows = []
  for lbl, r in b.items():
    if not isinstance(r, dict):
      continue
    o, f = r["ours"], r["foolbox"]
    rows.append((lbl, o["warm_s"], f["warm_s"], r["speedup_warm"], o["cold_s"], f["cold_s"],
                 f"{o['success']:.0f} / {f['success']:.0f}",
                 f"{o['median_l2'] or 0:.3f} / {f['median_l2'] or 0:.3f}"))
  return [f"Our attacks vs foolbox 3 on the same victim, {b['n_images']} images, same "
          f"iterations (interleaved; warm = median of {b['reps']}):\n\n" + report.markdown_table(
              ["attack", "ours warm s", "foolbox warm s", "speed-up", "ours cold s",
               "foolbox cold s", "success % ours / fb", "median L2 ours / fb"], rows, 3)]


def _rule_choice(res: dict) -> str:
  c = res.get("rule_choice", {})
  if "skipped" in c:
    return f"Combination rule: **{res['rule']}** ({c['skipped']}; the full study's choice)."
  return (f"Combination rule: **{res['rule']}**, chosen on the seed-0 development victim's "
          f"validation images ({c['n_cal']} set the thresholds, {c['n_attacked']} attacked by "
          f"the {c['n_settings']} sweep settings): mean TPR at 5% " + ", ".join(
              f"{k} {v:.1f}%" for k, v in c["mean_tpr"].items()) + ". The OR is reported beside "
          "it in the modules table.")


def render(res: dict, outdir: str) -> report.Section:
  fig_dir = os.path.join(outdir, "figures")
  rule = res["rule"]
  rules = list(res["plan"].get("rules", [rule]))
  parts = [
      "CuRTAIL (Rouhani et al.): unsupervised defender modules whose disagreement with the "
      "victim flags adversarial inputs: latent Gaussians on fine-tuned hidden layers and "
      "per-class patch dictionaries with OMP denoising (both judge the input in the terms of "
      "the class the victim claims), and a label-free module (one patch dictionary for all "
      "classes: the image's per-pixel L1 residual relative to clean images, and its raw "
      "residual energy). Each module's "
      "score becomes a p-value on clean validation images and the p-values are combined; the "
      "threshold flags 5% of the validation images. Peers (Mahalanobis on the penultimate "
      "layer, MagNet's detector, Feature Squeezing, LID) see the same victims, attacks and "
      "held-out test images. Defender settings were chosen on a seed-0 victim, the victims "
      "below use other seeds. **Caveat first**: the adaptive attacker is the number to trust "
      "for a deployment; the non-adaptive tables show what an attacker ignorant of the "
      "defence achieves.", _rule_choice(res)]
  for r in res["runs"]:
    parts += _victim(r, rule, rules, fig_dir, outdir)
  if res["runs"]:
    names = [n for n in NAMES if n in res["plan"].get("defence_names", NAMES)]
    rows = [(f"{r['victim']['dataset']}/{r['victim']['model']}",
             *[f"{mean_auc(r, n, rule):.3f}" for n in names]) for r in res["runs"]]
    parts.append(f"Mean AUC over the fixed attacks ({rule}):\n\n" +
                 report.markdown_table(["victim", *(NAMES[n] for n in names)], rows))
    rows = []
    for r in res["runs"]:
      if "curtail" not in names:
        break
      w = worst(r, "curtail", rule)
      v = r["victim"]
      rs = res.get("fpr_resplits", {}).get(victims.VictimConfig(**v).tag, {})
      rs = rs.get("curtail", {}).get(rule)
      rows.append((f"{v['dataset']}/{v['model']}", f"{w['min_auc'][0]:.3f} ({w['min_auc'][1]})",
                   f"{w['max_residual'][0]:.1f} ({w['max_residual'][1]})", f"{w['fpr']:.1f}",
                   f"{rs['mean']:.1f} ± {rs['sd']:.1f} ({rs['q90']:.1f})" if rs else "-"))
    if rows:
      parts.append(f"CuRTAIL's worst case over every non-adaptive attack and strength "
                   f"({rule}): lowest AUC, highest residual attack success %, clean test "
                   "FPR % at the 5% validation point, and that FPR over random re-splits of "
                   "the pooled clean validation and test images (mean ± sd (90th "
                   "percentile)):\n\n" + report.markdown_table(
                       ["victim", "lowest AUC", "highest residual %", "clean FPR %",
                        "clean FPR % over re-splits"], rows))
  parts += _throughput(res["throughput"])
  parts += _bench(res["attack_benchmark"])
  if res["skipped"]:
    parts.append("Skipped: " + "; ".join(res["skipped"]))
  return report.Section("CuRTAIL: adversarial-input detection by Modular Robust Redundancy",
                        "\n\n".join(parts))


def run(quick: bool, outdir: str, progress: bool = True, plan: study.Plan | None = None
        ) -> report.Section:
  """Runs (or resumes) the study of ``plan`` (default: the mode's), writes its
  records to ``<outdir>/curtail_<mode>.json`` and renders them."""
  mode = "quick" if quick else "full"
  res = study.run(plan or (QUICK if quick else FULL), outdir, mode, progress=progress)
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, f"curtail_{mode}.json"), "w") as f:
    json.dump(res, f, indent=1, default=float)
  return render(res, outdir)


def section(quick: bool, outdir: str) -> report.Section:
  return run(quick, outdir)
