"""Shared models against independent NumPy references, plus cache/causality checks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.models import CLASSIFIERS, classifier_config, cnn, lm, mlp, vit
from tests import np_reference



@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Float32 matmuls at full precision for comparisons with float64 NumPy, set
  per test (not at import, where it would leak into every other test module)."""
  with jax.default_matmul_precision("highest"):
    yield

# Jitted entry points: eager op-by-op dispatch would dominate the test time.
lm_apply = jax.jit(lm.apply, static_argnums=2)
lm_forward = jax.jit(lm.forward, static_argnums=2)


SMALL = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=16)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_lm_matches_numpy_reference(n_kv_heads):
  cfg = lm.LMConfig(**SMALL, n_kv_heads=n_kv_heads)
  params = lm.init(jax.random.key(0), cfg)
  tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
  logits = lm_apply(params, jnp.asarray(tokens), cfg)
  chex.assert_shape(logits, (2, 12, 256))
  np.testing.assert_allclose(logits, np_reference.lm_logits(params, tokens, cfg), atol=2e-4, rtol=1e-4)


def test_lm_param_layout_is_head_explicit():
  cfg = lm.LMConfig(**SMALL, n_kv_heads=2)
  p = lm.init(jax.random.key(0), cfg)["block_0"]
  chex.assert_shape([p["attn"]["wq"], p["attn"]["wk"], p["attn"]["wo"], p["mlp"]["w_down"]],
                    [(32, 4, 8), (32, 2, 8), (4, 8, 32), (48, 32)])


def test_lm_is_causal():
  cfg = lm.LMConfig(**SMALL)
  params = lm.init(jax.random.key(1), cfg)
  t = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 10)))
  t2 = t.at[0, 7].set((t[0, 7] + 1) % 256)
  a, b = lm_apply(params, t, cfg), lm_apply(params, t2, cfg)
  np.testing.assert_array_equal(a[:, :7], b[:, :7])
  assert not np.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("use_bias", [False, True])
def test_kv_cache_prefill_then_decode_equals_full_forward(use_bias):
  cfg = lm.LMConfig(**SMALL, n_kv_heads=2, use_bias=use_bias)
  params = lm.init(jax.random.key(2), cfg)
  if use_bias:  # non-zero biases, so a bias applied twice or never would show
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key.startswith("b") else x, params)
  t = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 14)))
  full = lm_apply(params, t, cfg)
  logits, cache = lm_forward(params, t[:, :9], cfg, cache=lm.init_cache(cfg, 2), pos=0)
  steps = [logits]
  for i in range(9, 14):
    logits, cache = lm_forward(params, t[:, i:i + 1], cfg, cache=cache, pos=i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)


def test_greedy_generate_matches_argmax_of_full_forward():
  cfg = lm.LMConfig(**SMALL)
  params = lm.init(jax.random.key(3), cfg)
  prompt = jnp.asarray([[10, 20, 30, 40]], jnp.int32)
  step = jax.jit(lambda tok, cache, pos: lm.forward(params, tok, cfg, cache=cache, pos=pos))
  out = lm.greedy_generate(step, prompt, lm.init_cache(cfg, 1), n_new=6)
  seq = prompt
  for _ in range(6):  # independent: re-run the whole prefix each time
    nxt = jnp.argmax(lm_apply(params, seq, cfg)[:, -1], -1)[:, None]
    seq = jnp.concatenate([seq, nxt.astype(jnp.int32)], 1)
  np.testing.assert_array_equal(out, seq[:, 4:])


def test_lm_loss_is_log_vocab_for_uniform_logits():
  cfg = lm.LMConfig(**SMALL, tie_embeddings=False)
  params = lm.init(jax.random.key(0), cfg)
  params["unembed"]["kernel"] = jnp.zeros_like(params["unembed"]["kernel"])
  loss, _ = lm.loss(params, {"tokens": jnp.zeros((2, 9), jnp.int32)}, cfg)
  np.testing.assert_allclose(loss, np.log(256), rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=30, n_heads=4), "not divisible"),
    (dict(n_heads=4, n_kv_heads=3), "not a multiple"),
    (dict(d_model=12, n_heads=4), "even"),
    (dict(n_layers=0), "n_layers"),
])
def test_lm_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    lm.LMConfig(**kwargs)


