"""Tensor-parallel LM and Sync-Point Drop against the unsharded model and an
independent per-device NumPy emulation (8 fake CPU devices)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.models import lm
from spd_jax import heads, sharding, tp
from tests import np_reference

MHA = lm.LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, d_ff=64, max_seq_len=16)
GQA = lm.LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=64,
                  max_seq_len=16, use_bias=True)


@functools.lru_cache(maxsize=None)
def _setup(cfg):
  params = lm.init(jax.random.key(0), cfg)
  if cfg.use_bias:  # non-zero biases, so a bias added N times or never would show
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if path[-1].key.startswith("b") else x, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  dense = jax.jit(lm.apply, static_argnums=2)(params, tokens, cfg)
  return params, tokens, dense


CASES = [(MHA, 1), (MHA, 2), (MHA, 4), (MHA, 8), (GQA, 2), (GQA, 4)]


@pytest.mark.parametrize("cfg,n", CASES)
def test_sharded_prefill_equals_unsharded(cfg, n):
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  out = tp.make_forward(cfg, mesh)(tp.prepare_params(params, cfg, mesh), tokens)
  np.testing.assert_allclose(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg,n", [(MHA, 8), (GQA, 4)])
def test_sharded_decode_with_kv_cache_equals_unsharded(cfg, n):
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  sp = tp.prepare_params(params, cfg, mesh)
  f = tp.make_forward(cfg, mesh, with_cache=True)
  logits, cache = f(sp, tokens[:, :7], tp.init_cache(cfg, mesh, 2, 16), jnp.int32(0))
  steps = [logits]
  for i in range(7, 12):
    logits, cache = f(sp, tokens[:, i:i + 1], cache, jnp.int32(i))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), dense, atol=1e-5, rtol=1e-5)
  assert cache["block_0"]["k"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp")


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_gradients_equal_unsharded(n):
  cfg = GQA
  params, tokens, _ = _setup(cfg)
  batch = {"tokens": tokens}
  mesh = sharding.make_mesh(n)
  f = tp.make_forward(cfg, mesh)
  g_dense = jax.jit(jax.grad(lambda p: lm.loss(p, batch, cfg)[0]))(params)
  g_tp = jax.jit(jax.grad(lambda p: lm.loss(p, batch, cfg, apply_fn=lambda q, t, c: f(q, t))[0]))(
      tp.prepare_params(params, cfg, mesh))
  chex.assert_trees_all_close(jax.device_get(g_tp), g_dense, atol=1e-5, rtol=1e-4)


def test_greedy_generation_is_token_identical_to_unsharded():
  cfg = MHA
  params, tokens, _ = _setup(cfg)
  prompt = tokens[:, :4].astype(jnp.int32)
  dense_step = jax.jit(lambda t, c, pos: lm.forward(params, t, cfg, cache=c, pos=pos))
  want = lm.greedy_generate(dense_step, prompt, lm.init_cache(cfg, 2), 10)
  mesh = sharding.make_mesh(4)
  sp = tp.prepare_params(params, cfg, mesh)
  f = tp.make_forward(cfg, mesh, with_cache=True)
  got = lm.greedy_generate(lambda t, c, pos: f(sp, t, c, pos), prompt,
                           tp.init_cache(cfg, mesh, 2), 10)
  np.testing.assert_array_equal(got, want)


def test_spd_at_tp1_equals_unsharded():
  params, tokens, dense = _setup(GQA)
  mesh = sharding.make_mesh(1)
  f = tp.make_forward(GQA, mesh, tp.SyncPlan((True, True)))
  # Equal up to float32 reassociation: SPD sums X + (O + Z), the dense block (X + O) + Z.
  np.testing.assert_allclose(f(tp.prepare_params(params, GQA, mesh), tokens), dense,
                             atol=2e-6, rtol=0)


@pytest.mark.parametrize("n,drop", [(2, [True, False]), (4, [True, True]), (8, [False, True])])
def test_spd_matches_per_device_numpy_emulation(n, drop):
  cfg = MHA
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  out = tp.make_forward(cfg, mesh, tp.SyncPlan(tuple(drop)))(
      tp.prepare_params(params, cfg, mesh), tokens)
  want = np_reference.lm_logits(params, np.asarray(tokens), cfg, n_devices=n, drop=drop)
  np.testing.assert_allclose(out, want, atol=2e-4, rtol=1e-4)
  assert np.abs(np.asarray(out) - np.asarray(dense)).max() > 1e-3  # SPD really changed it


def test_mean_residual_variant_matches_its_definition():
  cfg, n = MHA, 4
  params, tokens, _ = _setup(cfg)
  mesh = sharding.make_mesh(n)
  sp = tp.prepare_params(params, cfg, mesh)
  plan = tp.SyncPlan((False, True))
  summed = tp.make_forward(cfg, mesh, plan)(sp, tokens)
  mean = tp.make_forward(cfg, mesh, plan, residual="mean")(sp, tokens)
  assert np.abs(np.asarray(summed) - np.asarray(mean)).max() > 1e-3
  # Emulate: out = X + sum_i O_i / N + sum_i Z_i in the last block.
  p = np_reference.to_np(params)
  x = np.asarray(tokens)
  hd, fd = cfg.n_heads // n, cfg.d_ff // n
  logits = []
  for seq in x:
    h0 = p["embed"]["embedding"][seq]
    b = p["block_0"]
    y = h0 + np_reference.attention_heads(b, np_reference.np_rms(h0, b["attn_norm"]["scale"]),
                                          range(8), cfg)
    h0 = y + np_reference.mlp_units(b, np_reference.np_rms(y, b["mlp_norm"]["scale"]),
                                    np.arange(64))
    b = p["block_1"]
    hh = np_reference.np_rms(h0, b["attn_norm"]["scale"])
    o = [np_reference.attention_heads(b, hh, range(d * hd, (d + 1) * hd), cfg) for d in range(n)]
    z = [np_reference.mlp_units(b, np_reference.np_rms(h0 + o[d], b["mlp_norm"]["scale"]),
                                np.arange(d * fd, (d + 1) * fd)) for d in range(n)]
    out = h0 + sum(o) / n + sum(z)
    logits.append(np_reference.np_rms(out, p["final_norm"]["scale"]) @ p["unembed"]["kernel"])
  np.testing.assert_allclose(mean, np.stack(logits), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("drop", [(False, False, False, False), (True, False, False, False),
                                  (False, True, True, False), (True, True, True, True)])
def test_all_reduce_count_in_compiled_hlo(drop):
  cfg = lm.LMConfig(vocab_size=256, d_model=32, n_layers=4, n_heads=4, d_ff=32, max_seq_len=8)
  params = lm.init(jax.random.key(0), cfg)
  mesh = sharding.make_mesh(4)
  plan = tp.SyncPlan(drop)
  f = tp.make_forward(cfg, mesh, plan)
  text = f.lower(tp.prepare_params(params, cfg, mesh), jnp.zeros((1, 8), jnp.int32)).compile().as_text()
  assert tp.count_all_reduces(text) == plan.all_reduces == 2 * 4 - sum(drop)


def test_no_sync_variant_has_no_all_reduce():
  cfg = MHA
  params, tokens, _ = _setup(cfg)
  mesh = sharding.make_mesh(4)
  f = tp.make_forward(cfg, mesh, no_sync=True)
  text = f.lower(tp.prepare_params(params, cfg, mesh), tokens).compile().as_text()
  assert tp.count_all_reduces(text) == 0


@pytest.mark.parametrize("cfg", [MHA, GQA])
def test_head_permutation_changes_nothing_without_drops(cfg):
  params, tokens, dense = _setup(cfg)
  rng = np.random.default_rng(0)
  perm = [rng.permutation(cfg.kv_heads) for _ in range(cfg.n_layers)]
  mesh = sharding.make_mesh(4)
  sp = tp.prepare_params(params, cfg, mesh, head_perm=perm)
  np.testing.assert_allclose(tp.make_forward(cfg, mesh)(sp, tokens), dense, atol=1e-5, rtol=1e-5)
  # ...but under SPD it changes which heads each device's MLP sees.
  plan = tp.SyncPlan((True, True))
  spd = tp.make_forward(cfg, mesh, plan)
  a = spd(sp, tokens)
  b = spd(tp.prepare_params(params, cfg, mesh), tokens)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_sync_plan_constructors():
  assert tp.SyncPlan.drop_last(4, 1).drop_attn == (False, False, False, True)
  assert tp.SyncPlan.drop_fraction(8, 0.25).n_dropped == 2
  assert tp.SyncPlan.drop_blocks(3, [0, 2]).all_reduces == 4
  with pytest.raises(ValueError, match="out of range"):
    tp.SyncPlan.drop_blocks(3, [3])


@pytest.mark.parametrize("kwargs,n,match", [
    (dict(n_heads=8, d_ff=64), 3, "does not divide n_heads=8"),
    (dict(d_model=48, n_heads=6, n_kv_heads=3, d_ff=48), 2, r"n_kv_heads=3 \(nor is TP"),
    (dict(n_heads=8, d_ff=36), 8, "d_ff=36"),
])
def test_bad_tp_sizes_are_rejected(kwargs, n, match):
  cfg = lm.LMConfig(**{"vocab_size": 256, "d_model": 64, "n_layers": 2, "max_seq_len": 8,
                       **kwargs})
  with pytest.raises(ValueError, match=match):
    tp.make_forward(cfg, sharding.make_mesh(n))


def test_tp_forward_names_bad_inputs_instead_of_answering_wrong():
  params, tokens, _ = _setup(MHA)
  mesh = sharding.make_mesh(2)
  sp = tp.prepare_params(params, MHA, mesh)
  f = tp.make_forward(MHA, mesh)
  with pytest.raises(ValueError, match=r"\(batch, length\).*tokens\[None\]"):
    f(sp, tokens[0])
  with pytest.raises(ValueError, match="positions 0..19 do not fit the max_seq_len 16"):
    f(sp, jnp.zeros((1, 20), jnp.int32))  # the dense model refuses this too
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\); got values from \d+ to 999"):
    f(sp, tokens.at[0, 3].set(999))
  wide = lm.LMConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=8, d_ff=64, max_seq_len=16)
  with pytest.raises(ValueError, match=r"param \['block_0'\]\['attn'\]\['wk'\] has shape"):
    f(tp.prepare_params(lm.init(jax.random.key(0), wide), wide, mesh), tokens)
  g = tp.make_forward(MHA, mesh, with_cache=True)
  cache = tp.init_cache(MHA, mesh, 2, 8)
  with pytest.raises(ValueError, match="positions 0..11 do not fit the cache length 8"):
    g(sp, tokens, cache, jnp.asarray(0))
  with pytest.raises(ValueError, match="batch 1 but the KV cache was made for batch 2"):
    g(sp, tokens[:1, :4], cache, jnp.asarray(0))
  with pytest.raises(TypeError, match="with_cache=True"):
    g(sp, tokens)


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_make_mesh_needs_a_positive_integer(n):
  with pytest.raises(ValueError, match="TP size must be an integer >= 1"):
    sharding.make_mesh(n)


def test_bad_plans_and_permutations_are_rejected():
  mesh = sharding.make_mesh(2)
  with pytest.raises(ValueError, match="sync plan has 3 blocks"):
    tp.make_forward(MHA, mesh, tp.SyncPlan((True,) * 3))
  with pytest.raises(ValueError, match="residual"):
    tp.make_forward(MHA, mesh, residual="avg")
  with pytest.raises(ValueError, match="not a permutation"):
    heads.permute_heads(_setup(MHA)[0], MHA, [[0] * 8, list(range(8))])
  with pytest.raises(ValueError, match=r"one order of the 8 KV groups per block.*\[perm\] \* 2"):
    tp.prepare_params(_setup(MHA)[0], MHA, mesh, head_perm=list(range(8)))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(16)


@pytest.mark.parametrize("cfg,n,drop,residual", [
    (MHA, 2, (True, False), "sum"), (MHA, 8, (True, True), "sum"),
    (GQA, 4, (False, True), "sum"), (GQA, 2, (True, True), "mean")])
def test_single_device_emulation_equals_shard_map(cfg, n, drop, residual):
  from spd_jax import emulate
  params, tokens, _ = _setup(cfg)
  mesh = sharding.make_mesh(n)
  plan = tp.SyncPlan(drop)
  want = tp.make_forward(cfg, mesh, plan, residual=residual)(
      tp.prepare_params(params, cfg, mesh), tokens)
  got = jax.jit(emulate.apply, static_argnums=(2, 3, 4, 5))(params, tokens, cfg, plan, n, residual)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
