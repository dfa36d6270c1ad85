"""The CLEANN report section: plans for quick and full mode, and the renderer
that turns the study's records into Markdown tables and ROC plots."""

from __future__ import annotations

import json
import os

import numpy as np

from core import report
from secure import detection, sparse
from secure.cleann import adaptive, neural_cleanse, shield, study

FULL = study.Plan()
# Quick mode is a smoke check of every part in about two minutes: MLP victims
# (the full study's CNN makes Neural Cleanse and the victims several times slower).
QUICK = study.Plan(datasets=("mnist5k",), model="mlp", triggers=("patch", "blend"),
                   rates=(0.05,), steps={"mnist5k": 600}, nc=neural_cleanse.NCConfig(steps=60),
                   defender_sizes=(100,), adaptive=adaptive.AdaptiveConfig(steps=60, lr=0.02),
                   adaptive_on=("mnist5k",), fixed_bits=(6, 10), fixed_on=("patch",),
                   bench_reps=3, shield=shield.ShieldConfig(
                       input_dict=sparse.DictConfig(n_atoms=128, n_nonzero=4, iters=5),
                       latent_dict=sparse.DictConfig(n_atoms=128, n_nonzero=12, iters=5)))


def _pm(pct: float, n: int) -> str:
  return f"{pct:.1f} ± {100 * detection.binomial_se(pct / 100, n):.1f}"


def _name(r: dict) -> str:
  v = r["victim"]
  return f"{v['dataset']} {v['trigger']} {100 * v['rate']:g}%"


