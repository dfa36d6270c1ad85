"""The RAPIDNN report section: plans, the (u, w) grids, heatmaps, the k-means
benchmark and the cost model."""

from __future__ import annotations

import json
import os

import numpy as np

from accel import cost_model, study
from accel.program import program
from accel.retrain import RetrainConfig
from core import data, report

FULL = study.GridPlan(
    runs=tuple((ds, m, {"digits": 1500, "mnist5k": 2000, "fashion_mnist": 3000}[ds])
               for ds in ("mnist5k", "fashion_mnist", "digits") for m in ("mlp", "cnn")),
    retrain=RetrainConfig(steps=300, batch=64, lr=5e-4))
QUICK = study.GridPlan(runs=(("mnist5k", "mlp", 600),), sizes=(4, 16, 64),
                       retrain=RetrainConfig(steps=100, batch=64, lr=1e-3), check_images=256,
                       act_levels=(8, 32))
KMEANS_KS = (16, 64)


def run(quick: bool, outdir: str, progress: bool = True) -> report.Section:
  plan = QUICK if quick else FULL
  mode = "quick" if quick else "full"
  results, skipped = [], []
  for ds_name, model, steps in plan.runs:
    try:
      ds = data.load(ds_name)
    except data.DatasetNotFoundError as e:
      skipped.append(f"{ds_name}/{model}: {e}")
      continue
    tag = f"{ds_name}_{model}"
    res, params, mcfg = study.grid_run(ds, model, steps, plan,
                         workdir=os.path.join(outdir, "models", f"rapidnn_{mode}_{tag}"),
                         cache_path=os.path.join(outdir, "rapidnn", f"{mode}_{tag}.json"),
                         progress=progress)
    ops = program(model, mcfg)
    counts = cost_model.count_ops(ops, ds.input_shape, params)
    res["cost"] = cost_model.compare(counts, res["chosen"][0])
    res["counts"] = {k: v for k, v in vars(counts).items() if k != "layers"}
    if ds_name == "mnist5k":
      vals = study.layer_values(params, ops, ds.x_train[:plan.calib_images])
      if not any("kmeans" in r for r in results):  # the patch problem is model-independent
        vals["4x4 image patches (16-D)"] = study.image_patches(
            ds.x_train, n=5000 if quick else 20000)
      res["kmeans"] = study.kmeans_benchmark(vals, KMEANS_KS, seeds=1 if quick else 3)
    results.append(res)
  with open(os.path.join(outdir, f"rapidnn_{mode}.json"), "w") as f:
    json.dump({"results": results, "skipped": skipped}, f, indent=1, default=float)
  return render(results, skipped, plan, outdir)


def _grid(res: dict, key: str, sizes) -> np.ndarray:
  return np.array([[res["cells"][f"{u},{w}"][key] - res["float_acc"] for w in sizes]
                   for u in sizes])


