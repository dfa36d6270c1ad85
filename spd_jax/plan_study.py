"""The sync planner on a trained study model: plans chosen on calibration windows
for LLaMA-2 shapes on A100/H100 presets (the latency model), reported on held-out
windows, with drop-only SPD's front beside each.

The study model's accuracy stands in for the big model's: study block i's
actions are spread over LLaMA blocks [i L/16, (i+1) L/16) (``map_actions``). The
latency is a model, not a measurement (``latency_model``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax

from core import evaluation, report
from core.models import lm
from spd_jax import emulate, latency_model, planner, sensitivity
from spd_jax.tp import SyncPlan

PHASES = {"prefill": dict(batch=1, new_tokens=1024, context=1024),
          "decode": dict(batch=1, new_tokens=1, context=1024)}


@dataclasses.dataclass(frozen=True)
class Setting:
  model: str      # key of latency_model.LLAMA2
  hardware: str   # key of latency_model.PRESETS
  phase: str      # key of PHASES
  budgets: tuple[float, ...] = (0.01,)
  codec_traffic: str = "fused"  # latency_model.sync_time's assumption

  @property
  def label(self) -> str:
    extra = "" if self.codec_traffic == "fused" else f", {self.codec_traffic} codec"
    return (f"{latency_model.LLAMA2[self.model].name} on 8x {self.hardware}, "
            f"{self.phase}{extra}")


FRONT = (0.005, 0.01, 0.02, 0.05)
# Fronts for LLaMA-2-7B/70B on A100/H100 (prefill, and 70B decode); single 1% budgets for
# PCIe, the unfused-codec assumption and 7B decode.
SETTINGS = (Setting("70b", "a100-nvlink", "prefill", FRONT),
            Setting("70b", "a100-nvlink", "decode", FRONT),
            Setting("70b", "h100-nvlink", "prefill", FRONT),
            Setting("7b", "a100-nvlink", "prefill", FRONT),
            Setting("7b", "h100-nvlink", "prefill", FRONT),
            Setting("70b", "a100-nvlink", "prefill", codec_traffic="unfused"),
            Setting("70b", "a100-pcie", "prefill"), Setting("7b", "h100-nvlink", "decode"))


def swap_dropped(params: dict, donor: dict, drop) -> dict:
  """``params`` with the dropped blocks taken from ``donor`` (a strategy's blocks)."""
  out = dict(params)
  for i, d in enumerate(drop):
    if d:
      out[lm.block_key(i)] = donor[lm.block_key(i)]
  return out


class PlanEvaluator:
  """Perplexity on ``windows`` of any ``SyncPlan`` at TP size ``n`` (emulated; dropped
  blocks use ``donor``'s params, e.g. the B2B+HG ones); memoised per plan."""

  def __init__(self, params, donor, cfg: lm.LMConfig, n: int, windows):
    self.params, self.donor, self.cfg, self.windows = params, donor, cfg, windows
    fwd = jax.jit(functools.partial(emulate.apply_plan, cfg=cfg, n_devices=n))
    self._apply = lambda pam, t: fwd(pam[0], t, attn_codes_L=pam[1], mlp_codes_L=pam[2])
    self.memo = planner.Memo(self._ppl)

  def _ppl(self, plan: SyncPlan) -> float:
    if plan.n_layers != self.cfg.n_layers:
      raise ValueError(f"sync plan has {plan.n_layers} blocks, model has {self.cfg.n_layers}")
    a, m = plan.codes()
    p = swap_dropped(self.params, self.donor, plan.drop_attn)
    return evaluation.lm_metrics(self._apply, (p, a, m), self.windows)["perplexity"]

  def __call__(self, plan: SyncPlan) -> float:
    return self.memo(plan)


def cost_fn(setting: Setting, n_devices: int = 8):
  m, hw = latency_model.LLAMA2[setting.model], latency_model.PRESETS[setting.hardware]

  def cost(plan: SyncPlan) -> float:
    return latency_model.plan_latency(
        m, hw, n_devices, latency_model.map_actions(plan.attn_actions, m.n_layers),
        latency_model.map_actions(plan.mlp_actions, m.n_layers), **PHASES[setting.phase],
        codec_traffic=setting.codec_traffic)
  return cost


def _record(res: planner.PlanResult, held_out, cost) -> dict:
  return {"attn": list(res.plan.attn_actions), "mlp": list(res.plan.mlp_actions),
          "calib_ppl": res.ppl, "test_ppl": held_out(res.plan), "ms": 1e3 * cost(res.plan),
          "start": res.start}


def run(params, donor, cfg: lm.LMConfig, n: int, calib_windows, test_windows,
        settings=SETTINGS, attn_choices=("drop", "int8"), mlp_choices=("int8",),
        progress=None) -> dict:
  """Records: per setting, the planner's and drop-only SPD's plan at each budget, and
  drop-only's whole front (every prefix of its calibration drop order)."""
  calib = PlanEvaluator(params, donor, cfg, n, calib_windows)
  test = PlanEvaluator(params, donor, cfg, n, test_windows)
  sens = planner.move_sensitivity(calib, cfg.n_layers, attn_choices, mlp_choices)
  order = sensitivity.drop_order(
      [sens[planner.Move(i, "attn", "drop")] for i in range(cfg.n_layers)])
  prefixes = [SyncPlan.drop_blocks(cfg.n_layers, order[:k]) for k in range(cfg.n_layers + 1)]
  out = {"n_devices": n, "base_calib_ppl": calib(SyncPlan.dense(cfg.n_layers)),
         "base_test_ppl": test(SyncPlan.dense(cfg.n_layers)), "order": order,
         "sensitivity": [{"block": mv.block, "sync": mv.sync, "action": mv.action, "rel": v}
                         for mv, v in sens.items()], "settings": []}
  for s in settings:
    if progress:
      progress(f"planner: {s.label}")
    cost = cost_fn(s, n)
    rec = {"setting": dataclasses.asdict(s), "label": s.label, "budgets": []}
    rec["drop_front"] = [{"k": k, "calib_ppl": calib(p), "test_ppl": test(p),
                          "ms": 1e3 * cost(p)} for k, p in enumerate(prefixes)]
    rec["dense_ms"] = rec["drop_front"][0]["ms"]
    for b in s.budgets:
      plan = planner.plan_syncs(calib, cost, cfg.n_layers, b, attn_choices=attn_choices,
                                mlp_choices=mlp_choices)
      drop = planner.drop_only(calib, cost, cfg.n_layers, b, order)
      rec["budgets"].append({"budget": b, "planner": _record(plan, test, cost),
                             "drop_only": _record(drop, test, cost)})
    out["settings"].append(rec)
  out["evaluations"] = {"calibration": len(calib.memo.values), "held_out": len(test.memo.values)}
  return out


def _plan_text(attn, mlp) -> str:
  short = {"keep": "K", "drop": "D", "f32": "F", "bf16": "B", "int8": "8", "int4": "4"}
  return " ".join(short[a] + short[m] for a, m in zip(attn, mlp))


def render(rec: dict, outdir: str, name: str = "spd_planner") -> str:
  """Markdown (tables, plan strings, a front plot per setting) from ``run``'s records."""
  fig_dir = os.path.join(outdir, "figures")
  rows, figs = [], []
  for srec in rec["settings"]:
    for b in srec["budgets"]:
      p, d = b["planner"], b["drop_only"]
      rows.append([srec["label"], f"{100 * b['budget']:g}%", f"{srec['dense_ms']:.3f}",
                   f"{d['ms']:.3f} ({d['attn'].count('drop')} dropped)",
                   f"{d['test_ppl']:.4f}", f"{p['ms']:.3f}", f"{p['test_ppl']:.4f}",
                   f"{100 * (1 - p['ms'] / d['ms']):.1f}%", p["start"],
                   _plan_text(p["attn"], p["mlp"])])
    if len(srec["budgets"]) > 1:
      fr = srec["drop_front"]
      series = {"drop-only SPD (every prefix)": ([e["ms"] for e in fr], [e["test_ppl"] for e in fr]),
                "planner (one point per budget)": (
                    [b["planner"]["ms"] for b in srec["budgets"]],
                    [b["planner"]["test_ppl"] for b in srec["budgets"]])}
      st = srec["setting"]
      slug = f"{st['model']}_{st['hardware']}_{st['phase']}_{st['codec_traffic']}"
      figs.append(report.line_plot(
          os.path.join(fig_dir, f"{name}_{slug}.png"), series,
          xlabel="modelled latency per forward (ms)", ylabel="held-out perplexity",
          title=f"{srec['label']}: planner vs drop-only"))
  table = report.markdown_table(
      ["setting (model, not measurement)", "budget", "dense ms", "drop-only ms",
       "drop-only held-out ppl", "planner ms", "planner held-out ppl", "planner saves vs drop-only",
       "planner start", "planner plan (attn+MLP per study block)"], rows)
  return "\n\n".join(
      [f"Calibration perplexity {rec['base_calib_ppl']:.4f} (dense, training-book windows: "
       f"the budget is checked here), held-out {rec['base_test_ppl']:.4f} (reported). "
       f"TP={rec['n_devices']}; {rec['evaluations']['calibration']} calibration plans measured. "
       "Plan code per study block: attention action then MLP action, K keep, D drop, "
       "B bf16, 8 int8, 4 int4 payload.", table]
      + [f"![front]({os.path.relpath(f, outdir)})" for f in figs])
