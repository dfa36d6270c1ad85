"""The CLEANN report section: plans for quick and full mode, and the renderer
that turns the study's records into Markdown tables and ROC plots."""

from __future__ import annotations

import json
import os

import numpy as np

from core import report
from secure import detection, sparse
from secure.cleann import adaptive, neural_cleanse, shield, study

FULL = study.Plan(adaptive_on=("mnist5k",))
# Quick mode is a smoke check of every part in about three minutes: MLP victims
# (the full study's CNN makes Neural Cleanse and the victims several times slower).
QUICK = study.Plan(datasets=("mnist5k",), model="mlp", triggers=("patch", "blend"),
                   rates=(0.05,), extra=(), steps={"mnist5k": 600},
                   nc=neural_cleanse.NCConfig(steps=60), max_test=None, resplits=50,
                   defender_sizes=(300,), adaptive=adaptive.AdaptiveConfig(steps=60, lr=0.02),
                   adaptive_on=("mnist5k",), fixed_bits=(6, 10), fixed_on=("patch",),
                   bench_reps=3, shield=shield.ShieldConfig(
                       input_dict=sparse.DictConfig(n_atoms=128, n_nonzero=4, iters=5),
                       latent_dict=sparse.DictConfig(n_atoms=128, n_nonzero=12, iters=5)))


PEER_NAMES = {"strip": "STRIP", "nc": "NC filter", "scale_up": "SCALE-UP", "teco": "TeCo",
              "ibd_psc": "IBD-PSC"}
PLOTTED = ("blend", "sig", "warp")   # ROC figures for the image-wide triggers


