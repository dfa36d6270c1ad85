"""Ladder Residual beside SPD (issue 26): accuracy of a ladder LM trained with the deep
SPD model's recipe, SPD drops on the ladder model, and the latency model's view of
standard, SPD, ladder and ladder + SPD for LLaMA-2-70B at TP=8.

* Accuracy: held-out perplexity of the ladder and standard 16-block LMs (same config,
  recipe, steps, data and seed). SPD on the ladder (``core.models.ladder``: a dropped
  block's attention partials ride in its MLP sync) changes the function the same way
  at every TP size, so one scan serves all: blocks dropped from least to most
  sensitive in isolation (calibration windows), perplexity on held-out windows.
* Latency (a model: ``latency_model.ladder_latency``, constants sourced there): per
  setting, standard TP, the SPD plan that drops the fraction of attention syncs the
  1% budget allows on each model, ladder, and ladder + its SPD plan. Compared with
  the published figure (``latency_model.LADDER_PUBLISHED``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from core import data, evaluation, report
from core.cache import RunCache, params_fingerprint
from core.models import ladder
from spd_jax import latency_model, plan_study, sensitivity, study
from spd_jax.study import largest_passing_prefix

SETTINGS = (("a100-nvlink", "prefill"), ("a100-nvlink", "decode"), ("h100-nvlink", "prefill"),
            ("h100-nvlink", "decode"), ("a100-pcie", "prefill"), ("a100-pcie", "decode"))
PHASES = plan_study.PHASES  # the planner's settings: batch 1, 1,024-token prefill or one step
BUDGET = 0.01


def _scan(ppl, L: int, calib_ppl) -> dict:
  base = calib_ppl((False,) * L)
  isolated = [calib_ppl(tuple(j == i for j in range(L))) / base - 1 for i in range(L)]
  order = sensitivity.drop_order(isolated)
  scan = [ppl(tuple(i in set(order[:k]) for i in range(L))) for k in range(L + 1)]
  k = largest_passing_prefix([p <= (1 + BUDGET) * scan[0] for p in scan])
  return {"isolated": isolated, "order": order, "ppl": scan, "k_within_budget": k}


def latency_rows(L: int, k_standard: int, k_ladder: int) -> list[dict]:
  """Modelled LLaMA-2-70B TP=8 latency per setting: standard, SPD dropping ``k_standard``
  of ``L`` study blocks' attention syncs, ladder, ladder + SPD dropping ``k_ladder``."""
  m = latency_model.LLAMA2["70b"]
  spread = lambda k: [j * L // m.n_layers < k for j in range(m.n_layers)]  # fraction k / L
  rows = []
  for hw_name, phase in SETTINGS:
    hw, kw = latency_model.PRESETS[hw_name], PHASES[phase]
    base = latency_model.ladder_latency(m, hw, 8, **kw)
    spd_attn = ["drop" if d else "keep" for d in spread(k_standard)]
    spd = latency_model.plan_latency(m, hw, 8, spd_attn, ["keep"] * m.n_layers, **kw)
    both = latency_model.ladder_latency(m, hw, 8, dropped=spread(k_ladder), **kw)["ladder"]
    rows.append({"hardware": hw_name, "phase": phase, "standard_ms": 1e3 * base["standard"],
                 "comm_share": base["comm"] / base["standard"],
                 "spd": 1 - spd / base["standard"], "ladder": base["reduction"],
                 "ladder_spd": 1 - both / base["standard"]})
  return rows


def run(outdir: str, progress: bool = True) -> dict:
  """Trains or loads both deep LMs (``runs/spd_deep_lm``, ``runs/spd_deep_ladder_lm``);
  resumes from ``outdir/spd_ladder_cache.json``."""
  cfg = study.DEEP
  L = cfg.model.n_layers
  ds = data.load("kjv")
  standard = study.train_model(cfg, study.default_model_dir("deep", outdir), progress)
  lad = study.train_model(cfg, "runs/spd_deep_ladder_lm", progress, architecture="ladder")
  windows = data.text_eval_windows(ds.x_test, cfg.seq_len, cfg.eval_windows)
  calib_windows = study.calibration_windows(ds, cfg)
  runs = RunCache(os.path.join(outdir, "spd_ladder_cache.json"),
                  {"config": dataclasses.asdict(cfg), "budget": BUDGET, "version": 1,
                   "params": [params_fingerprint(standard.params), params_fingerprint(lad.params)]})

  @functools.cache
  def apply_for(drop):
    return jax.jit(lambda p, t: ladder.apply(p, t, cfg.model, drop))

  def ppl(drop, win):
    return evaluation.lm_metrics(lambda p, t: apply_for(drop)(p, t), lad.params, win)["perplexity"]

  spd_ladder = runs.get("spd_on_ladder", lambda: _scan(
      lambda d: ppl(d, windows), L, lambda d: ppl(d, calib_windows)))
  return {"standard": standard.metrics, "ladder": lad.metrics, "spd_on_ladder": spd_ladder,
          "n_layers": L}


def render(res: dict, outdir: str, k_standard: int | None = None) -> report.Section:
  """``k_standard``: study blocks whose attention sync the standard model drops within the
  1% budget at TP=8 (the deep study's ZS+B2B+HG result); default: all of them."""
  L = res["n_layers"]
  k_std = L if k_standard is None else k_standard
  s = res["spd_on_ladder"]
  k_lad = max(s["k_within_budget"], 0)
  rows = latency_rows(L, k_std, k_lad)
  fig = report.line_plot(os.path.join(outdir, "figures", "spd_ladder_drops.png"),
                         {"ladder + SPD (zero-shot)": ([100 * k / L for k in range(L + 1)],
                                                       s["ppl"])},
                         xlabel="attention syncs dropped (%)", ylabel="held-out perplexity",
                         title="SPD on the ladder LM")
  std_ppl, lad_ppl = res["standard"]["perplexity"], res["ladder"]["perplexity"]
  table = report.markdown_table(
      ["hardware (model)", "phase", "standard ms", "comm share", f"SPD ({k_std}/{L} dropped)",
       "ladder", f"ladder + SPD ({k_lad}/{L})"],
      [[r["hardware"], r["phase"], f"{r['standard_ms']:.2f}", f"{100 * r['comm_share']:.1f}%",
        f"{100 * r['spd']:.1f}%", f"{100 * r['ladder']:.1f}%", f"{100 * r['ladder_spd']:.1f}%"]
       for r in rows])
  best = {ph: max((max(r["spd"], r["ladder"], r["ladder_spd"]), r["hardware"]) for r in rows
                  if r["phase"] == ph and "nvlink" in r["hardware"]) for ph in PHASES}
  body = "\n\n".join([
      f"Ladder LM: the deep study's config and recipe ({L} blocks), only the residual wiring "
      f"changed. Held-out perplexity: ladder {lad_ppl:.3f}, standard {std_ppl:.3f} "
      f"({100 * (lad_ppl / std_ppl - 1):+.2f}%; target within 1%: "
      f"{'met' if lad_ppl <= 1.01 * std_ppl else 'not met'}).",
      "SPD on the ladder model (zero-shot; the same at every TP size): held-out perplexity "
      "against attention syncs dropped, blocks in the order of their isolated sensitivity on "
      "calibration windows: " + ", ".join(f"{p:.3f}" for p in s["ppl"])
      + f". Within 1% (monotone rule): {k_lad} of {L} blocks.",
      f"![ladder drops]({os.path.relpath(fig, outdir)})",
      "Modelled end-to-end latency reduction against standard TP (LLaMA-2-70B shapes, TP=8, "
      "batch 1, 1,024-token prefill or one decode step at context 1,024; a model, constants "
      "in `spd_jax/latency_model.py`, perfect overlap assumed):",
      table,
      "Best of SPD / ladder / ladder + SPD over NVLink: prefill "
      f"{100 * best['prefill'][0]:.1f}% ({best['prefill'][1]}), decode "
      f"{100 * best['decode'][0]:.1f}% ({best['decode'][1]}); published: "
      f"{latency_model.LADDER_PUBLISHED}."])
  return report.Section("SPD and Ladder Residual", body)
