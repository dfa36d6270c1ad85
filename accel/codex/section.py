"""The CodeX report section: plans, the study records, then Markdown + plots."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from accel import study as rapid_study
from accel.codex import encoding, finn, fpga, study
from accel.program import program
from accel.retrain import RetrainConfig
from core import data, report
from core.cache import RunCache
from core.models import cnn

PAPER_RATIO = 4.65   # CodeX over stand-alone weight encoding, mean of MNIST/SVHN/CIFAR-10
FULL = study.CodexPlan(
    runs=tuple((ds, m, {"digits": 1500, "mnist5k": 2000, "fashion_mnist": 3000}[ds])
               for ds in ("fashion_mnist", "mnist5k", "digits") for m in ("cnn", "mlp")))
# Quick: the RAPIDNN quick section's float model (same workdir: not retrained).
QUICK = study.CodexPlan(runs=(("mnist5k", "mlp", 600),), evaluations=40, seeds=(0, 1),
                        int_bits=(4, 2), qat=RetrainConfig(steps=100, lr=5e-4),
                        retrain=RetrainConfig(steps=100, batch=64, lr=1e-3))


def run(plan: study.CodexPlan, mode: str, outdir: str, progress: bool = True) -> report.Section:
  results, skipped = [], []
  # A finished network is kept, so an interrupted study resumes at the next one;
  # a changed plan or study version starts afresh (the old file is moved aside).
  done = RunCache(os.path.join(outdir, "codex", f"{mode}_networks.json"),
                  {"plan": dataclasses.asdict(plan), "code": study.CODE_VERSION})
  for ds_name, model, steps in plan.runs:
    try:
      ds = data.load(ds_name)
    except data.DatasetNotFoundError as e:
      skipped.append(f"{ds_name}/{model}: {e}")
      continue
    tag = f"{ds_name}_{model}"
    results.append(done.get(tag, lambda: study.run(
        ds, model, steps, plan, workdir=os.path.join(outdir, "models", f"rapidnn_{mode}_{tag}"),
        cache_path=os.path.join(outdir, "codex", f"{mode}_{tag}.json"), progress=progress)))
  calib = finn.calibration()
  shaped = model_only()
  os.makedirs(outdir, exist_ok=True)
  with open(os.path.join(outdir, f"codex_{mode}.json"), "w") as f:
    json.dump({"plan": dataclasses.asdict(plan), "results": results, "finn": calib,
               "model_only": shaped, "skipped": skipped}, f, indent=1, default=float)
  return render(results, calib, skipped, plan, outdir, shaped)


# A CIFAR-10-shaped CNN (the paper's larger datasets are not offline): shapes only,
# for the hardware model; no accuracy is claimed for it.
CIFAR_SHAPED = cnn.CNNConfig(input_shape=(32, 32, 3), channels=(64, 128, 256), hidden=(512,))


def model_only() -> list[dict]:
  """CodeX vs weight-only throughput on the CIFAR-shaped CNN at uniform widths."""
  ops = program("cnn", CIFAR_SHAPED)
  kernels = {n: tuple(p["kernel"].shape)
             for n, p in jax.eval_shape(cnn.init, jax.random.key(0), CIFAR_SHAPED).items()}
  rows = []
  for b in (2, 4, 8):
    for board_name in fpga.BOARDS:
      n = len(kernels)
      d = fpga.compile_design(ops, CIFAR_SHAPED.input_shape, kernels,
                              encoding.BitConfig.uniform(n, b), board_name)
      w = fpga.compile_design(ops, CIFAR_SHAPED.input_shape, kernels,
                              encoding.BitConfig.uniform(n, b, weight_only=True), board_name)
      rows.append({"bits": b, "board": board_name, "codex_img_s": d.images_per_s,
                   "weight_only_img_s": w.images_per_s, "ratio": d.images_per_s / w.images_per_s,
                   "codex_spilled": [x.name for x in d.blocks if x.spilled],
                   "weight_only_spilled": [x.name for x in w.blocks if x.spilled]})
  return rows


def _se(acc: float, n: int) -> str:
  return f"{acc:.2f} ± {rapid_study.binomial_se(acc, n):.2f}"


def _search_rows(r: dict) -> list[list]:
  rows = []
  for name, runs in r["searches"].items():
    best = [x["best"] for x in runs if x["best"]]
    vals = [b["acc"] for b in best]
    tests = [x["test"] for x in runs if x["test"] is not None]
    spread = f" ± {np.std(vals):.2f}" if len(vals) > 1 else ""
    none = len(runs) - len(best)
    rows.append([f"{r['dataset']} {r['model']}", name, len(runs),
                 max(x["evaluations"] for x in runs),
                 (f"{np.mean(vals):.2f}{spread}" if vals else "–") +
                 (f" ({none} seed(s) found none feasible)" if none else ""),
                 f"{np.mean(tests):.2f}" if tests else "–",
                 f"{np.mean([b['cost'] for b in best]) / 1e3:,.0f}" if best else "–"])
  return rows


def wins(r: dict, a: str = "reinforce", b: str = "random") -> tuple[int, int]:
  """(seeds where ``a``'s pick has higher validation accuracy than ``b``'s, seeds)."""
  acc = lambda x: x["best"]["acc"] if x["best"] else -np.inf    # nothing feasible loses
  ra = {x["seed"]: acc(x) for x in r["searches"][a]}
  rb = {x["seed"]: acc(x) for x in r["searches"][b]}
  common = sorted(set(ra) & set(rb))
  return sum(ra[s] > rb[s] for s in common), len(common)


def render(results: list[dict], calib: list[dict], skipped: list[str], plan: study.CodexPlan,
           outdir: str, shaped: list[dict] = ()) -> report.Section:
  fig_dir = os.path.join(outdir, "figures")
  parts = [
      "**CodeX** encodes every linear layer's kernel *and* its input feature map as b-bit "
      "indices into per-layer k-means codebooks (b = 1..8 chosen per layer and operand), so the "
      "datapath decodes, multiplies, accumulates and re-encodes. SVHN and CIFAR-10, the paper's "
      "other datasets, are not available offline. Choices (the budget, each search's pick) are "
      f"made on a validation split ({sorted({r['n_val'] for r in results})} images carved from "
      "training); accuracies are on the test split with binomial standard errors. "
      "**Total bits** = every kernel at its weight width plus every layer's input map (one "
      "image) at its activation width; full-precision activations count 16 bits. "
      f"**Budget** = the bits of b*, the smallest uniform width that (with every wider one) "
      f"stays within {plan.bound} points of the 8-bit codebook on validation, divided by "
      f"{plan.saving}. Searches: REINFORCE (Gaussian policy per knob over the ordinal widths, "
      "HAQ-style), random search, greedy per-knob sensitivity + local refinement, uniform; "
      f"each may evaluate {plan.evaluations} distinct configurations (uniform: 8); reward = "
      "validation accuracy − 100 × relative budget excess; a search returns its best feasible "
      f"configuration. Fine-tuning: {plan.retrain.steps} steps of centroid-preserving "
      "retraining (RAPIDNN's)."]
  rows = []
  for r in results:
    u8 = r["uniform"][-1]
    bs = r["uniform"][r["budget"]["b_star"] - 1]
    c = r["chosen"]
    n = r["n_test"]
    within = c["test_after"] >= u8["test"] - plan.bound
    saving = bs["total_bits"] / c["total_bits"]
    rows.append([f"{r['dataset']} {r['model']}", _se(r["float_test"], n), _se(u8["test"], n),
                 f"{r['budget']['b_star']} ({bs['total_bits'] / 1e3:,.0f}k)",
                 f"`{c['label']}`" + ("" if c.get("by", "reinforce") == "reinforce"
                                      else f" ({c['by']})"),
                 f"{c['total_bits'] / 1e3:,.0f}k ({saving:.2f}x)",
                 f"{c['test_before']:.2f} / {_se(c['test_after'], n)}",
                 "met" if within and saving >= 1.5 else "missed"])
  parts += [
      "Searched configuration vs uniform codebooks (target: within 0.5 points of the 8-bit "
      "codebook with ≥ 1.5x fewer total bits than b*):",
      report.markdown_table(["network", "float test", "8-bit codebook test", "b* (bits)",
                             "REINFORCE pick (val)", "its bits (saving vs b*)",
                             "test before / after fine-tuning", "target"], rows)]
  srows = [row for r in results for row in _search_rows(r)]
  w = [wins(r) for r in results]
  parts += [
      "The searches at equal evaluations (validation accuracy of each seed's pick: mean ± "
      "spread over seeds; its test accuracy; its total bits, thousands):",
      report.markdown_table(["network", "search", "seeds", "evaluations", "val acc of pick",
                             "test acc of pick", "kbits"], srows),
      "REINFORCE's pick beats random search's (validation accuracy, ties count as losses) on " +
      ", ".join(f"{r['dataset']} {r['model']}: {a}/{b} seeds" for r, (a, b) in zip(results, w)) +
      " (target: at least 2 of 3)."]
  erows = []
  for r in results:
    n = r["n_test"]
    for e in r["equal_bits"]:
      erows.append([f"{r['dataset']} {r['model']}", e["bits"], _se(e["codebook_test"], n),
                    _se(e["int_test"], n), f"{e['int_before']:.2f}",
                    f"{e['codebook_test'] - e['int_test']:+.2f}"])
  parts += [
      "Codebooks vs uniform integers at equal bits (every layer's weights and inputs at b bits; "
      "both fine-tuned from the same float model for the same steps: the codebook by "
      f"centroid-preserving retraining, the integers by AQT quantization-aware training, "
      f"{plan.qat.steps} steps, lr {plan.qat.lr:g}). AQT: symmetric integers, abs-max scales "
      "per example (activations) and per output channel (kernels):",
      report.markdown_table(["network", "bits", "codebook test", "AQT int test (QAT)",
                             "AQT int before QAT", "codebook − int"], erows)]
  hrows = []
  for r in results:
    for key, h in r["fpga"].items():
      hrows.append([f"{r['dataset']} {r['model']}", key, f"`{h['bits']}`",
                    f"{h['codex_img_s']:,.0f}", f"{h['weight_only_img_s']:,.0f}",
                    f"{h['ratio']:.2f}x",
                    f"{h['codex']['bram36']} / {h['codex']['dsp']} / {h['codex']['lut']:,}",
                    ", ".join(h["weight_only"]["spilled"]) or "none",
                    f"{h['codex']['uj_per_image']:.2f} / {h['weight_only']['uj_per_image']:.2f}"])
  crows = [[c["topology"], c["role"], f"{c['published']:,.0f}", f"{c['modelled']:,.0f}",
            f"{c['ratio']:.2f}", c["ii_cycles"], f"{c['lut']:,}", c["bram36"]] for c in calib]
  consts = {f"{b}.{f.name}": getattr(v, f.name) for b, v in fpga.BOARDS.items()
            for f in dataclasses.fields(v) if f.name not in ("name", "part")}
  consts.update({"DRAM energy": fpga.DRAM_PJ_PER_BYTE, "LUT lane": fpga.LUT_PER_BIT2})
  parts += [
      "**Streaming FPGA model (a model, not a measurement)**: each linear layer a pipeline "
      "stage of MAC lanes (DSP slices, or LUT lanes costing "
      f"{fpga.LUT_PER_BIT2.value:g} LUTs × activation bits × weight bits), lanes allocated "
      "across stages for the smallest initiation interval that fits the board's DSPs, LUTs "
      "and BRAM (a stage's encoded kernel must also be readable at lanes × w bits per cycle, "
      "72 bits per BRAM36); line buffers of encoded activations on chip; kernels that do not "
      "fit spill to DRAM. Calibrated first against FINN's binarized MNIST MLPs on the ZC706 "
      "(LUT lanes only, as FINN): the one constant is fitted on SFC-max and checked on LFC-max "
      "(target: within 2x):",
      report.markdown_table(["FINN topology", "role", "published img/s", "modelled img/s",
                             "modelled / published", "II (cycles)", "LUTs", "BRAM36"], crows),
      f"CodeX vs stand-alone weight encoding (same weight widths, 16-bit activations) on the "
      f"same model; the paper reports {PAPER_RATIO}x on average (MNIST, SVHN, CIFAR-10, its "
      "own designs):",
      report.markdown_table(["network", "configuration @ board", "bits", "CodeX img/s",
                             "weight-only img/s", "ratio", "CodeX BRAM36 / DSP / LUT",
                             "weight-only spills", "µJ/image CodeX / weight-only"], hrows),
      "Constants:\n\n" + "\n".join(f"- `{k}` = {v.value:g} {v.unit}: {v.source}"
                                    for k, v in consts.items())]
  if shaped:
    parts += [
        "The same comparison on a CIFAR-10-shaped CNN (32x32x3, conv 64-128-256, dense 512; "
        "shapes only, no accuracy claimed) at uniform widths:",
        report.markdown_table(
            ["bits", "board", "CodeX img/s", "weight-only img/s", "ratio", "spilled kernels "
             "(CodeX / weight-only)"],
            [[x["bits"], x["board"], f"{x['codex_img_s']:,.0f}", f"{x['weight_only_img_s']:,.0f}",
              f"{x['ratio']:.2f}x", f"{', '.join(x['codex_spilled']) or 'none'} / "
              f"{', '.join(x['weight_only_spilled']) or 'none'}"] for x in shaped])]
  for r in results:
    tag = f"{r['dataset']}_{r['model']}"
    u = r["uniform"]
    series = {"uniform codebook": ([x["total_bits"] / 1e3 for x in u], [x["test"] for x in u]),
              "weight-only codebook": ([x["weight_only_bits"] / 1e3 for x in u],
                                       [x["weight_only_test"] for x in u])}
    shapes = [study.encoding.LayerShape(**s) for s in r["shapes"]]
    per_bit = sum(s.weights + s.inputs for s in shapes) / 1e3
    series["AQT int (QAT)"] = ([e["bits"] * per_bit for e in r["equal_bits"]],
                               [e["int_test"] for e in r["equal_bits"]])
    series["codebook, fine-tuned"] = ([e["bits"] * per_bit for e in r["equal_bits"]],
                                      [e["codebook_test"] for e in r["equal_bits"]])
    c = r["chosen"]
    series["searched, fine-tuned"] = ([c["total_bits"] / 1e3], [c["test_after"]])
    f1 = report.line_plot(os.path.join(fig_dir, f"codex_{tag}_bits.png"), series,
                          xlabel="total bits per image (thousands)", ylabel="test accuracy %",
                          title=f"{r['dataset']} {r['model']}: accuracy vs encoded bits",
                          logx=True)
    curves = {}
    for name, runs in r["searches"].items():
      if name == "uniform":
        continue
      for x in runs:
        ys = x["curve"]
        curves[f"{name} s{x['seed']}"] = (list(range(1, len(ys) + 1)), ys)
    f2 = report.line_plot(os.path.join(fig_dir, f"codex_{tag}_search.png"), curves,
                          xlabel="distinct configurations evaluated",
                          ylabel="best feasible val accuracy %",
                          title=f"{r['dataset']} {r['model']}: search learning curves")
    parts += [f"![bits]({os.path.relpath(f1, outdir)}) ![search]({os.path.relpath(f2, outdir)})"]
  if skipped:
    parts.append("Skipped: " + "; ".join(skipped))
  return report.Section("CodeX: per-layer codebook encoding, bitwidth search, FPGA model",
                        "\n\n".join(parts))


def section(quick: bool, outdir: str) -> report.Section:
  return run(QUICK if quick else FULL, "quick" if quick else "full", outdir)
