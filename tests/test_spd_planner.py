"""The sync planner and its latency model: budgets hold, never slower than
drop-only SPD, the emulated evaluation agrees with the sharded model, costs by hand."""

import itertools

import jax
import numpy as np
import pytest

from core import evaluation
from core.models import lm
from spd_jax import latency_model, plan_study, planner, sharding, tp

L = 4
# A constructed accuracy model: each move has a known penalty; penalties interact
# (quadratic term), so the evaluation is not additive.
PEN = {("attn", "drop"): [0.004, 0.020, 0.001, 0.002], ("attn", "int8"): [0.0005] * L,
       ("mlp", "int8"): [0.001, 0.0002, 0.0003, 0.0006]}
SAVE = {"drop": 3.0, "int8": 1.6}  # seconds saved per sync by a move (attention or MLP)


def _ppl(plan: tp.SyncPlan) -> float:
  p = 0.0
  for i, (a, m) in enumerate(zip(plan.attn_actions, plan.mlp_actions)):
    p += PEN[("attn", a)][i] if a != "keep" else 0.0
    p += PEN[("mlp", m)][i] if m != "keep" else 0.0
  return 10.0 * (1 + p + 20 * p * p)


def _cost(plan: tp.SyncPlan) -> float:
  return 100.0 - sum(SAVE.get(a, 0.0) for a in plan.attn_actions) - sum(
      SAVE.get(m, 0.0) for m in plan.mlp_actions)


@pytest.mark.parametrize("budget", [0.0, 0.003, 0.01, 0.03, 0.2])
def test_planner_stays_within_budget_and_never_loses_to_drop_only(budget):
  ev = planner.Memo(_ppl)
  res = planner.plan_syncs(ev, _cost, L, budget)
  drop = planner.drop_only(ev, _cost, L, budget)
  assert _ppl(res.plan) <= (1 + budget) * 10.0 and res.ppl == _ppl(res.plan)
  assert _ppl(drop.plan) <= (1 + budget) * 10.0
  assert res.cost <= drop.cost
  # Brute force over all 6^4 plans: the planner's plan is feasible and no feasible
  # plan is cheaper than it by more than one int8 move (greedy, not exhaustive).
  plans = [tp.SyncPlan.from_actions(a, m) for a in itertools.product(("keep", "drop", "int8"), repeat=L)
           for m in itertools.product(("keep", "int8"), repeat=L)]
  best = min(_cost(p) for p in plans if _ppl(p) <= (1 + budget) * 10.0)
  assert best <= res.cost <= best + SAVE["int8"]


def test_planner_beats_drop_only_where_compression_is_cheap():
  res = planner.plan_syncs(planner.Memo(_ppl), _cost, L, 0.01)
  drop = planner.drop_only(planner.Memo(_ppl), _cost, L, 0.01)
  assert res.cost < drop.cost and "int8" in res.plan.mlp_actions
  # By hand: isolated drops cost 0.43%, 2.8%, 0.10%, 0.21%, so the order is 2, 3, 0, 1; the
  # prefixes {2}, {2,3}, {2,3,0} stay within 1% (0.80% with the interaction), all four do not.
  assert drop.plan.attn_actions == ("drop", "keep", "drop", "drop")


def test_planner_rejects_bad_inputs():
  ev = planner.Memo(_ppl)
  with pytest.raises(ValueError, match="budget must be >= 0"):
    planner.plan_syncs(ev, _cost, L, -0.01)
  with pytest.raises(ValueError, match=r"never 'drop'"):
    planner.plan_syncs(ev, _cost, L, 0.01, mlp_choices=("drop",))
  with pytest.raises(ValueError, match="unknown or no-op planner choices"):
    planner.plan_syncs(ev, _cost, L, 0.01, attn_choices=("int3",))
  with pytest.raises(ValueError, match="budget must be >= 0"):
    planner.drop_only(ev, _cost, L, float("nan"))