def _modules(runs) -> list[str]:
  """The shield's module names over the runs (input, envelope, latent layers)."""
  out = []
  for r in runs:
    out += [m for m in r["shield"]["roc"] if m not in ("or", "fisher") and m not in out]
  return out


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
      f"{runs[0]['n_defender'] if runs else '?'} unlabelled training images: "
      f"{100 * plan['shield']['fit_fraction']:.0f}% fit the analyzers, the rest calibrate the "
      "p-values and set the thresholds. Shield hyperparameters were chosen on seed-0 "
      f"mnist5k victims; these victims use seed(s) {plan['seeds']}. ± = binomial standard "
      "error.")
  parts.append("**The threat (no defence).**\n\n" + report.markdown_table(
      ["victim", "C-Acc %", "ASR %", "test images / triggered"],
      [[_name(r), _pm(r["threat"]["c_acc"], r["threat"]["n_test"]),
        _pm(r["threat"]["asr"], r["threat"]["n_attack"]),
        f"{r['threat']['n_test']} / {r['threat']['n_attack']}"] for r in runs]))
  rule = plan["shield"]["rule"]
  peers = plan["peers"]
  for f in (0.01, 0.05):
    rows = []
    for r in runs:
      s, na = r["shield"][f"{rule}{f:g}"], r["held_out"]["n_attack"]
      rows.append([_name(r), _pm(s["tpr"], na), f"{s['fpr_test']:.1f}", f"{s['c_acc_after']:.1f}",
                   f"{s['asr_after']:.1f}", _pm(s["ra"], na)]
                  + [f"{r['peers'][p][f'fpr{f:g}']['tpr']:.1f} / "
                     f"{r['peers'][p][f'fpr{f:g}']['ra']:.1f}" for p in peers])
    parts.append(
        f"**At {100 * f:g}% target FPR** (threshold on the defender's validation images; "
        "'FPR test' = what it gives on the clean test images). CLEANN relabels what it "
        f"flags ({rule} combination); the peers reject, so their R-Acc counts only unflagged "
        "triggered images that keep their true label. Peers: TPR / R-Acc, %.\n\n"
        + report.markdown_table(
            ["victim", "CLEANN TPR %", "FPR test %", "C-Acc after %", "ASR after %",
             "R-Acc %"] + [PEER_NAMES[p] for p in peers], rows))
  parts.append(
      "**ROC AUC per module and defence, cost per image** (CPU, this machine, warm; CLEANN: "
      "all analyzers, then recovery of every triggered image):\n\n" + report.markdown_table(
          ["victim", "CLEANN (OR / Fisher)"]
          + [m for m in _modules(runs)] + [PEER_NAMES[p] for p in peers]
          + ["ms/img CLEANN detect + recover", "ms/img peers"],
          [[_name(r), f"{r['shield']['roc']['or']['auc']:.3f} / "
            f"{r['shield']['roc']['fisher']['auc']:.3f}"]
           + [f"{r['shield']['roc'][m]['auc']:.3f}" if m in r["shield"]["roc"] else "-"
              for m in _modules(runs)]
           + [f"{r['peers'][p]['roc']['auc']:.3f}" for p in peers]
           + [f"{r['shield']['detect_ms_per_image']:.2f} + {r['shield']['recover_ms']:.2f}",
              " / ".join(f"{r['peers'][p]['ms_per_image']:.2f}" for p in peers)]
           for r in runs]))
  parts.append(
      "**Recovery per path** (RA % over every triggered test image if all took the path; "
      "'routed' is the shield's chain: the patch reconstruction, else (where the victim "
      "still gives the triggered image's label) the envelope-clipped image, else that one "
      "purified on the latent side):\n\n" + report.markdown_table(
          ["victim"] + list(r_paths := [p for p in shield.PATHS
                                        if runs and p in runs[0]["shield"]["paths"]]),
          [[_name(r)] + [f"{r['shield']['paths'][p]:.1f}" for p in r_paths] for r in runs]))
  parts.append(
      "**Combination rule and the threshold's variability.** TPR % at 1% / 5% FPR under the "
      "OR (one per-module level; the baseline) and Fisher's rule, and over "
      f"{plan['resplits']} bootstrap re-draws of the validation images the test FPR and "
      f"TPR at 1% target FPR ({rule}; 10th / 50th / 90th percentile):\n\n"
      + report.markdown_table(
          ["victim", "OR", "Fisher", "test FPR at 1% (re-draws)", "TPR at 1% (re-draws)"],
          [[_name(r)] + [f"{r['shield'][f'{q}0.01']['tpr']:.1f} / "
                         f"{r['shield'][f'{q}0.05']['tpr']:.1f}" for q in ("or", "fisher")]
           + [" / ".join(f"{v:.1f}" for v in r["resplits"]["0.01"][k])
              for k in ("fpr_test", "tpr")] for r in runs]))
  for r in runs:
    if r["victim"]["trigger"] not in PLOTTED:
      continue
    roc = r["shield"]["roc"]
    series = {f"CLEANN {rule} (AUC {roc[rule]['auc']:.3f})": (roc[rule]["fpr"], roc[rule]["tpr"])}
    series |= {m: (roc[m]["fpr"], roc[m]["tpr"]) for m in _modules([r])}
    series |= {f"{PEER_NAMES[p]} ({r['peers'][p]['roc']['auc']:.3f})":
               (r["peers"][p]["roc"]["fpr"], r["peers"][p]["roc"]["tpr"]) for p in peers}
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
    s = {f: a["shield"][f"{rule}{f:g}"] for f in (0.01, 0.05)}
    na = a["shield"]["n_attack"]
    parts.append(
        f"**Adaptive attacker ({a['dataset']}).** Knows the shield; optimises an additive "
        f"trigger (L∞ {a['linf']:.2f}) for the patch victim's target loss plus the shield's "
        "scores, then poisons a fresh victim with it. On the original victim the trigger "
        f"reaches ASR {a['on_original_victim']['asr']:.1f}% (TPR at 1% FPR "
        f"{a['on_original_victim']['tpr1']:.1f}%); after poisoning with it: "
        f"C-Acc {_pm(a['threat']['c_acc'], a['threat']['n_test'])}%, ASR "
        f"{_pm(a['threat']['asr'], na)}%.\n\n" + report.markdown_table(
            ["target FPR", "TPR %", "RA %", "ASR after %", "C-Acc after %",
             "AUC per module"],
            [[f"{100 * f:g}%", _pm(s[f]['tpr'], na), _pm(s[f]['ra'], na),
              f"{s[f]['asr_after']:.1f}", f"{s[f]['c_acc_after']:.1f}",
              " / ".join(f"{m} {a['shield']['roc'][m]['auc']:.3f}" for m in _modules([a]))]
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

