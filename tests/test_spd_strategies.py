"""Sensitivity analysis and SPD strategies on a tiny LM, and the cloze test."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import checkpoint, cloze, evaluation
from core.models import lm
from spd_jax import emulate, heads, sensitivity, sharding, strategies, tp

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


def test_sensitivity_charges_each_progressive_step_to_the_block_just_dropped():
  # A constructed perplexity: base 10, dropping block i costs cost[i] on its own, and
  # dropping blocks 1 and 2 together costs 5 more (an interaction). Hand-derived:
  # progressive drops block 3, then 2, then 1 (+ the interaction), then 0.
  cost = [4.0, 2.0, 1.0, 0.5]

  def ppl(plan):
    d = plan.drop_attn
    return 10.0 + sum(c for c, x in zip(cost, d) if x) + (5.0 if d[1] and d[2] else 0.0)

  s = sensitivity.analyse(ppl, 4)
  np.testing.assert_allclose(s.progressive, [0.4, 0.7, 0.1, 0.05])
  np.testing.assert_allclose(s.isolated, [0.4, 0.2, 0.1, 0.05])
  np.testing.assert_allclose(s.progressive_ppl, [10.0, 10.5, 11.5, 18.5, 22.5])


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


def test_head_grouping_keeps_dense_model_and_leaves_no_improving_swap():
  params, calib, held_out = _setup()
  xs, ys = strategies.teacher_io(params, calib, CFG)
  block = 0
  err = lambda p_block, perm=np.arange(4): float(strategies.block_error(
      heads.permute_block(p_block, CFG, perm), xs[block], ys[block], CFG, 2))
  # 4 heads on 2 devices, each device with its fixed MLP slice: 6 assignments of
  # head pairs to devices. Score them by brute force and start from the worst.
  assignments = [np.array(p) for p in itertools.permutations(range(4)) if p[0] < p[1] and p[2] < p[3]]
  errs = [err(params[lm.block_key(block)], p) for p in assignments]
  worst = heads.permute_heads(params, CFG, [assignments[int(np.argmax(errs))]] + [np.arange(4)] * 2)
  plan = tp.SyncPlan.drop_blocks(CFG.n_layers, [block])
  new, _ = strategies.head_grouping(worst, plan, calib, cfg=CFG, n_devices=2)
  np.testing.assert_allclose(lm.apply(new, jnp.asarray(held_out), CFG),
                             lm.apply(params, jnp.asarray(held_out), CFG), atol=1e-5)
  found = err(new[lm.block_key(block)])
  assert found < max(errs) * 0.97  # a real improvement on this constructed start
  assert any(abs(found - e) < 1e-6 * e for e in errs)  # it is one of the assignments
  for a, b in [(a, b) for a in (0, 1) for b in (2, 3)]:  # and a local optimum
    swap = np.arange(4)
    swap[a], swap[b] = b, a
    assert err(new[lm.block_key(block)], swap) >= found * (1 - 1e-6)


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


def test_cloze_scorer_rejects_token_ids_outside_the_vocabulary():
  text = np.frombuffer(b"Some cats and dogs fear owls; bats bite rats when they roam. " * 30,
                       np.uint8)
  c = cloze.build(text, n_items=4, context_len=8, seed=0)
  bad = cloze.ClozeSet(c.contexts + 300, c.candidates, c.lengths, c.answers)
  with pytest.raises(ValueError, match=r"contexts hold token ids from 3\d\d to 4\d\d"):
    cloze.accuracy(lambda p, t: p[t], jnp.zeros((256, 256)), bad)
  with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
    cloze.accuracy(lambda p, t: p[t], jnp.zeros((256, 256)), c, vocab_size=64)


def test_masked_emulation_equals_static_plan():
  params, _, held_out = _setup()
  for drop in [(False, True, False), (True, True, True)]:
    plan = tp.SyncPlan(drop)
    np.testing.assert_allclose(
        emulate.apply_masked(params, jnp.asarray(held_out), CFG, jnp.asarray(drop), 4),
        emulate.apply(params, jnp.asarray(held_out), CFG, plan, 4), atol=1e-5)
