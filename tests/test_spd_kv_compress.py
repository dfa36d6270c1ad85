"""KV heads replicated across devices (TP > KV heads) and compressed syncs, against
the unsharded model, the per-device NumPy reference and hand-derived bounds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from core.models import lm
from spd_jax import compress, emulate, heads, sharding, strategies, tp
from tests import np_reference

KV2 = lm.LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=64,
                  max_seq_len=16)
MQA = lm.LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=1, d_ff=64,
                  max_seq_len=16)
MHA = lm.LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, d_ff=64, max_seq_len=16)


@functools.lru_cache(maxsize=None)
def _setup(cfg):
  params = lm.init(jax.random.key(0), cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  return params, tokens, jax.jit(lm.apply, static_argnums=2)(params, tokens, cfg)


@pytest.mark.parametrize("cfg,n", [(KV2, 4), (MQA, 8)])
def test_replicated_kv_heads_equal_dense_in_prefill_and_decode(cfg, n):
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  sp = tp.prepare_params(params, cfg, mesh)
  np.testing.assert_allclose(tp.make_forward(cfg, mesh)(sp, tokens), dense, atol=1e-5, rtol=1e-5)
  f = tp.make_forward(cfg, mesh, with_cache=True)
  cache = tp.init_cache(cfg, mesh, 2, 16)
  assert cache["block_0"]["k"].shape[2] == n  # one KV-head copy per device
  logits, cache = f(sp, tokens[:, :7], cache, jnp.int32(0))
  steps = [logits]
  for i in range(7, 12):
    logits, cache = f(sp, tokens[:, i:i + 1], cache, jnp.int32(i))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), dense, atol=1e-5, rtol=1e-5)
  # The copies of a KV head hold the same cached keys.
  k = np.asarray(cache["block_1"]["k"])
  r = n // cfg.kv_heads
  np.testing.assert_array_equal(k[:, :, ::r], k[:, :, r - 1::r])


@pytest.mark.parametrize("cfg,n,drop", [(KV2, 4, [True, False]), (MQA, 8, [True, True])])
def test_spd_with_replicated_kv_matches_numpy_per_device_reference(cfg, n, drop):
  # The NumPy reference reads each query head's KV head from the unreplicated weights.
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  out = tp.make_forward(cfg, mesh, tp.SyncPlan(tuple(drop)))(
      tp.prepare_params(params, cfg, mesh), tokens)
  want = np_reference.lm_logits(params, np.asarray(tokens), cfg, n_devices=n, drop=drop)
  np.testing.assert_allclose(out, want, atol=2e-4, rtol=1e-4)
  assert np.abs(np.asarray(out) - np.asarray(dense)).max() > 1e-3
  emu = jax.jit(emulate.apply, static_argnums=(2, 3, 4))(params, tokens, cfg,
                                                          tp.SyncPlan(tuple(drop)), n)
  np.testing.assert_allclose(emu, out, atol=2e-5, rtol=1e-5)


def test_query_head_orders_generalise_the_permutation_rule():
  cfg, n = KV2, 4
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  # Group 1's heads first, each group's query heads shuffled across its two devices.
  order = [[6, 4, 7, 5, 2, 0, 1, 3], [1, 3, 0, 2, 4, 5, 6, 7]]
  sp = tp.prepare_params(params, cfg, mesh, head_perm=order)
  np.testing.assert_allclose(tp.make_forward(cfg, mesh)(sp, tokens), dense, atol=1e-5, rtol=1e-5)
  spd = tp.make_forward(cfg, mesh, tp.SyncPlan((True, True)))
  got = spd(sp, tokens)
  permuted = heads.permute_heads(params, cfg, order)
  want = np_reference.lm_logits(permuted, np.asarray(tokens), cfg, n_devices=n, drop=[True, True])
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  assert np.abs(np.asarray(got) - np.asarray(spd(tp.prepare_params(params, cfg, mesh), tokens))
                ).max() > 1e-4  # which query heads share a device matters under SPD
  # A group order of length K is the same as the query order it stands for.
  np.testing.assert_array_equal(heads.query_indices([1, 0], cfg), [4, 5, 6, 7, 0, 1, 2, 3])
  with pytest.raises(ValueError, match="mixes KV groups"):
    heads.query_indices([0, 4, 1, 2, 3, 5, 6, 7], cfg)
  with pytest.raises(ValueError, match="neither a permutation"):
    heads.query_indices([0, 1, 2], cfg)


def test_head_grouping_at_tp_above_kv_heads_swaps_within_groups_only():
  cfg, n = KV2, 4
  params, tokens, dense = _setup(cfg)
  plan = tp.SyncPlan((True, True))
  out, _ = strategies.head_grouping(params, plan, tokens, cfg=cfg, n_devices=n, rounds=1)
  np.testing.assert_allclose(jax.jit(lm.apply, static_argnums=2)(out, tokens, cfg), dense,
                             atol=1e-5, rtol=1e-5)
  xs, ys = strategies.teacher_io(params, tokens, cfg)
  for i in range(2):
    before = strategies.block_error(params[f"block_{i}"], xs[i], ys[i], cfg, n)
    after = strategies.block_error(out[f"block_{i}"], xs[i], ys[i], cfg, n)
    assert after <= before


# --- compressed syncs -------------------------------------------------------------

def _np_int8_sync(parts):
  """A NumPy int8 sync: per-(token, chunk) symmetric scales, sum, requantise."""
  n = parts.shape[0]
  c = parts.reshape(*parts.shape[:-1], n, -1).astype(np.float64)

  def q(x):
    s = np.abs(x).max(-1, keepdims=True) / 127
    s = np.where(s > 0, s, 1)
    return np.clip(np.round(x / s), -127, 127) * s
  return q(q(c).sum(0)).reshape(parts.shape[1:])


def _sharded_sync(codec, parts, algorithm="two_shot"):
  mesh = sharding.make_mesh(parts.shape[0])
  body = (lambda a: jax.lax.psum(a[0], "tp")) if codec == "plain" else (
      lambda a: compress.compressed_psum(a[0], codec, "tp", algorithm))
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tp"), out_specs=P()))
  return np.asarray(f(parts)), f.lower(parts).compile().as_text()


@pytest.mark.parametrize("n", [2, 4])
def test_compressed_all_reduce_against_exact_sum_and_numpy(n):
  rng = np.random.default_rng(n)
  parts = (rng.standard_normal((n, 3, 5, 32)) * rng.uniform(0.1, 10, (n, 3, 5, 1))).astype(np.float32)
  parts[:, 0, 0] = 0  # an all-zero token: no division by a zero scale
  exact = parts.astype(np.float64).sum(0)
  plain, _ = _sharded_sync("plain", parts)
  f32, _ = _sharded_sync("f32", parts)
  np.testing.assert_allclose(f32, plain, atol=1e-6, rtol=1e-6)  # lossless setting
  bf16, _ = _sharded_sync("bf16", parts)
  # bf16 rounding (8 mantissa bits) of each part and of the reduced value.
  tol = 2.0 ** -8 * (np.abs(parts).sum(0) + np.abs(exact))
  assert (np.abs(bf16 - exact) <= tol).all() and np.abs(bf16 - exact).max() > 0
  int8, hlo = _sharded_sync("int8", parts)
  np.testing.assert_allclose(int8, _np_int8_sync(parts), atol=1e-5, rtol=1e-5)
  bound = np.asarray(compress.error_bound(jnp.asarray(parts), "int8"))
  err = np.abs(int8 - exact)
  assert (err <= bound + 1e-6).all() and err.max() > 0.05 * bound.max()
  assert np.isfinite(int8).all() and (int8[0, 0] == 0).all()
  np.testing.assert_allclose(compress.emulated_sum(jnp.asarray(parts), "int8"), int8,
                             atol=1e-6, rtol=1e-6)
  # The wire carries int8 payloads: one all-to-all and one all-gather, both s8.
  assert sorted(op for op, _ in tp.collective_payloads(hlo)) == ["all-gather", "all-to-all"]
  assert any(" s8[" in line and "all-to-all(" in line for line in hlo.splitlines())
  # One-shot: a single all-gather of every device's int8 partial sums, summed locally
  # without re-encoding (so only the first term of the bound).
  one, hlo1 = _sharded_sync("int8", parts, "one_shot")
  c = parts.reshape(n, 3, 5, n, -1).astype(np.float64)
  scale = np.abs(c).max(-1, keepdims=True) / 127
  scale = np.where(scale > 0, scale, 1)
  want = (np.clip(np.round(c / scale), -127, 127) * scale).sum(0).reshape(exact.shape)
  np.testing.assert_allclose(one, want, atol=1e-5, rtol=1e-5)
  assert [op for op, _ in tp.collective_payloads(hlo1)] == ["all-gather"]
  with pytest.raises(ValueError, match="unknown compressed all-reduce algorithm"):
    _sharded_sync("int8", parts, "three_shot")


def _np_int4_sync(parts, block=16):
  """A NumPy int4 sync from the definition: per block of ``block`` values of a chunk, a
  symmetric scale max|x| / 7, values rounded to [-7, 7]; sum the N decoded chunks and
  requantise the reduced one the same way."""
  n = parts.shape[0]
  c = parts.reshape(*parts.shape[:-1], n, -1, block).astype(np.float64)

  def q(x):
    s = np.abs(x).max(-1, keepdims=True) / 7
    s = np.where(s > 0, s, 1)
    return np.clip(np.round(x / s), -7, 7) * s
  return q(q(c).sum(0)).reshape(parts.shape[1:])


def test_int4_sync_against_numpy_the_bound_and_the_wire():
  n, d = 4, 64   # chunks of 16: one int4 block each
  rng = np.random.default_rng(7)
  parts = (rng.standard_normal((n, 2, 3, d)) * rng.uniform(0.1, 10, (n, 2, 3, 1))).astype(np.float32)
  parts[:, 0, 0] = 0
  exact = parts.astype(np.float64).sum(0)
  int4, hlo = _sharded_sync("int4", parts)
  np.testing.assert_allclose(int4, _np_int4_sync(parts), atol=1e-4, rtol=1e-5)
  bound = np.asarray(compress.error_bound(jnp.asarray(parts), "int4"))
  err = np.abs(int4 - exact)
  assert (err <= bound + 1e-5).all() and err.max() > 0.05 * bound.max()
  assert (int4[0, 0] == 0).all()
  # Hand-derived: a block of 16 with max 7 and integer values is exact (scale 1); one
  # device carrying it and the others zero gives it back unchanged.
  one = np.zeros((n, 1, 1, d), np.float32)
  one[0, 0, 0, :16] = np.arange(-7, 9) % 15 - 7
  np.testing.assert_array_equal(_sharded_sync("int4", one)[0], one[0])
  np.testing.assert_allclose(compress.emulated_sum(jnp.asarray(parts), "int4"), int4, atol=1e-5)
  # The wire: per token, d/2 bytes of nibbles plus 4 bytes per block of 16 (0.75 B/value).
  assert ("all-to-all", 2 * 3 * (d // 2 + 4 * d // 16)) in tp.collective_payloads(hlo)
  assert compress.payload_bytes_per_element("int4", d // n) == 0.75
  q = jnp.asarray(rng.integers(-7, 8, (3, 32)), jnp.int8)
  np.testing.assert_array_equal(compress.unpack_nibbles(compress.pack_nibbles(q)), q)
  with pytest.raises(ValueError, match="multiple of INT4_BLOCK=16"):
    _sharded_sync("int4", parts[..., :32])   # chunks of 8 values
  with pytest.raises(ValueError, match="multiple of INT4_BLOCK=16"):
    compress.payload_bytes_per_element("int4", 24)


def test_compressed_plan_forward_against_plain_and_emulation():
  cfg, n = MHA, 4
  params, tokens, dense = _setup(cfg)
  mesh = sharding.make_mesh(n)
  sp = tp.prepare_params(params, cfg, mesh)
  lossless = tp.SyncPlan.from_actions(["f32", "f32"], ["f32", "f32"])
  np.testing.assert_allclose(tp.make_forward(cfg, mesh, lossless)(sp, tokens), dense,
                             atol=1e-5, rtol=1e-5)
  mixed = tp.SyncPlan.from_actions(["int8", "drop"], ["bf16", "int8"])
  got = tp.make_forward(cfg, mesh, mixed)(sp, tokens)
  assert 1e-4 < np.abs(np.asarray(got) - np.asarray(dense)).max() < 0.5
  a, m = mixed.codes()
  emu = np.asarray(jax.jit(emulate.apply_plan, static_argnums=(2, 5))(params, tokens, cfg, a, m, n))
  # Rounding is discontinuous: float-order differences flip a few int8/bf16 roundings, so
  # the emulation must reproduce the compression's effect, not every bit of it.
  uncompressed = np.asarray(tp.make_forward(cfg, mesh, tp.SyncPlan(mixed.drop_attn))(sp, tokens))
  effect = np.abs(np.asarray(got) - uncompressed).mean()
  assert np.abs(emu - got).mean() < 0.05 * effect and np.abs(emu - got).max() < 0.01
  only_int8_attn = tp.SyncPlan.from_actions(["int8", "keep"])
  a, m = only_int8_attn.codes()
  np.testing.assert_allclose(
      jax.jit(emulate.apply_plan, static_argnums=(2, 5))(params, tokens, cfg, a, m, n),
      tp.make_forward(cfg, mesh, only_int8_attn)(sp, tokens), atol=1e-5, rtol=1e-5)
  # apply_plan with plain syncs is the dense / SPD model.
  drop = tp.SyncPlan((False, True))
  a, m = drop.codes()
  np.testing.assert_allclose(
      jax.jit(emulate.apply_plan, static_argnums=(2, 5))(params, tokens, cfg, a, m, n),
      np_reference.lm_logits(params, np.asarray(tokens), cfg, n_devices=n, drop=[False, True]),
      atol=2e-4, rtol=1e-4)
  text = tp.make_forward(cfg, mesh, mixed).lower(sp, tokens).compile().as_text()
  payloads = tp.collective_payloads(text)
  assert tp.count_all_reduces(text) == 0
  # int8 sync: one a2a whose result is B*L*D int8 plus B*L*N float32 scales packed in.
  b, l, d = tokens.shape + (cfg.d_model,)
  assert ("all-to-all", b * l * (d + n * 4)) in payloads
  assert ("all-gather", b * l * (d + n * 4)) in payloads
  # bf16 sync: 2-byte payloads on the wire (bit-cast, so XLA:CPU cannot widen them).
  assert ("all-to-all", b * l * d * 2) in payloads


def test_bad_plans_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown compression codec"):
    tp.SyncPlan((False,), ("int3",))
  with pytest.raises(ValueError, match="cannot be dropped"):
    tp.SyncPlan.from_actions(["keep"], ["drop"])
  with pytest.raises(ValueError, match="unknown attention action"):
    tp.SyncPlan.from_actions(["fp6"])
  with pytest.raises(ValueError, match="2 attention actions but 1 MLP"):
    tp.SyncPlan.from_actions(["keep", "drop"], ["keep"])
  with pytest.raises(ValueError, match="drop their attention sync and also compress"):
    tp.SyncPlan((True,), ("int8",))
  with pytest.raises(ValueError, match="mlp_codec has 1 entries for 2 blocks"):
    tp.SyncPlan((True, False), None, ("int8",))
  with pytest.raises(ValueError, match="unknown compression codec"):
    compress.payload_bytes_per_element("fp8", 16)
  with pytest.raises(ValueError, match="nor is TP a multiple"):
    sharding.check_tp_size(lm.LMConfig(d_model=48, n_heads=6, n_kv_heads=3, d_ff=48), 2 * 2)


def test_plans_emulate_where_int4_cannot_go_and_int4_there_raises():
  """d=32 at TP=4: chunks of 8, too small for int4's block of 16. Other plans still run in
  the one compiled emulation; a plan that selects int4 raises a clear error."""
  cfg = lm.LMConfig(d_model=32, n_layers=1, n_heads=4, d_ff=32, max_seq_len=16)
  params = lm.init(jax.random.key(0), cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  f = jax.jit(emulate.apply_plan, static_argnums=(2, 5))
  a, m = tp.SyncPlan.from_actions(["int8"]).codes()
  assert np.isfinite(np.asarray(f(params, tokens, cfg, a, m, 4))).all()
  a, m = tp.SyncPlan.from_actions(["int4"]).codes()
  with pytest.raises(Exception, match="multiple of INT4_BLOCK=16"):
    jax.block_until_ready(f(params, tokens, cfg, a, m, 4))