def render(results: list[dict], skipped: list[str], plan: study.GridPlan,
           outdir: str) -> report.Section:
  fig_dir = os.path.join(outdir, "figures")
  rows, figs = [], []
  for r in results:
    cells = {tuple(map(int, k.split(","))): c for k, c in r["cells"].items()}
    best_before = study.smallest_within(cells, r["float_val"], plan.bound, key="val_before")
    c64 = r["cells"].get(f"{max(plan.sizes)},{max(plan.sizes)}", {})
    u, w = r["chosen"]
    chosen = r["cells"][f"{u},{w}"]
    n = r["n_test"]
    ch = r["check"]
    se = lambda a: f"{a:.2f} ± {study.binomial_se(a, n):.2f}"
    rows.append([r["dataset"], r["model"], se(r["float_acc"]),
                 f"{c64.get('before', float('nan')):.2f} / {c64.get('after', float('nan')):.2f}",
                 "none" if best_before is None else f"{best_before[0]}x{best_before[1]}",
                 f"{u}x{w}" if r["within_bound"] else "none (64x64 shown)",
                 f"{chosen['val_after']:.2f} vs {r['float_val']:.2f}",
                 se(chosen["after"]), f"{chosen['after'] - r['float_acc']:+.2f}",
                 f"{100 * ch['agree']:.1f}% ({ch['max_logit_diff']:.1e})",
                 f"{ch['emulator_img_s']:,.0f} / {ch['float_img_s']:,.0f}"])
    for key, label in (("before", "before retraining"), ("after", "after retraining")):
      figs.append(report.heatmap(
          os.path.join(fig_dir, f"rapidnn_{r['dataset']}_{r['model']}_{key}.png"),
          _grid(r, key, plan.sizes), plan.sizes, plan.sizes, xlabel="w (weight clusters)",
          ylabel="u (input clusters)", fmt_cell="{:+.1f}", cmap="RdYlGn",
          title=f"{r['dataset']} {r['model']}: test accuracy change (points), {label}"))
  n_val = sorted({r["n_val"] for r in results})
  parts = [
      f"Float models vs the clustered datapath over (u, w) in {list(plan.sizes)}^2; retraining = "
      f"{plan.retrain.steps} steps of centroid-preserving fine-tuning (batch "
      f"{plan.retrain.batch}, lr {plan.retrain.lr:g}). Quality bound: {plan.bound} accuracy "
      f"points below float. **The cell is chosen on a validation split** ({n_val} images "
      "carved from the training set, never seen by the float model or the retraining) and "
      "**reported on the test split** (accuracy ± binomial standard error). Emulator check: "
      "the lookup datapath on the chosen cell vs the centroid-substituted float network "
      "(prediction agreement, largest logit gap); throughput on this CPU in images/s.",
      report.markdown_table(
          ["dataset", "model", "float test acc", "64x64 test before / after",
           "smallest within bound on val (before)", "smallest within bound on val (after)",
           "its val acc vs float val", "its test acc", "test change", "emulator agrees",
           "emulator / float img/s"], rows)]
  parts += [f"![heatmap]({os.path.relpath(f, outdir)})" for f in figs]
  acts = list(plan.act_levels)
  parts += [
      "Activation levels (the third knob): accuracy at the chosen (u, w) before retraining, "
      "with each layer's pre-activations snapped to a levels before the ReLU (exact ReLU: the "
      "'none' column):",
      report.markdown_table(
          ["dataset", "model", "u x w", "none"] + [f"a={a}" for a in acts],
          [[r["dataset"], r["model"], f"{r['chosen'][0]}x{r['chosen'][1]}",
            f"{r['chosen_before']:.2f}"] + [f"{r['act_levels'][str(a)]:.2f}" for a in acts]
           for r in results])]
  km = [k for r in results for k in r.get("kmeans", [])]
  if km:
    parts += [f"k-means on the mnist5k layers' own data (weights and sampled inputs, 1-D) and on "
              "4x4 image patches (16-D): JAX (jitted; warm median, and its first call with "
              "compilation) vs scikit-learn KMeans (Lloyd, k-means++, one init), both at "
              f"max_iter={km[0]['max_iter']} and relative tol={km[0]['tol']:g}, over "
              f"{km[0]['seeds']} seed(s) run interleaved; inertia and iterations are medians "
              "over seeds. On 1-D data JAX assigns points by a binary search over sorted "
              "centre midpoints (O(N log k)), a special case scikit-learn does not take; the "
              "16-D row uses brute-force distances like scikit-learn.",
              report.markdown_table(
                  ["data", "N", "D", "k", "JAX warm s", "JAX cold s", "sklearn s",
                   "JAX/sklearn time", "JAX/sklearn inertia", "iters JAX / sklearn"],
                  [[k["data"], k["n"], k["d"], k["k"], f"{k['jax_s']:.3f}",
                    f"{k['jax_first_s']:.2f}", f"{k['sklearn_s']:.3f}",
                    f"{k['jax_s'] / k['sklearn_s']:.2f}",
                    f"{k['jax_inertia'] / k['sklearn_inertia']:.3f}",
                    f"{k['jax_iters']:.0f} / {k['sklearn_iters']:.0f}"] for k in km])]
  crow = []
  for r in results:
    c = r["cost"]
    crow.append([f"{r['dataset']} {r['model']}", f"{r['counts']['macs']:,}",
                 f"{c['rapidnn_pj']['total'] / 1e3:,.1f}", f"{c['isaac_pj'] / 1e3:,.1f}",
                 f"{c['gpu_pj'] / 1e3:,.1f}", f"{c['isaac_over_rapidnn']:.2f}x",
                 f"{c['gpu_over_rapidnn']:.2f}x", f"{c['isaac_ns'] / c['rapidnn_ns']:.2f}x",
                 f"{1e3 * c['rapidnn_pj_per_mac']:,.0f} / "
                 f"{1e3 * c['pj_per_mac_for_paper_ratio']:.0f}"])
  srcs = {**cost_model.HOROWITZ, **cost_model.ISAAC, **cost_model.GPU,
          "lookup_ns": cost_model.LOOKUP_NS}
  parts += [
      "**Cost model (a model, not a measurement).** Energy per inference (nJ) from the "
      "emulated network's operation counts; RAPIDNN's blocks priced as SRAM table reads and "
      "16-bit adds (its NVM per-block figures are not available offline); ISAAC as its "
      "array+ADC+DAC energy only (a lower bound); GPU at peak fp32 efficiency plus two SRAM "
      f"operand reads per MAC. Paper's claims: {cost_model.PAPER_CLAIMS['energy_vs_isaac']}x / "
      f"{cost_model.PAPER_CLAIMS['energy_vs_pipelayer']}x energy efficiency and "
      f"{cost_model.PAPER_CLAIMS['speedup_vs_isaac']}x / "
      f"{cost_model.PAPER_CLAIMS['speedup_vs_pipelayer']}x speed-up over ISAAC / PipeLayer "
      "(PipeLayer is not modelled). Last column: the modelled RAPIDNN energy per "
      "multiply-accumulate (lookup, add and its share of searches and pooling) next to what "
      "it may cost for the paper's 68.4x over ISAAC to hold, in fJ.",
      report.markdown_table(["network", "MACs", "RAPIDNN nJ", "ISAAC nJ", "GPU nJ",
                             "energy ISAAC/RAPIDNN", "energy GPU/RAPIDNN",
                             "latency ISAAC/RAPIDNN (per unit)", "fJ/MAC: model / for 68.4x"],
                            crow),
      "Constants:\n\n" + "\n".join(f"- `{k}` = {v.value:g} {v.unit}: {v.source}"
                                    for k, v in srcs.items())]
  if skipped:
    parts.append("Skipped: " + "; ".join(skipped))
  return report.Section("RAPIDNN: clustered lookup datapath, retraining, cost model",
                        "\n\n".join(parts))


def section(quick: bool, outdir: str) -> report.Section:
  return run(quick, outdir)
