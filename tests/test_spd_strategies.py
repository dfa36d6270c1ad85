"""Sensitivity analysis and SPD strategies on a tiny LM, and the cloze test."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import checkpoint, cloze, evaluation
from core.models import lm
from spd_jax import emulate, sensitivity, sharding, strategies, tp

CFG = lm.LMConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=32)


@functools.lru_cache(maxsize=None)
def _setup():
  params = lm.init(jax.random.key(0), CFG)
  rng = np.random.default_rng(0)
  # Enough calibration tokens that a block cannot simply memorise them.
  calib = rng.integers(0, 256, (128, 32)).astype(np.int32)
  held_out = rng.integers(0, 256, (32, 32)).astype(np.int32)
  return params, calib, held_out


def _ppl_fn(params, windows, n):
  apply = jax.jit(lambda pd, t: emulate.apply_masked(pd[0], t, CFG, pd[1], n))

  def eval_fn(plan):
    return evaluation.lm_metrics(apply, (params, jnp.asarray(plan.drop_attn)), windows)["perplexity"]
  return eval_fn


def test_sensitivity_is_zero_at_tp1_and_positive_at_tp4():
  params, _, held_out = _setup()
  s1 = sensitivity.analyse(_ppl_fn(params, held_out, 1), CFG.n_layers)
  np.testing.assert_allclose(s1.isolated + s1.progressive, 0.0, atol=1e-5)
  s4 = sensitivity.analyse(_ppl_fn(params, held_out, 4), CFG.n_layers)
  assert max(np.abs(s4.isolated)) > 1e-4
  # Progressive steps telescope to the all-dropped perplexity.
  np.testing.assert_allclose(s4.base_ppl * (1 + sum(s4.progressive)), s4.progressive_ppl[-1],
                             rtol=1e-6)


def test_classify_and_order():
  assert sensitivity.classify([0.001, 0.01, 0.2], 0.005, 0.05) == ["ISB", "SB", "ESB"]
  assert sensitivity.drop_order([0.3, 0.0, 0.1, 0.0]) == [3, 1, 2, 0]
  with pytest.raises(ValueError):
    sensitivity.classify([0.1], 0.5, 0.1)


def _held_out_error(params, block, held_out, n):
  xs, ys = strategies.teacher_io(_setup()[0], held_out, CFG)  # the original dense teacher
  return float(strategies.block_error(params[lm.block_key(block)], xs[block], ys[block], CFG, n))


def test_b2b_strictly_reduces_held_out_block_error():
  params, calib, held_out = _setup()
  plan = tp.SyncPlan.drop_blocks(CFG.n_layers, [1])
  new, plan2 = strategies.b2b(params, plan, calib, cfg=CFG, n_devices=4,
                              config=strategies.B2BConfig(steps=60, lr=1e-3, batch=16))
  assert plan2 == plan
  before, after = _held_out_error(params, 1, held_out, 4), _held_out_error(new, 1, held_out, 4)
  assert after < 0.95 * before
  chex.assert_trees_all_equal(new["block_0"], params["block_0"])  # only block 1 trained


def test_head_grouping_keeps_dense_model_and_never_worsens_objective():
  params, calib, held_out = _setup()
  plan = tp.SyncPlan.drop_blocks(CFG.n_layers, [0, 2])
  new, _ = strategies.head_grouping(params, plan, calib, cfg=CFG, n_devices=2)
  np.testing.assert_allclose(lm.apply(new, jnp.asarray(held_out), CFG),
                             lm.apply(params, jnp.asarray(held_out), CFG), atol=1e-5)
  xs, ys = strategies.teacher_io(params, calib, CFG)
  for b in (0, 2):
    err = lambda p: float(strategies.block_error(p[lm.block_key(b)], xs[b], ys[b], CFG, 2))
    assert err(new) <= err(params)


def test_strategies_keep_shapes_shardability_and_restore_bit_exactly(tmp_path):
  params, calib, held_out = _setup()
  plan = tp.SyncPlan.drop_last(CFG.n_layers, 2)
  new, plan = strategies.full_stack(params, plan, calib, cfg=CFG, n_devices=2,
                                    config=strategies.B2BConfig(steps=5))
  chex.assert_trees_all_equal_shapes_and_dtypes(new, params)
  mesh = sharding.make_mesh(2)
  sharded = tp.make_forward(CFG, mesh, plan)(tp.prepare_params(new, CFG, mesh), held_out)
  np.testing.assert_allclose(sharded, emulate.apply(new, jnp.asarray(held_out), CFG, plan, 2),
                             atol=2e-5)
  checkpoint.save_pytree(str(tmp_path / "distilled"), new)
  chex.assert_trees_all_equal(checkpoint.load_pytree(str(tmp_path / "distilled"), like=new), new)


def test_cloze_items_are_well_formed():
  text = np.frombuffer(b"The quick brown foxes jumped over seven lazy hounds while birds sang. " * 40,
                       np.uint8)
  c = cloze.build(text, n_items=20, context_len=16, seed=3)
  assert c.chance == 0.25 and len(c) == 20
  for i in range(20):
    assert bytes(c.contexts[i].astype(np.uint8))[-1:] == b" "
    assert len(set(c.lengths[i])) == 1  # same-length candidates: no length bias
    words = {bytes(c.candidates[i, j, :c.lengths[i, j]]) for j in range(4)}
    assert len(words) == 4
  np.testing.assert_array_equal(c.answers, cloze.build(text, 20, 16, seed=3).answers)


def test_cloze_scores_match_numpy_bigram_model():
  rng = np.random.default_rng(0)
  table = rng.normal(size=(256, 256)).astype(np.float32)
  text = np.frombuffer(b"Some cats and dogs fear owls; bats bite rats when they roam. " * 30,
                       np.uint8)
  c = cloze.build(text, n_items=10, context_len=8, seed=0)
  got = cloze.candidate_logprobs(lambda p, t: p[t], jnp.asarray(table), c, batch_items=4)
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  for i in range(10):
    for j in range(4):
      seq = list(c.contexts[i]) + list(c.candidates[i, j, :c.lengths[i, j]])
      want = sum(logp[seq[t - 1], seq[t]] for t in range(8, len(seq)))
      np.testing.assert_allclose(got[i, j], want, rtol=1e-4)


def test_masked_emulation_equals_static_plan():
  params, _, held_out = _setup()
  for drop in [(False, True, False), (True, True, True)]:
    plan = tp.SyncPlan(drop)
    np.testing.assert_allclose(
        emulate.apply_masked(params, jnp.asarray(held_out), CFG, jnp.asarray(drop), 4),
        emulate.apply(params, jnp.asarray(held_out), CFG, plan, 4), atol=1e-5)