def test_forward_rejects_positions_past_the_cache():
  cfg = lm.LMConfig(**SMALL)
  params = lm.init(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r"positions 6\.\.9 do not fit the cache length 8"):
    lm.forward(params, jnp.zeros((1, 4), jnp.int32), cfg, cache=lm.init_cache(cfg, 1, 8), pos=6)
  # A traced position (what jitted decode steps get) fails when the step runs,
  # instead of dynamic_update_slice clamping the write onto the last slot.
  step = jax.jit(lambda tok, cache, pos: lm.forward(params, tok, cfg, cache=cache, pos=pos))
  cache = lm.init_cache(cfg, 1, 12)
  step(jnp.zeros((1, 1), jnp.int32), cache, jnp.asarray(11))  # the last slot is fine
  with pytest.raises(Exception, match=r"positions 12\.\.12 do not fit the cache length 12"):
    jax.block_until_ready(step(jnp.zeros((1, 1), jnp.int32), cache, jnp.asarray(12)))
  # Generation knows its positions: 10 + 8 tokens into 12 slots is refused up front.
  with pytest.raises(ValueError, match="writes 17 cache positions; the cache holds 12"):
    lm.greedy_generate(step, jnp.zeros((1, 10), jnp.int32), cache, 8)
  with pytest.raises(ValueError, match="batch 2 but the KV cache was made for batch 1"):
    lm.forward(params, jnp.zeros((2, 1), jnp.int32), cfg, cache=cache, pos=0)


@pytest.mark.parametrize("tokens, err, match", [
    ([[1, 300]], ValueError, r"\[0, 256\); got values from 1 to 300"),
    ([[-1, 2]], ValueError, r"got values from -1 to 2"),
    ([1, 2, 3], ValueError, r"\(batch, length\).*tokens\[None\]"),
    ([[0.5, 1.0]], TypeError, "integers"),
])
def test_lm_rejects_bad_token_ids_eagerly_and_under_jit(tokens, err, match):
  cfg = lm.LMConfig(**SMALL)
  params = lm.init(jax.random.key(0), cfg)
  with pytest.raises(err, match=match):
    lm.apply(params, jnp.asarray(tokens), cfg)
  if err is ValueError and np.ndim(tokens) == 2:  # traced: fails when it runs, never NaN
    with pytest.raises(Exception, match=match):
      jax.block_until_ready(lm_apply(params, jnp.asarray(tokens), cfg))


def test_mlp_matches_numpy():
  cfg = mlp.MLPConfig(input_shape=(8, 8, 1), hidden=(16, 12))
  p = mlp.init(jax.random.key(0), cfg)
  x = np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32)
  h = x.reshape(5, -1)
  hidden = []
  for i in range(3):
    h = h @ np.asarray(p[f"dense_{i}"]["kernel"]) + np.asarray(p[f"dense_{i}"]["bias"])
    h = np.maximum(h, 0) if i < 2 else h
    hidden.append(h)
  np.testing.assert_allclose(jax.jit(mlp.apply, static_argnums=2)(p, jnp.asarray(x), cfg), h, atol=1e-5)
  for layer, ref in [(0, hidden[0]), (1, hidden[1]), (-1, hidden[1]), (-2, hidden[0])]:
    np.testing.assert_allclose(mlp.features(p, jnp.asarray(x), cfg, layer), ref, atol=1e-5)
  with pytest.raises(ValueError, match="layer 2 is past the model: it has 2 hidden layers"):
    mlp.features(p, jnp.asarray(x), cfg, 2)


def np_conv_same(x, k, b):
  n, hh, ww, _ = x.shape
  kh, kw, _, co = k.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, hh, ww, co))
  for i in range(hh):
    for j in range(ww):
      out[:, i, j] = np.einsum("nhwc,hwco->no", xp[:, i:i + kh, j:j + kw], k)
  return out + b


def test_cnn_matches_numpy():
  cfg = cnn.CNNConfig(input_shape=(8, 8, 1), channels=(3, 4), hidden=(6,))
  p = jax.tree_util.tree_map(np.asarray, cnn.init(jax.random.key(0), cfg))
  x = np.random.default_rng(0).random((2, 8, 8, 1), dtype=np.float32)
  h = x
  hidden = []
  for i in range(2):
    h = np.maximum(np_conv_same(h, p[f"conv_{i}"]["kernel"], p[f"conv_{i}"]["bias"]), 0)
    n, hh, ww, c = h.shape
    h = h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
    hidden.append(h.reshape(2, -1))
  h = np.maximum(h.reshape(2, -1) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0)
  hidden.append(h)
  h = h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
  np.testing.assert_allclose(jax.jit(cnn.apply, static_argnums=2)(p, jnp.asarray(x), cfg), h, atol=1e-5)
  for layer in (0, 1, 2, -1, -3):
    np.testing.assert_allclose(cnn.features(p, jnp.asarray(x), cfg, layer), hidden[layer],
                               atol=1e-5)
  with pytest.raises(ValueError, match="layer -4 is past the model: it has 3 hidden layers"):
    cnn.features(p, jnp.asarray(x), cfg, -4)


