"""Sync bytes per generated token as a first-class metric (issue 26): on the 16-block
study LM at TP=8, every plan's bytes per token (``sync_bytes``) beside its held-out
perplexity, and the sync planner run with bytes as its cost.

Plans: dense (float32 syncs; bf16 accounting beside it); compression alone (every
sync bf16, int8 or int4); drop alone (drop-only SPD at each budget); the planner
minimising bytes (attention: drop / int8 / int4, MLP: int8 / int4) at each budget;
and, for the latency view, the planner minimising modelled latency with int4
allowed (``plan_study``). Budgets and choices on the calibration windows, perplexity
reported on the held-out windows. Dropped blocks use the ZS+B2B+HG params.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from core import data, report
from core.cache import RunCache, params_fingerprint
from spd_jax import plan_study, planner, study, sync_bytes
from spd_jax.tp import SyncPlan

BUDGETS = (0.005, 0.01, 0.02, 0.05)
ATTN = ("drop", "int8", "int4")
MLP = ("int8", "int4")
LATENCY_SETTINGS = (plan_study.Setting("70b", "a100-nvlink", "prefill", (0.01,)),
                    plan_study.Setting("70b", "a100-nvlink", "decode", (0.01,)))


def _row(name: str, plan: SyncPlan, calib, test, cfg, n: int) -> dict:
  return {"name": name, "attn": list(plan.attn_actions), "mlp": list(plan.mlp_actions),
          "calib_ppl": calib(plan), "test_ppl": test(plan),
          "bytes": sync_bytes.per_token(cfg, plan, n)}


def planner_row(rows: list[dict], budget: float = 0.01) -> dict:
  """The bytes planner's plan at a calibration budget (the one the target is read off)."""
  return next(r for r in rows if r["name"] == "planner (bytes)" and r["budget"] == budget)


def run(outdir: str, tp_size: int = 8, progress: bool = True,
        scfg: study.StudyConfig = study.DEEP, model_dir: str | None = None) -> dict:
  """Trains or loads the study LM (default: the deep one in ``runs/spd_deep_lm``) and
  measures every plan; resumes from ``outdir/spd_bytes_cache.json``."""
  cfg, n, L = scfg.model, tp_size, scfg.model.n_layers
  say = (lambda m: print(f"[spd bytes] {m}", flush=True)) if progress else (lambda m: None)
  ds = data.load("kjv")
  model_dir = model_dir or study.default_model_dir("deep", outdir)
  params = study.train_model(scfg, model_dir, progress).params
  windows = data.text_eval_windows(ds.x_test, scfg.seq_len, scfg.eval_windows)
  calib_windows = study.calibration_windows(ds, scfg)[:scfg.planner_windows]
  calib_tokens = data.text_batch(ds.x_train, scfg.calib_seqs, scfg.seq_len, seed=1234,
                                 step=0)["tokens"][:, :-1]
  runs = RunCache(os.path.join(outdir, "spd_bytes_cache.json"),
                  {"config": dataclasses.asdict(scfg), "tp": n, "budgets": BUDGETS,
                   "attn": ATTN, "mlp": MLP, "params": params_fingerprint(params), "version": 1})

  @functools.cache  # only when an evaluation is not cached yet
  def donor():
    say(f"TP={n}: B2B and head grouping on {L} blocks (the dropped blocks' params)")
    return study.strategy_params(params, scfg, n, calib_tokens)["ZS+B2B+HG"]

  def measure():
    calib = plan_study.PlanEvaluator(params, donor(), cfg, n, calib_windows)
    test = plan_study.PlanEvaluator(params, donor(), cfg, n, windows)
    cost = lambda plan: sync_bytes.per_token(cfg, plan, n)
    rows = [_row("dense", SyncPlan.dense(L), calib, test, cfg, n)]
    for c in ("bf16", "int8", "int4"):
      rows.append(_row(f"every sync {c}", SyncPlan.from_actions([c] * L, [c] * L),
                       calib, test, cfg, n))
    for b in BUDGETS:
      say(f"budget {100 * b:g}%: drop-only and the bytes planner")
      drop = planner.drop_only(calib, cost, L, b)
      rows.append(dict(_row("drop-only", drop.plan, calib, test, cfg, n), budget=b))
      best = planner.plan_syncs(calib, cost, L, b, attn_choices=ATTN, mlp_choices=MLP)
      rows.append(dict(_row("planner (bytes)", best.plan, calib, test, cfg, n), budget=b,
                       start=best.start))
    return {"rows": rows, "evaluations": len(calib.memo.values)}

  out = dict(runs.get(f"tp{n}/bytes", measure))
  say("planner by modelled latency, int4 allowed")
  out["latency"] = runs.get(f"tp{n}/latency", lambda: plan_study.run(
      params, donor(), cfg, n, calib_windows, windows, LATENCY_SETTINGS,
      attn_choices=ATTN, mlp_choices=MLP, progress=say))
  best = planner_row(out["rows"])
  plan = SyncPlan.from_actions(best["attn"], best["mlp"])
  out["hlo_check"] = runs.get(f"tp{n}/hlo", lambda: {
      "attn": best["attn"], "mlp": best["mlp"], "formula": best["bytes"],
      **sync_bytes.measured(cfg, plan, n)})
  out.update(tp=n, n_layers=L, dense_f32=sync_bytes.per_token(cfg, SyncPlan.dense(L), n),
             dense_bf16=sync_bytes.per_token(cfg, SyncPlan.dense(L), n, plain="bf16"))
  return out