def render(res: dict, outdir: str) -> report.Section:
  fig_dir = os.path.join(outdir, "figures")
  runs, parts = res["runs"], []
  plan = res["plan"]
  parts.append(
      # Records from before Plan had a model field are CNN victims.
      f"Backdoored {plan.get('model', 'cnn').upper()} victims (all-to-one, target class 0), "
      "trained on poisoned data with the "
      "defender's benign images held out; every metric on the held-out test split (clean "
      "images, and the triggered versions of its non-target images). The defender sees "
      f"{runs[0]['n_defender'] if runs else '?'} unlabelled training images: 2/3 fit the "
      "dictionaries, 1/3 set the thresholds. Shield hyperparameters were chosen on seed-0 "
      f"mnist5k victims; these victims use seed(s) {plan['seeds']}. ± = binomial standard "
      "error.")
  parts.append("**The threat (no defence).**\n\n" + report.markdown_table(
      ["victim", "C-Acc %", "ASR %", "test images / triggered"],
      [[_name(r), _pm(r["threat"]["c_acc"], r["threat"]["n_test"]),
        _pm(r["threat"]["asr"], r["threat"]["n_attack"]),
        f"{r['threat']['n_test']} / {r['threat']['n_attack']}"] for r in runs]))
  rows = []
  for r in runs:
    na = r["threat"]["n_attack"]
    for f in (0.01, 0.05):
      k = f"fpr{f:g}"
      s, st, nc = r["shield"][k], r["strip"][k], r["nc"][k]
      rows.append([_name(r), f"{100 * f:g}%", _pm(s["tpr"], na), f"{s['fpr_test']:.1f}",
                   _pm(s["ra"], na), f"{s['asr_after']:.1f}", f"{s['c_acc_after']:.1f}",
                   _pm(st["tpr"], na), f"{st['asr_after']:.1f}",
                   _pm(nc["tpr"], na), f"{nc['asr_after']:.1f}"])
  parts.append(
      "**CLEANN vs STRIP and Neural Cleanse at fixed FPR** (threshold set on the defender's "
      "validation images; 'FPR test' is what it gives on the clean test images). CLEANN "
      "relabels what it flags (RA: triggered images ending with their true label); STRIP "
      "and NC's input filter reject (a rejected image counts as neither recovered nor "
      "attacked, and against clean accuracy).\n\n" + report.markdown_table(
          ["victim", "target FPR", "CLEANN TPR %", "FPR test %", "RA %", "ASR after %",
           "C-Acc after %", "STRIP TPR %", "STRIP ASR after %", "NC TPR %", "NC ASR after %"],
          rows))
  parts.append("**ROC AUC and cost per image** (CPU, this machine, warm; CLEANN includes "
               "recovery):\n\n" + report.markdown_table(
                   ["victim", "CLEANN", "input analyzer", "latent analyzer", "STRIP",
                    "NC filter", "NC anomaly index (suspect)", "ms/img CLEANN / STRIP / NC",
                    "NC reverse s"],
                   [[_name(r), f"{r['shield']['roc']['combined']['auc']:.4f}",
                     f"{r['shield']['roc']['input']['auc']:.4f}",
                     f"{r['shield']['roc'].get('latent', {}).get('auc', float('nan')):.4f}",
                     f"{r['strip']['roc']['auc']:.4f}", f"{r['nc']['roc']['auc']:.4f}",
                     f"{r['nc']['anomaly_index']:.2f} ({r['nc']['suspect']})"
                     + (" infected" if r["nc"]["infected"] else ""),
                     f"{r['shield']['ms_per_image']:.2f} / {r['strip']['ms_per_image']:.2f} / "
                     f"{r['nc']['ms_per_image']:.3f}", f"{r['nc']['fit_s']:.0f}"]
                    for r in runs]))
  for r in runs:
    series = {f"CLEANN (AUC {r['shield']['roc']['combined']['auc']:.3f})":
              (r["shield"]["roc"]["combined"]["fpr"], r["shield"]["roc"]["combined"]["tpr"]),
              "input analyzer": (r["shield"]["roc"]["input"]["fpr"],
                                 r["shield"]["roc"]["input"]["tpr"])}
    if "latent" in r["shield"]["roc"]:
      series["latent analyzer"] = (r["shield"]["roc"]["latent"]["fpr"],
                                   r["shield"]["roc"]["latent"]["tpr"])
    series[f"STRIP ({r['strip']['roc']['auc']:.3f})"] = (r["strip"]["roc"]["fpr"],
                                                          r["strip"]["roc"]["tpr"])
    series[f"NC filter ({r['nc']['roc']['auc']:.3f})"] = (r["nc"]["roc"]["fpr"],
                                                          r["nc"]["roc"]["tpr"])
    tag = _name(r).replace(" ", "_").replace("%", "pct")
    # Log FPR axis: the operating points (1%, 5%) sit where a linear axis shows nothing.
    series = {k: (np.maximum(np.asarray(x), 1e-4), y) for k, (x, y) in series.items()}
    path = report.line_plot(os.path.join(fig_dir, f"cleann_roc_{tag}.png"), series,
                            xlabel="false-positive rate (clean test, log scale)",
                            ylabel="true-positive rate (triggered test)",
                            title=f"ROC: {_name(r)}", logx=True)
    parts.append(f"![ROC {_name(r)}]({os.path.relpath(path, outdir)})")
  sized = [r for r in runs if r.get("defender_sizes")]
  if sized:
    ns = sorted({int(n) for r in sized for n in r["defender_sizes"]})
    parts.append("**Defender-set size** (benign images the defender holds; CLEANN TPR at "
                 "1% / 5% FPR, and AUC):\n\n" + report.markdown_table(
                     ["victim"] + [f"{n} images" for n in ns],
                     [[_name(r)] + [
                         (lambda d: f"{d['tpr0.01']:.1f} / {d['tpr0.05']:.1f} ({d['auc']:.3f})"
                          if d else "-")(r["defender_sizes"].get(str(n)))
                         for n in ns] for r in sized]))
  for a in res["adaptive"]:
    s = a["shield"]
    na = a["threat"]["n_attack"]
    parts.append(
        f"**Adaptive attacker ({a['dataset']}).** Knows the shield; optimises an additive "
        f"trigger (L∞ {a['linf']:.2f}) for the patch victim's target loss plus the shield's "
        "scores, then poisons a fresh victim with it. On the original victim the trigger "
        f"reaches ASR {a['on_original_victim']['asr']:.1f}% (TPR at 1% FPR "
        f"{a['on_original_victim']['tpr1']:.1f}%); after poisoning with it: "
        f"C-Acc {_pm(a['threat']['c_acc'], a['threat']['n_test'])}%, ASR "
        f"{_pm(a['threat']['asr'], na)}%.\n\n" + report.markdown_table(
            ["target FPR", "TPR %", "RA %", "ASR after %", "C-Acc after %", "AUC (input / latent)"],
            [[f"{100 * f:g}%", _pm(s[f'fpr{f:g}']['tpr'], na), _pm(s[f'fpr{f:g}']['ra'], na),
              f"{s[f'fpr{f:g}']['asr_after']:.1f}", f"{s[f'fpr{f:g}']['c_acc_after']:.1f}",
              f"{s['roc']['input']['auc']:.3f} / "
              f"{s['roc'].get('latent', {}).get('auc', float('nan')):.3f}"]
             for f in (0.01, 0.05)]))
  fx = [r for r in runs if r.get("fixed_point")]
  if fx:
    bits = [p["bits"] for p in fx[0]["fixed_point"]]
    parts.append(
        "**Fixed-point datapath** (input analyzer; dictionary, residual path and "
        "factor/coefficients all at the given width, integer bits sized on the validation "
        "images; threshold re-set at 1% FPR on them). TPR at 1% FPR / recovery accuracy, %; "
        "32 = float:\n\n" + report.markdown_table(
            ["victim"] + [f"{b} bits" for b in bits],
            [[_name(r)] + [f"{p['tpr1']:.1f} / {p['recovery']:.1f}" for p in r["fixed_point"]]
             for r in fx]))
  b = res["omp_benchmark"]
  parts.append(
      f"**Batched OMP: JAX vs scikit-learn** on {b['n']:,} DCT patches ({b['features']} "
      f"features) of test images, the shield's {b['atoms']}-atom dictionary, {b['k']} atoms "
      f"each, no tolerance, medians of {b['reps']} interleaved runs: JAX warm "
      f"{b['jax_warm_s']:.3f} s, cold (compile included) {b['jax_cold_s']:.2f} s; "
      f"scikit-learn `orthogonal_mp_gram` {b['sklearn_s']:.3f} s: **{b['speedup']:.1f}x** warm. "
      f"Identical support on {100 * b['support_agreement']:.2f}% of the signals (the rest "
      "differ by near-ties in float32 vs float64 atom selection); median over signals of "
      f"the largest coefficient difference {b['median_coef_diff']:.1e}.")
  fr = res["fpga"]
  parts.append(
      "**FPGA cost model (a model, not a measurement; not calibrated)** of the shield per "
      "28x28 image (all patches through DCT/OMP/inverse DCT plus the latent OMP), "
      "next to the measured CPU time above.\n\n" + report.markdown_table(
          ["word length", "MACs", "cycles", "us/image", "images/s", "uJ/image", "DSP",
           "BRAM kbit (share)"],
          [[f"{k} bits", f"{e['macs']:,}", f"{e['cycles']:,}", f"{e['us_per_image']:.1f}",
            f"{e['images_per_s']:,.0f}", f"{e['uj_per_image']:.1f}", e["dsp"],
            f"{e['bram_kbit']:.0f} ({100 * e['bram_fraction']:.0f}%)"] for k, e in fr.items()])
      + "\n\nConstants:\n\n" + "\n".join(
          f"- `{k}` = {c['value']:g} {c['unit']}: {c['source']}"
          for k, c in res["fpga_constants"].items()) + f"\n\n{res['fpga_reference']}")
  if res["skipped"]:
    parts.append("Skipped: " + "; ".join(res["skipped"]))
  return report.Section("CLEANN: Trojan detection and label recovery by sparse recovery",
                        "\n\n".join(parts))


def run(quick: bool, outdir: str, progress: bool = True, plan: study.Plan | None = None
        ) -> report.Section:
  """Runs (or resumes) the study of ``plan`` (default: the mode's), writes its
  records to ``<outdir>/cleann_<mode>.json`` and renders them."""
  mode = "quick" if quick else "full"
  res = study.run(plan or (QUICK if quick else FULL), outdir, mode, progress=progress)
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, f"cleann_{mode}.json"), "w") as f:
    json.dump(res, f, indent=1, default=float)
  return render(res, outdir)


def section(quick: bool, outdir: str) -> report.Section:
  return run(quick, outdir)