def test_vit_patchify_and_permutation_invariance_of_heads():
  cfg = vit.ViTConfig(input_shape=(8, 8, 1), patch=4, d_model=16, n_layers=1, n_heads=4, d_ff=32)
  x = np.arange(2 * 64, dtype=np.float32).reshape(2, 8, 8, 1)
  patches = vit.patchify(jnp.asarray(x), 4)
  np.testing.assert_array_equal(patches[0, 1], x[0, :4, 4:8, 0].ravel())  # 2nd patch: top-right
  p = vit.init(jax.random.key(0), cfg)
  p["head"]["kernel"] = jax.random.normal(jax.random.key(1), p["head"]["kernel"].shape)
  # Reordering heads consistently in Q/K/V/O must not change the function.
  perm = np.array([2, 0, 3, 1])
  q = jax.tree_util.tree_map(lambda a: a, p)
  a = q["block_0"]["attn"]
  for k in ("wq", "wk", "wv"):
    a[k] = a[k][:, perm]
  for k in ("bq", "bk", "bv"):
    a[k] = a[k][perm]
  a["wo"] = a["wo"][perm]
  xr = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1))
  np.testing.assert_allclose(jax.jit(vit.apply, static_argnums=2)(p, xr, cfg), vit.apply(q, xr, cfg), atol=1e-5)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8, 1)])
def test_classifiers_shape_and_input_check(name, shape):
  cfg = classifier_config(name, shape, 10)
  module = CLASSIFIERS[name]
  p = module.init(jax.random.key(0), cfg)
  out = jax.jit(module.apply, static_argnums=2)(p, jnp.ones((3, *shape)), cfg)
  chex.assert_shape(out, (3, 10))
  chex.assert_tree_all_finite(out)
  with pytest.raises(ValueError, match="expects inputs"):
    module.apply(p, jnp.ones((3, 5, 5, 1)), cfg)


def test_unknown_classifier_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown classifier 'resnet'"):
    classifier_config("resnet", (8, 8, 1), 10)


@pytest.mark.parametrize("shape", [(3, 28, 28, 4), (2, 7, 9, 3)])
def test_max_pool_equals_reduce_window_values_and_gradient(shape):
  # The reshape-and-max pooling against XLA's reduce_window (VALID, 2x2, stride 2) and
  # its select-and-scatter gradient; normal draws have no tied maxima.
  x = jax.random.normal(jax.random.key(0), shape)
  ref = lambda x: jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                        "VALID")
  np.testing.assert_array_equal(cnn.max_pool_2x2(x), ref(x))
  g = jax.random.normal(jax.random.key(1), ref(x).shape)
  np.testing.assert_array_equal(jax.vjp(cnn.max_pool_2x2, x)[1](g)[0], jax.vjp(ref, x)[1](g)[0])


@pytest.mark.parametrize("kernel_hw", [(3, 3), (5, 3), (1, 1)])
def test_conv_gradients_equal_the_lax_convolutions(kernel_hw):
  # The custom input gradient (a plain conv with the flipped, in/out-swapped kernel)
  # against JAX's own transpose of lax.conv_general_dilated, for the input and the
  # kernel, on non-square images and kernels; reverse mode twice (a gradient penalty).
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  k = jax.random.normal(jax.random.key(1), (*kernel_hw, 3, 5))
  b = jnp.arange(5.0)
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  ours = lambda x, k: cnn.conv2d(x, k, b)
  np.testing.assert_allclose(ours(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
  g = jax.random.normal(jax.random.key(2), ref(x, k).shape)
  for got, want in zip(jax.vjp(ours, x, k)[1](g), jax.vjp(ref, x, k)[1](g)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  penalty = lambda f: jax.grad(lambda k: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, k) ** 3))(x) ** 2))
  np.testing.assert_allclose(penalty(ours)(k), penalty(ref)(k), rtol=1e-4, atol=1e-3)


def test_conv_refuses_even_kernels():
  with pytest.raises(ValueError, match="odd kernel"):
    cnn.conv2d(jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1)), jnp.zeros(1))
