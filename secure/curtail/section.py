"""The CuRTAIL report section: plans for quick and full mode, and the renderer
that turns the study's records into Markdown tables and plots."""

from __future__ import annotations

import json
import os

import numpy as np

from core import report
from secure import detection, sparse
from secure.curtail import adaptive, defences, input_defender, latent, peers, study

FULL = study.Plan()
# Quick mode is a smoke check of every part in about a minute and a half: the
# mnist5k MLP only, fewer images, shorter attacks and fine-tuning.
QUICK = study.Plan(
    victims=(("mnist5k", "mlp"),), steps={"mnist5k": 1500}, n_attack=100, n_jsma=40,
    n_clean=500, eps_linf=(0.02, 0.05, 0.1, 0.2), eps_l2=(0.5, 1.5, 3.0), n_profile=100,
    attacks=dict(study.ATTACKS) | {"cw_l2": ("cw_l2", {"binary_steps": 4, "steps": 60})},
    defences=defences.CurtailConfig(
        latent=latent.LatentConfig(steps=500), magnet=peers.MagNetConfig(steps=300),
        input=input_defender.InputDefenderConfig(
            images_per_class=100, dictionary=sparse.DictConfig(n_atoms=64, n_nonzero=4,
                                                               iters=4))),
    adaptive=adaptive.AdaptiveConfig(steps=40, penalties=(3.0,), gradients=("exact",)),
    adaptive_on=(("mnist5k", "mlp"),), n_adaptive=100, throughput_images=256,
    throughput_rounds=1, bench_images=100, bench_reps=1, bench_attacks=("fgsm", "pgd_linf"))

NAMES = {"curtail": "CuRTAIL (MRR)", "mahalanobis": "Mahalanobis", "magnet": "MagNet",
         "feature_squeezing": "Feature Squeezing"}


def _pm(pct: float | None, n: int) -> str:
  if pct is None:
    return "-"
  return f"{pct:.1f} ± {100 * detection.binomial_se(pct / 100, n):.1f}"


def _auc(r: dict) -> str:
  return f"{r['auc']:.3f}" if "auc" in r else "-"


def mean_auc(run: dict, defence: str) -> float:
  """Mean ROC AUC of ``defence`` over the run's (non-adaptive) attacks."""
  return float(np.mean([a["defences"][defence]["auc"] for a in run["attacks"].values()
                        if "auc" in a["defences"][defence]]))


