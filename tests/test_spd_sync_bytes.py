"""Bytes per token of a sync plan: the compiled HLO, the formula and a hand count agree."""

import pytest

from core.models import lm
from spd_jax import sync_bytes, tp

CFG = lm.LMConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=32)


def test_bytes_per_token_hlo_formula_and_hand_count_agree():
  # By hand, N=4, D=64: a plain float32 sync sends 2*3/4 * 4*64 = 384 bytes per token; an
  # int8 one 2*3/4 * 64 * (1 + 4/16) = 120 (a float32 scale per chunk of 16); an int4 one
  # 2*3/4 * 64 * (1/2 + 4/16) = 72 (a scale per block of 16); a dropped sync 0.
  mixed = tp.SyncPlan.from_actions(["int8", "drop"], ["int4", "keep"])
  for plan, hand in ((tp.SyncPlan.dense(2), 4 * 384), (mixed, 120 + 72 + 384)):
    assert sync_bytes.per_token(CFG, plan, 4) == pytest.approx(hand)
    got = sync_bytes.measured(CFG, plan, 4)
    assert got["prefill"] == pytest.approx(hand) and got["decode"] == pytest.approx(hand)
  assert sync_bytes.per_token(CFG, tp.SyncPlan.dense(2), 4, plain="bf16") == 4 * 192
  # One-shot int8: one all-gather of all 4 encoded vectors, 3 * 64 * 1.25 = 240 per sync.
  one = tp.SyncPlan.from_actions(["int8", "int8"], ["int8", "int8"])
  assert sync_bytes.per_token(CFG, one, 4, "one_shot") == pytest.approx(4 * 240)
  assert sync_bytes.measured(CFG, one, 4, algorithm="one_shot")["decode"] == pytest.approx(4 * 240)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="sync plan has 3 blocks, model has 2"):
    sync_bytes.per_token(CFG, tp.SyncPlan.dense(3), 4)
  with pytest.raises(ValueError, match="plain accounting"):
    sync_bytes.per_token(CFG, tp.SyncPlan.dense(2), 4, plain="fp8")
  with pytest.raises(ValueError, match="multiple of INT4_BLOCK"):
    sync_bytes.per_token(CFG, tp.SyncPlan.from_actions(["int4", "keep"]), 8)


def test_bytes_section_renders_the_records(tmp_path):
  """The section's table and target line show the records (a 4-block, 20-step run of
  ``bytes_study.run`` saved as a fixture: records, not a claim about any model)."""
  import json
  import os
  from spd_jax import bytes_study
  with open(os.path.join(os.path.dirname(__file__), "fixtures", "spd_bytes_tiny.json")) as f:
    res = json.load(f)
  md = bytes_study.render(res, str(tmp_path)).body
  plan = next(r for r in res["rows"] if r["name"] == "planner (bytes)" and r["budget"] == 0.01)
  row = next(l for l in md.splitlines() if l.startswith("| planner (bytes) | 1% |"))
  cells = [c.strip() for c in row.split("|")[1:-1]]
  assert cells[3] == f"{plan['bytes']:,.0f}"
  assert cells[4] == f"{res['dense_f32'] / plan['bytes']:.2f}x"
  assert cells[6] == f"{plan['test_ppl']:.4f}"
  assert f"sends {plan['bytes']:,.0f} B/token" in md
  assert os.path.exists(tmp_path / "figures" / "spd_bytes_front.png")
