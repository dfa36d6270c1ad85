"""Tensor-parallel BERT with droppable syncs (spd_jax.bert_tp) against the dense
model, a per-device NumPy reference, and the compiled HLO's all-reduces."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import pretrained
from core.models import bert
from spd_jax import bert_tp, sharding, strategies, tp
from spd_jax.tp import SyncPlan
from tests import np_reference

# 12 heads, as MiniLM: TP 1/2/3/4/6/12 all divide them (and d_ff).
CFG = bert.BertConfig(vocab_size=40, d_model=24, n_layers=2, n_heads=12, d_ff=48,
                      max_positions=16)


def _setup():
  # Weights 10x BERT's init scale, so an SPD block's output visibly differs from dense.
  params = jax.tree_util.tree_map(lambda a: 10 * a if a.ndim >= 2 else a,
                                  bert.init(jax.random.key(0), CFG))
  ids = jax.random.randint(jax.random.key(1), (3, 9), 0, CFG.vocab_size)
  mask = jnp.ones((3, 9), jnp.int32).at[1, 5:].set(0)
  return params, ids, mask


def test_tp_forward_equals_dense_at_every_tp_size_dividing_the_heads():
  cfg = dataclasses.replace(CFG, n_layers=1)  # one block: each TP size compiles anew
  params, ids, mask = _setup()
  params = {k: v for k, v in params.items() if k != "block_1"}
  dense = np.asarray(bert.sentence_embedding(params, ids, mask, cfg))
  for n in (1, 2, 3, 4, 6):  # real shard_map over fake devices
    mesh = sharding.make_mesh(n)
    out = bert_tp.make_forward(cfg, mesh)(sharding.shard_params(params, mesh), ids, mask)
    np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6, err_msg=f"TP={n}")
  # 12 devices exceed the 8 fake ones: the emulation (same body under vmap) covers it.
  np.testing.assert_allclose(bert_tp.embed(params, ids, mask, cfg, (False,), 12), dense,
                             rtol=1e-5, atol=1e-6)


def test_spd_matches_numpy_per_device_reference_and_emulation():
  params, ids, mask = _setup()
  plan = SyncPlan((True, False))
  mesh = sharding.make_mesh(3)
  f = bert_tp.make_forward(CFG, mesh, plan)
  out = np.asarray(f(sharding.shard_params(params, mesh), ids, mask))
  ref = np_reference.bert_embedding(params, ids, mask, CFG, 3, list(plan.drop_attn))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  dense = np_reference.bert_embedding(params, ids, mask, CFG)
  assert np.abs(ref - dense).max() > 1e-2  # the drop matters, so the check has teeth
  traced = jax.jit(lambda d: bert_tp.embed(params, ids, mask, CFG, d, 3))(jnp.array(plan.drop_attn))
  np.testing.assert_allclose(traced, out, rtol=1e-5, atol=1e-6)
  # One all-reduce per SPD block instead of two.
  text = f.lower(sharding.shard_params(params, mesh), ids, mask).compile().as_text()
  assert tp.count_all_reduces(text) == plan.all_reduces == 3


def test_bad_inputs_raise_clear_errors():
  params, ids, mask = _setup()
  with pytest.raises(ValueError, match="does not divide n_heads=12"):
    bert_tp.make_forward(CFG, sharding.make_mesh(5))
  with pytest.raises(ValueError, match="sync plan has 3 blocks, model has 2"):
    bert_tp.make_forward(CFG, sharding.make_mesh(2), SyncPlan((True, False, False)))
  with pytest.raises(ValueError, match="sync plan has 1 blocks"):
    bert_tp.embed(params, ids, mask, CFG, (True,), 2)
  with pytest.raises(ValueError, match="does not divide"):
    bert_tp.embed(params, ids, mask, CFG, (True, True), 8)


def test_strategies_on_bert():
  """Head grouping leaves the dense model unchanged and never raises its objective; B2B
  lowers the block error it minimises."""
  params, ids, mask = _setup()
  calib = (np.asarray(ids), np.asarray(mask))
  plan, kw = SyncPlan((True, True)), dict(cfg=CFG, n_devices=3, family=bert_tp.FAMILY)
  xs, ys = strategies.teacher_io(params, calib, CFG, bert_tp.FAMILY)
  err = lambda p, i: float(strategies.block_error(p[f"block_{i}"], xs[i], ys[i], CFG, 3,
                                                  family=bert_tp.FAMILY))
  hg, _ = strategies.head_grouping(params, plan, calib, rounds=1, **kw)
  np.testing.assert_allclose(bert.sentence_embedding(hg, ids, mask, CFG),
                             bert.sentence_embedding(params, ids, mask, CFG), atol=1e-5)
  assert all(err(hg, i) <= err(params, i) for i in range(2))
  b2b, _ = strategies.b2b(params, plan, calib, blocks=[1],
                          config=strategies.B2BConfig(steps=30, lr=3e-3, batch=3), **kw)
  assert err(b2b, 1) < 0.7 * err(params, 1)
  assert b2b["block_0"] is params["block_0"]  # only the named block is trained


def test_device_stack_matches_split_for_devices():
  params, _, _ = _setup()
  stacked, axes = sharding.device_stack(params, 4)
  split = sharding.split_for_devices(params["block_0"]["mlp"], 4)
  np.testing.assert_array_equal(stacked["block_0"]["mlp"]["w_in"], split["w_in"])
  assert axes["block_0"]["attn"]["wq"] == 0 and axes["block_0"]["attn"]["bo"] is None
  assert axes["embed"]["word"] is None


def test_minilm_tp_equals_dense():
  try:
    params, cfg = pretrained.load_minilm()
    tok = pretrained.WordPiece(pretrained.minilm_dir(), 16, fixed=True)
  except pretrained.PretrainedNotFoundError:
    pytest.skip("all-MiniLM-L6-v2 not installed (make minilm)")
  ids, mask = tok(["In the beginning God created the heaven and the earth.", "Jesus wept."])
  mesh = sharding.make_mesh(4)
  out = bert_tp.make_forward(cfg, mesh)(sharding.shard_params(params, mesh), ids, mask)
  dense = bert.sentence_embedding(params, ids, mask, cfg)
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-6)


def test_minilm_section_applies_the_budget_on_validation_and_reports_test(tmp_path):
  from spd_jax import minilm, minilm_section
  rec = lambda t1, cos: {"top1": t1, "top1_se": 0.01, "cos": cos, "cos_se": 0.001,
                         "cos_min": cos, "top10": t1, "n": 100}
  # Validation passes at k=1 for every strategy but fails at k=2; test scores differ.
  scan = [{"val": rec(1.0, 1.0), "test": rec(1.0, 1.0)},
          {"val": rec(0.96, 0.995), "test": rec(0.93, 0.994)},
          {"val": rec(0.90, 0.992), "test": rec(0.97, 0.999)}]
  res = {"config": dataclasses.asdict(minilm.MiniLMStudy()), "n_layers": 2, "results": {
      "4": {"sensitivity": {"isolated": [0.01, 0.02]}, "order": [0, 1],
            "scan": {s: scan for s in minilm.STRATEGIES}}}}
  rows = minilm_section.budget_rows(res)
  assert all(r["k"] == 1 and r["top1"] == 0.93 for r in rows)  # chosen on val, test reported
  assert all(r["k"] == 2 for r in minilm_section.budget_rows(res, min_top1=0.0))
  md = minilm_section.render(res, str(tmp_path)).body
  line = next(l for l in md.splitlines() if l.startswith("| TP=4 | ZS+B2B |") and "of 2" in l)
  assert [c.strip() for c in line.split("|")[3:8]] == ["1 of 2 (50%)", "93.0±1.0", "0.9940",
                                                       "2 of 2 (100%)", "0.9990"]
  assert "50% -- met." in md