def test_latency_model_prices_each_sync_by_hand():
  m, hw = latency_model.LLAMA2["70b"], latency_model.PRESETS["a100-nvlink"]
  n, tokens = 8, 1024
  plain = latency_model.sync_time(m, hw, n, tokens, "keep")
  elems = tokens * m.d_model
  assert plain == pytest.approx(2 * 7 * hw.alpha + 2 * 7 / 8 * elems * 2 / hw.link_bw)
  per_el = 1 + 4 / (m.d_model // n)  # int8 + one float32 scale per 1024-value chunk
  wire = 2 * 7 * hw.alpha + 2 * 7 / 8 * elems * per_el / hw.link_bw
  fused = elems * per_el * (1 + 1 / 8) / (hw.mem_bw * hw.efficiency)
  unfused = 2 * (elems * 2 + 2 * elems * per_el) / (hw.mem_bw * hw.efficiency)
  assert latency_model.sync_time(m, hw, n, tokens, "int8") == pytest.approx(wire + fused)
  assert latency_model.sync_time(m, hw, n, tokens, "int8", codec_traffic="unfused") == \
      pytest.approx(wire + unfused)
  # Fused, int8 saves a third or more of a prefill sync on NVLink; unfused, under 5%.
  assert latency_model.sync_time(m, hw, n, tokens, "int8") < 0.7 * plain
  assert latency_model.sync_time(m, hw, n, tokens, "int8", codec_traffic="unfused") > 0.95 * plain
  with pytest.raises(ValueError, match="codec_traffic"):
    latency_model.sync_time(m, hw, n, tokens, "int8", codec_traffic="magic")
  assert latency_model.sync_time(m, hw, n, tokens, "drop") == 0.0
  keep = ("keep",) * m.n_layers
  for k in (0, 73):
    attn = ("drop",) * k + ("keep",) * (m.n_layers - k)
    assert latency_model.plan_latency(m, hw, n, attn, keep, new_tokens=tokens) == pytest.approx(
        latency_model.forward_latency(m, hw, n, n_dropped=k, new_tokens=tokens)["total"])
  assert latency_model.map_actions(("a", "b"), 5) == ("a", "a", "a", "b", "b")
  # TP=16 over 70B's 8 KV heads: each device holds 1/16 of the rest but 1/8 of the KV bytes.
  hw_b = dict(context=1024, batch=1, tokens=1)
  kv_cache = 2 * 1024 * 8 * 128 * 2
  kv_w = 2 * 8192 * 8 * 128 * 2
  want = (m.block_params * 2 + kv_w + kv_cache * 2) / 16 / (hw.mem_bw * hw.efficiency)
  assert latency_model.block_time(m, hw, 16, **hw_b) == pytest.approx(want)
  with pytest.raises(ValueError, match="80 blocks"):
    latency_model.plan_latency(m, hw, n, keep[:16], keep[:16])


def test_planner_on_a_small_model_matches_the_sharded_model():
  cfg = lm.LMConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, d_ff=64, max_seq_len=32)
  n = 4
  params = lm.init(jax.random.key(0), cfg)
  rng = np.random.default_rng(0)
  calib = rng.integers(0, 256, (4, 33)).astype(np.int32)
  held_out = rng.integers(0, 256, (4, 33)).astype(np.int32)
  ev = plan_study.PlanEvaluator(params, params, cfg, n, calib)
  cost = plan_study.cost_fn(plan_study.Setting("70b", "a100-nvlink", "prefill"), n)
  budget = 2e-5
  res = planner.plan_syncs(ev, cost, cfg.n_layers, budget)
  drop = planner.drop_only(ev, cost, cfg.n_layers, budget)
  assert res.ppl <= (1 + budget) * res.base_ppl and res.cost <= drop.cost
  assert res.plan != tp.SyncPlan.dense(cfg.n_layers)
  # The emulated evaluation is the sharded model's perplexity for that plan (int8
  # rounding flips under another float order, so: to a tenth of the plan's effect).
  mesh = sharding.make_mesh(n)
  f = tp.make_forward(cfg, mesh, res.plan)
  sharded = evaluation.lm_metrics(lambda p, t: f(p, t), tp.prepare_params(params, cfg, mesh),
                                  calib)["perplexity"]
  assert abs(sharded - res.ppl) < 0.1 * abs(res.ppl - res.base_ppl)
  with pytest.raises(ValueError, match="sync plan has 2 blocks, model has 3"):
    ev(tp.SyncPlan.dense(2))
  assert plan_study.PlanEvaluator(params, params, cfg, n, held_out)(res.plan) > 0