def _victim_tables(r: dict, fig_dir: str, outdir: str) -> list[str]:
  v = r["victim"]
  tag = f"{v['dataset']}_{v['model']}"
  names = list(next(iter(r["attacks"].values()))["defences"])
  parts = [f"#### {v['dataset']} / {v['model'].upper()} (seed {v['seed']}): test accuracy "
           f"{_pm(r['accuracy'], r['n_test'])} %"]
  rows = [(lbl, _pm(a["success"], a["n"]), a["median_l2"] or "-", a["median_linf"] or "-",
           a["median_l0"] or "-", a["s"]) for lbl, a in r["attacks"].items()]
  parts.append(report.markdown_table(["attack", "success %", "median L2", "median L-inf",
                                      "median L0", "time s"], rows, digits=3))
  hdr = ["attack"] + [NAMES[n] for n in names]
  cell = lambda d: f"{_auc(d)} / {_pm(d.get('tpr'), d['n_success'])}"
  rows = [[lbl] + [cell(a["defences"][n]) for n in names] for lbl, a in r["attacks"].items()]
  rows.append(["mean AUC"] + [f"{mean_auc(r, n):.3f}" for n in names])
  any_a = next(iter(r["attacks"].values()))["defences"]
  rows.append(["clean FPR % (test)"] + [_pm(any_a[n]["fpr"], any_a[n]["n_clean"]) for n in names])
  parts.append("ROC AUC / TPR % at the 5% operating point (thresholds from validation images; "
               "TPR over the attack's successful examples):\n\n" + report.markdown_table(hdr, rows))
  rows = [[lbl] + [_pm(a["defences"][n]["residual"], a["defences"][n]["n_attacked"])
                   for n in names] for lbl, a in r["attacks"].items()]
  parts.append("Residual attack success % (attacked images that fool the victim and pass "
               "undetected), same operating point:\n\n" + report.markdown_table(hdr, rows))
  mods = list(next(iter(r["attacks"].values()))["defences"]["curtail"].get("module_auc", {}))
  rows = [[lbl] + [a["defences"]["curtail"].get("module_auc", {}).get(m, "-") for m in mods]
          + [a["defences"]["curtail"].get("auc", "-")] for lbl, a in r["attacks"].items()]
  parts.append("CuRTAIL's modules alone (ROC AUC) and combined by OR:\n\n" +
               report.markdown_table(["attack", *mods, "OR"], rows, digits=3))
  cost = r["ms_per_image"]
  parts.append("Defender cost (ms per image, warm, this CPU): " + ", ".join(
      f"{NAMES[n]} {cost[n]:.3f}" for n in names) + "; fitting (s): " + ", ".join(
      f"{NAMES[n]} {r['fit_s'][n]:.0f}" for n in names) + ".")
  if "adaptive" in r:
    rows = [(NAMES[n], _auc(a), _pm(a.get("tpr"), a["n_success"]), a["n_success"],
             _pm(a["residual"], a["n_attacked"]), a["s"]) for n, a in r["adaptive"].items()]
    parts.append("**Adaptive white-box attacker** (each defence attacked knowing it, its "
                 "thresholds and every module; gradients through OMP's projection, and BPDA "
                 "through OMP and bit-depth rounding; residual = fooled and undetected):\n\n"
                 + report.markdown_table(["defence", "AUC", "TPR %", "fooled",
                                          "residual attack success %", "attack s"], rows,
                                         digits=3))
  # Vulnerability profile.
  prof = r["profile"]
  series = {lbl: ([p["eps"] for p in pts], [p["success"] for p in pts],
                  [100 * detection.binomial_se(p["success"] / 100, p["n"]) for p in pts])
            for lbl, pts in prof["eps_sweep"].items() if lbl != "pgd_l2"}
  if series:
    path = report.line_plot(os.path.join(fig_dir, f"curtail_eps_{tag}.png"), series,
                            xlabel="L-inf epsilon", ylabel="attack success %",
                            title=f"Vulnerability: {v['dataset']} {v['model'].upper()}")
    parts.append(f"![success vs epsilon]({os.path.relpath(path, outdir)})")
  if "pgd_l2" in prof["eps_sweep"]:
    parts.append("PGD-L2 success against epsilon: " + ", ".join(
        f"{p['eps']:g}: {p['success']:.0f}%" for p in prof["eps_sweep"]["pgd_l2"]) + ".")
  rows = [(k, q["q10"], q["q25"], q["q50"], q["q75"], q["q90"])
          for k, q in prof["minimal"].items() if q]
  parts.append("Minimal L2 perturbations (successful examples; quantiles):\n\n" +
               report.markdown_table(["attack", "10%", "25%", "50%", "75%", "90%"], rows, 3))
  rows = [(k, p["n"], p["median_train_percentile"], p["below_1pct"], p["closer_to_true_class"])
          for k, p in prof["latent_placement"].items()]
  parts.append("Where adversarial points land in the last latent module's space: the "
               "percentile of their log-density (under the class the victim now predicts) "
               "among benign training images' (under their own classes), the share below "
               "the 1% security threshold, and the share denser under their true class:\n\n"
               + report.markdown_table(["attack", "n", "median percentile", "below 1% %",
                                        "closer to true class %"], rows, 3))
  roc = {}
  for lbl in ("pgd_linf", "cw_l2"):
    for n in names:
      d = r["attacks"].get(lbl, {}).get("defences", {}).get(n, {})
      if "roc" in d:
        roc[f"{lbl} {NAMES[n]}"] = (np.maximum(d["roc"]["fpr"], 1e-3), d["roc"]["tpr"])
  if roc:
    path = report.line_plot(os.path.join(fig_dir, f"curtail_roc_{tag}.png"), roc,
                            xlabel="clean false-positive rate", ylabel="true-positive rate",
                            title=f"ROC: {v['dataset']} {v['model'].upper()}", logx=True)
    parts.append(f"![ROC]({os.path.relpath(path, outdir)})")
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


def render(res: dict, outdir: str) -> report.Section:
  fig_dir = os.path.join(outdir, "figures")
  parts = [
      "CuRTAIL (Rouhani et al.): unsupervised defender modules (latent Gaussians on "
      "fine-tuned hidden layers, per-class patch dictionaries with OMP denoising) whose "
      "disagreement with the victim flags adversarial inputs; combined by OR. Peers "
      "(Mahalanobis on the penultimate layer, MagNet's detector, Feature Squeezing) see the "
      "same victims, attacks and held-out test images. Thresholds are set on each victim's "
      "validation split so that the OR flags 5% of its clean images; defender settings were "
      "chosen on a seed-0 victim, the victims below use other seeds. **Caveat first**: the "
      "adaptive attacker below is the number to trust for a deployment; the non-adaptive "
      "tables show what an attacker ignorant of the defence achieves."]
  for r in res["runs"]:
    parts += _victim_tables(r, fig_dir, outdir)
  if res["runs"]:
    names = [n for n in NAMES if n in res["plan"].get("defence_names", NAMES)]
    rows = [(f"{r['victim']['dataset']}/{r['victim']['model']}",
             *[f"{mean_auc(r, n):.3f}" for n in names]) for r in res["runs"]]
    parts.append("Mean AUC over the non-adaptive attacks:\n\n" +
                 report.markdown_table(["victim", *(NAMES[n] for n in names)], rows))
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
