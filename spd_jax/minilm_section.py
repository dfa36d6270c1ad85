"""The report section of the MiniLM SPD study (``spd_jax.minilm``): records in,
Markdown and a figure out."""

from __future__ import annotations

import json
import os

from core import pretrained, report
from spd_jax import minilm
from spd_jax.study import largest_passing_prefix

TITLE = "SPD: all-MiniLM-L6-v2 (a real pretrained checkpoint)"


def budget_rows(res: dict, min_top1: float | None = None, min_cos: float | None = None
                ) -> list[dict]:
  """Per TP size and strategy: the blocks a budget allows -- the largest k such that k and
  every smaller k keep validation top-1 agreement >= ``min_top1`` and cosine >= ``min_cos``
  (default: the study's) -- and the test scores there."""
  cfg, L = res["config"], res["n_layers"]
  t1 = cfg["min_top1"] if min_top1 is None else min_top1
  c = cfg["min_cos"] if min_cos is None else min_cos
  out = []
  for n, r in res["results"].items():
    for s in minilm.STRATEGIES:
      k = largest_passing_prefix([e["val"]["top1"] >= t1 and e["val"]["cos"] >= c
                                  for e in r["scan"][s]])
      test = r["scan"][s][max(k, 0)]["test"]
      out.append({"tp": int(n), "strategy": s, "k": k, "fraction": k / L,
                  "top1": test["top1"] if k >= 0 else None,
                  "top1_se": test["top1_se"] if k >= 0 else None,
                  "cos": test["cos"] if k >= 0 else None})
  return out


def best_fraction(res: dict, tp: int, **budget) -> float:
  """The largest fraction of attention syncs any strategy drops within the budget at ``tp``."""
  return max(r["fraction"] for r in budget_rows(res, **budget) if r["tp"] == tp)


def render(res: dict, outdir: str) -> report.Section:
  cfg, L = res["config"], res["n_layers"]
  x = [100 * k / L for k in range(L + 1)]
  scan_rows, series, sens_rows = [], {}, []
  for n, r in res["results"].items():
    sens_rows.append([f"TP={n}"] + [f"{100 * s:.2f}" for s in r["sensitivity"]["isolated"]]
                     + [" ".join(f"b{i}" for i in r["order"])])
    for s in minilm.STRATEGIES:
      test = [e["test"] for e in r["scan"][s]]
      scan_rows.append([f"TP={n}", s] + [f"{100 * t['top1']:.1f} / {t['cos']:.4f}" for t in test])
      series[f"TP={n} {s}"] = (x, [100 * t["top1"] for t in test],
                               [100 * t["top1_se"] for t in test])
  fig = report.line_plot(os.path.join(outdir, "figures", "spd_minilm_top1.png"), series,
                         xlabel="attention syncs dropped (%)",
                         ylabel="top-1 retrieval agreement (%) ± s.e.",
                         title="SPD on all-MiniLM-L6-v2 (test verses)")
  cell = lambda b: (f"{b['k']} of {L} ({100 * b['fraction']:.0f}%)" if b["k"] >= 0 else "none")
  budget = [[f"TP={b['tp']}", b["strategy"], cell(b), "-" if b["top1"] is None else
             f"{100 * b['top1']:.1f}±{100 * b['top1_se']:.1f}",
             "-" if b["cos"] is None else f"{b['cos']:.4f}", cell(bc), f"{bc['cos']:.4f}"]
            for b, bc in zip(budget_rows(res), budget_rows(res, min_top1=0.0))]
  tps = [int(n) for n in res["results"]]
  target = (f"Target (TP=4: >= 50% of the attention syncs dropped within the budget, best "
            f"strategy): {100 * best_fraction(res, 4):.0f}% -- "
            + ("met." if best_fraction(res, 4) >= 0.5 else "not met.")) if 4 in tps else ""
  body = "\n\n".join([
      f"all-MiniLM-L6-v2 ({L} post-LN blocks, 12 heads) under Megatron TP, emulated on one "
      "device by the same per-device body that runs under shard_map (tested equal). An SPD "
      "block keeps one all-reduce carrying the attention and MLP partial sums together; the "
      "MLP reads LN(x + its own heads' output). Verses: "
      f"{cfg['n_calib']} training-book (calibration: sensitivity, B2B {cfg['b2b']['steps']} "
      f"steps/block, head grouping), {cfg['n_val']} held-out-book (validation: the budget "
      f"rule), {cfg['n_test']} other held-out-book (test: every number below).",
      "Sensitivity: drop in mean embedding cosine (%, calibration verses) when only that "
      "block's sync is dropped, zero-shot; blocks are dropped in the order given:",
      report.markdown_table(["TP"] + [f"b{i}" for i in range(L)] + ["drop order"], sens_rows),
      "Test verses: top-1 retrieval agreement with the dense model (%) / mean embedding cosine, "
      "against attention syncs dropped:",
      report.markdown_table(["TP", "strategy"] + [f"{v:.0f}%" for v in x], scan_rows),
      f"Budget (top-1 agreement >= {100 * cfg['min_top1']:g}% and cosine >= {cfg['min_cos']} "
      "at this and every smaller number of blocks, chosen on validation verses; test scores "
      f"at the chosen number), and beside it the cosine >= {cfg['min_cos']} rule alone:",
      report.markdown_table(["TP", "strategy", "blocks dropped", "test top-1 (%)", "test cosine",
                             "cosine rule alone", "test cosine"], budget),
      target, f"![minilm top1]({os.path.relpath(fig, outdir)})"])
  return report.Section(TITLE, body)


def section(quick: bool, outdir: str, progress: bool = True) -> report.Section:
  """The main job's section: full mode only; skipped visibly without the checkpoint."""
  if quick:
    return report.Section(TITLE, "Full mode only (`python -m experiments.spd_study "
                                 "--config=minilm`).")
  try:
    pretrained.minilm_dir()
  except pretrained.PretrainedNotFoundError as e:
    return report.Section(TITLE, f"Skipped: {e}")
  res = minilm.run(minilm.MiniLMStudy(), os.path.join(outdir, "spd_minilm_cache.json"), progress)
  with open(os.path.join(outdir, "spd_minilm.json"), "w") as f:
    json.dump(res, f, indent=1, default=float)
  return render(res, outdir)