def render(res: dict, outdir: str) -> report.Section:
  f32, bf16 = res["dense_f32"], res["dense_bf16"]
  base = next(r for r in res["rows"] if r["name"] == "dense")["test_ppl"]
  rows = []
  for r in res["rows"]:
    budget = f"{100 * r['budget']:g}%" if "budget" in r else "-"
    rows.append([r["name"], budget, plan_study._plan_text(r["attn"], r["mlp"]),
                 f"{r['bytes']:,.0f}", f"{f32 / r['bytes']:.2f}x" if r["bytes"] else "inf",
                 f"{bf16 / r['bytes']:.2f}x" if r["bytes"] else "inf",
                 f"{r['test_ppl']:.4f}", f"{100 * (r['test_ppl'] / base - 1):+.2f}%"])
  series = {}
  for name in ("drop-only", "planner (bytes)"):
    pts = sorted((r["bytes"], r["test_ppl"]) for r in res["rows"] if r["name"] == name)
    series[name] = ([p[0] for p in pts], [p[1] for p in pts])
  comp = sorted((r["bytes"], r["test_ppl"]) for r in res["rows"] if r["name"].startswith("every")
                or r["name"] == "dense")
  series["compression alone"] = ([p[0] for p in comp], [p[1] for p in comp])
  fig = report.line_plot(os.path.join(outdir, "figures", "spd_bytes_front.png"), series,
                         xlabel="sync bytes per token per device", ylabel="held-out perplexity",
                         title=f"Sync bytes vs perplexity (TP={res['tp']})", logx=True)
  h = res["hlo_check"]
  # The target is read off the plan chosen on calibration windows (the planner at a 1%
  # budget), never off the held-out perplexities the table reports.
  best = planner_row(res["rows"])
  rel = best["test_ppl"] / base - 1
  met = f32 / best["bytes"] >= 5 and bf16 / best["bytes"] >= 2.5 and rel <= 0.01
  target = (f"Target (>= 5x fewer sync bytes per token than float32 and >= 2.5x fewer than bf16 "
            f"accounting within 1% held-out perplexity): the bytes planner at a 1% calibration "
            f"budget sends {best['bytes']:,.0f} B/token, {f32 / best['bytes']:.2f}x under float32 "
            f"and {bf16 / best['bytes']:.2f}x under bf16, at {100 * rel:+.2f}% held-out "
            f"perplexity: {'met' if met else 'not met'}")
  body = "\n\n".join([
      f"{res['n_layers']}-block study LM at TP={res['tp']}: bytes each device sends per token (formula; the "
      f"1% bytes plan read from the compiled HLO gives {h['prefill']:,.0f} B/token in prefill "
      f"and {h['decode']:,.0f} in decode against the formula's {h['formula']:,.0f}), held-out "
      "perplexity (budgets and plans chosen on calibration windows). Plan: per block attention "
      "then MLP action (K keep, D drop, B bf16, 8 int8, 4 int4).",
      report.markdown_table(["plan", "budget", "actions", "B/token", "vs f32", "vs bf16",
                             "held-out ppl", "vs dense"], rows),
      target + ".", f"![bytes front]({os.path.relpath(fig, outdir)})",
      "Modelled latency with int4 allowed (LLaMA-2-70B shapes, 8x A100 NVLink):",
      plan_study.render(res["latency"], outdir)])
  return report.Section("SPD: sync bytes per token (drops and int8/int4 syncs)", body)
