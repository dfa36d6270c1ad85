"""RAPIDNN: k-means against scikit-learn, the lookup datapath against a NumPy
centroid-substituted network, retraining keeps weights on centroids, cost-model
counts against a hand count, clear errors for bad configs."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans

from accel import cost_model, rapidnn, retrain
from accel.kmeans import kmeans, nearest_sorted
from accel.program import program
from core import data
from core.models import cnn, mlp

MLP = mlp.MLPConfig(input_shape=(6, 6, 1), hidden=(12, 8), num_classes=3)
CNN = cnn.CNNConfig(input_shape=(8, 8, 1), channels=(4, 6), hidden=(10,), num_classes=3)


def _mixture(n=3000, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.array([-3.0, -1.0, 0.5, 2.0, 5.0])
  return (centres[rng.integers(0, 5, n)] + 0.3 * rng.normal(size=n)).astype(np.float32)


def test_kmeans_inertia_never_increases_and_matches_sklearn():
  x = _mixture()
  res = kmeans(x, 5, seed=0)
  assert np.all(np.diff(res.history) <= 1e-4 * res.history[0])
  sk = KMeans(5, n_init=1, random_state=0).fit(x[:, None])
  assert res.inertia <= 1.1 * sk.inertia_
  # Labels are the nearest centroids and the reported inertia is theirs.
  d = (x[:, None] - res.centroids[None]) ** 2
  np.testing.assert_array_equal(res.labels, d.argmin(1))
  np.testing.assert_allclose(res.inertia, d.min(1).sum(), rtol=1e-4)


def test_kmeans_is_deterministic_and_handles_2d_weights_and_duplicates():
  x = _mixture()
  a, b = kmeans(x, 4, seed=3), kmeans(x, 4, seed=3)
  np.testing.assert_array_equal(a.centroids, b.centroids)
  pts = np.random.default_rng(1).normal(size=(500, 2)).astype(np.float32)
  w = np.random.default_rng(2).integers(1, 4, 500)
  res = kmeans(pts, 6, weights=w)
  sk = KMeans(6, n_init=1, random_state=0).fit(pts, sample_weight=w)
  assert res.centroids.shape == (6, 2) and res.inertia <= 1.15 * sk.inertia_
  # Two distinct values, three clusters: an empty cluster must not produce NaN.
  dup = np.array([0.0] * 50 + [1.0] * 50, np.float32)
  res = kmeans(dup, 3)
  assert np.isfinite(res.centroids).all() and res.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("offset", [0.0, 1000.0])
def test_kmeans_multi_d_assigns_nearest_centres_and_matches_sklearn(offset):
  # D > 1 assigns by the |x|^2 - 2x.c + |c|^2 expansion; at offset 1000 (|x|^2 ~ 1.6e7
  # in float32) that cancels unless the data are centred first.
  rng = np.random.default_rng(0)
  centres = 3 * rng.normal(size=(8, 16))
  x = (offset + centres[rng.integers(0, 8, 3000)] + rng.normal(size=(3000, 16))).astype(np.float32)
  res = kmeans(x, 8, seed=0)
  d = ((x[:, None].astype(np.float64) - res.centroids[None]) ** 2).sum(-1)
  # Every label is the nearest centre (up to float ties) and the inertia is exact.
  np.testing.assert_allclose(d[np.arange(len(x)), res.labels], d.min(1), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(res.inertia, d.min(1).sum(), rtol=1e-4)
  assert np.all(np.diff(res.history) <= 1e-4 * res.history[0])
  sk = KMeans(8, n_init=1, random_state=0).fit(x)
  assert res.inertia <= 1.05 * sk.inertia_
  # More clusters than distinct points: relocation leaves no NaN in D > 1 either.
  two = np.repeat(np.array([[0.0, 1.0], [2.0, 3.0]], np.float32), 20, 0)
  r2 = kmeans(two, 3)
  assert np.isfinite(r2.centroids).all() and r2.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k=0"), ({"k": 11}, "k=11"),
                                           ({"k": 2, "weights": -np.ones(10)}, "weights")])
def test_kmeans_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kmeans(np.arange(10.0), **kwargs)


def test_nearest_sorted_is_the_argmin():
  c = np.sort(np.random.default_rng(0).normal(size=9)).astype(np.float32)
  x = np.random.default_rng(1).normal(size=1000).astype(np.float32) * 2
  np.testing.assert_array_equal(nearest_sorted(jnp.asarray(x), jnp.asarray(c)),
                                np.abs(x[:, None] - c).argmin(1))


def _built(model, cfg, u=8, w=8, **kw):
  params = {"mlp": mlp, "cnn": cnn}[model].init(jax.random.key(0), cfg)
  x = np.random.default_rng(0).uniform(size=(32, *cfg.input_shape)).astype(np.float32)
  ops = program(model, cfg)
  return params, ops, x, rapidnn.build(params, ops, x, rapidnn.RapidConfig(u=u, w=w, **kw))


def _numpy_mlp(cb, x):
  """Centroid-substituted MLP in NumPy: snap inputs, centroid kernels, ReLU."""
  h = np.asarray(x, np.float64).reshape(len(x), -1)
  names = sorted(cb)
  for i, n in enumerate(names):
    p = {k: np.asarray(v) for k, v in cb[n].items()}
    h = p["in_c"][np.abs(h[..., None] - p["in_c"]).argmin(-1)]
    h = h @ p["w_c"][p["w_idx"]] + p["bias"]
    if i < len(names) - 1:
      h = np.maximum(h, 0)
  return h


def test_lookup_datapath_equals_numpy_centroid_network_mlp():
  _, ops, x, cb = _built("mlp", MLP)
  emu = np.asarray(rapidnn.emulate(cb, jnp.asarray(x), ops))
  np.testing.assert_allclose(emu, _numpy_mlp(cb, x), rtol=1e-5, atol=1e-5)
  assert all(len(np.unique(np.asarray(p["w_c"])[np.asarray(p["w_idx"])])) <= 8
             for p in cb.values())


def _numpy_cnn(cb, x, n_conv):
  """Centroid-substituted CNN in NumPy loops (float64), written from the
  definitions: snap to the nearest input centroid, 3x3 SAME convolution with the
  centroid kernel, optional snap of pre-activations to the activation levels,
  ReLU, 2x2 max-pool; then the dense layers as in ``_numpy_mlp``."""
  snap = lambda v, c: c[np.abs(v[..., None] - c).argmin(-1)]
  h = np.asarray(x, np.float64)
  for i in range(n_conv):
    p = {k: np.asarray(v, np.float64) for k, v in cb[f"conv_{i}"].items() if k != "w_idx"}
    k = p["w_c"][np.asarray(cb[f"conv_{i}"]["w_idx"])]           # (3, 3, cin, cout)
    hp = np.pad(snap(h, p["in_c"]), ((0, 0), (1, 1), (1, 1), (0, 0)))
    b, hh, ww, _ = h.shape
    out = np.zeros((b, hh, ww, k.shape[-1]))
    for y in range(hh):
      for xx in range(ww):
        out[:, y, xx] = np.einsum("bijc,ijco->bo", hp[:, y:y + 3, xx:xx + 3], k)
    out += p["bias"]
    if "act" in p:
      out = snap(out, p["act"])
    out = np.maximum(out, 0)
    h = out.reshape(b, hh // 2, 2, ww // 2, 2, -1).max(axis=(2, 4))
  dense = {n: v for n, v in cb.items() if n.startswith("dense")}
  h = h.reshape(len(h), -1)
  for j, n in enumerate(sorted(dense)):
    p = {k: np.asarray(v, np.float64) for k, v in dense[n].items() if k != "w_idx"}
    h = snap(h, p["in_c"]) @ p["w_c"][np.asarray(dense[n]["w_idx"])] + p["bias"]
    if j < len(dense) - 1:
      if "act" in p:
        h = snap(h, p["act"])
      h = np.maximum(h, 0)
  return h


@pytest.mark.parametrize("act_levels", [None, 6])
def test_lookup_datapath_equals_numpy_centroid_network_cnn(act_levels):
  params, ops, x, cb = _built("cnn", CNN, act_levels=act_levels)
  emu = np.asarray(rapidnn.emulate(cb, jnp.asarray(x), ops))
  np.testing.assert_allclose(emu, _numpy_cnn(cb, x, len(CNN.channels)), rtol=1e-4, atol=1e-4)
  ref = rapidnn.float_forward(cb, ops, jnp.asarray(x))
  np.testing.assert_allclose(emu, ref, rtol=1e-5, atol=1e-5)


def test_fixed_point_accumulation_error_is_within_the_rounding_bound():
  cfg = mlp.MLPConfig(input_shape=(6, 6, 1), hidden=(), num_classes=3)  # one layer, K = 36
  _, ops, x, cb = _built("mlp", cfg)
  exact = rapidnn.emulate(cb, jnp.asarray(x), ops)
  for f in (2, 6, 10):
    err = float(jnp.max(jnp.abs(rapidnn.emulate(cb, jnp.asarray(x), ops, frac_bits=f) - exact)))
    assert 0 < err <= 36 * 2.0 ** -(f + 1) + 1e-5   # each of K products rounds by <= half an LSB


def test_retraining_keeps_weights_on_centroids_and_sums_gradients_per_centroid():
  ds = data.Dataset(name="toy", x_train=np.random.default_rng(0).uniform(
      size=(256, 6, 6, 1)).astype(np.float32), y_train=np.random.default_rng(1).integers(
      0, 3, 256), x_test=np.zeros((4, 6, 6, 1), np.float32), y_test=np.zeros(4, np.int64),
      num_classes=3)
  _, ops, x, cb = _built("mlp", MLP, u=4, w=4)
  trainable, fixed = retrain.split(cb)
  batch = data.image_batch(ds, 64, 0, 0)

  def loss(tr):
    logits = rapidnn.float_forward(retrain.merge(tr, fixed), ops, batch["x"], ste=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(64), batch["y"]])

  g = jax.grad(loss)(trainable)
  # Reference: the gradient w.r.t. the dense kernel, summed over each cluster.
  dq = {n: {"kernel": p["w_c"][p["w_idx"]]} for n, p in cb.items()}

  def loss_k(kernels):
    cb2 = {n: {**cb[n], "kernel": kernels[n]["kernel"]} for n in cb}
    cb2 = {n: {k: v for k, v in p.items() if k not in ("w_c", "w_idx")} for n, p in cb2.items()}
    logits = rapidnn.float_forward(cb2, ops, batch["x"], ste=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(64), batch["y"]])

  gk = jax.grad(loss_k)(dq)
  for n in cb:
    ref = np.bincount(np.asarray(cb[n]["w_idx"]).ravel(), np.asarray(gk[n]["kernel"]).ravel(),
                      minlength=4)
    np.testing.assert_allclose(g[n]["w_c"], ref, rtol=1e-4, atol=1e-6)
  new = retrain.retrain(cb, ops, ds, retrain.RetrainConfig(steps=5, batch=32, lr=1e-2))
  for n in cb:
    kernel = np.asarray(new[n]["w_c"])[np.asarray(new[n]["w_idx"])]
    assert set(np.unique(kernel)) <= set(np.asarray(new[n]["w_c"]))
    assert not np.allclose(new[n]["w_c"], cb[n]["w_c"])  # the centroids did move


def test_cost_model_counts_match_a_hand_count():
  cfg = cnn.CNNConfig(input_shape=(4, 4, 1), channels=(2,), hidden=(3,), num_classes=2)
  params = cnn.init(jax.random.key(0), cfg)
  c = cost_model.count_ops(program("cnn", cfg), cfg.input_shape, params)
  # conv: 4*4 positions x 2 out x 9 taps = 288; dense 8x3 = 24; dense 3x2 = 6.
  assert (c.macs, c.lookups, c.adds) == (318, 318, 318)
  # searches: 16 input pixels + 32 conv activations + 3 hidden; pool: 2*2*2 outputs x 3.
  assert (c.searches, c.pool_cmps) == (51, 24)
  # ISAAC's array+ADC+DAC energy for this network, by hand: 2.8 mW for 16 cycles of
  # 100 ns per 2048 MACs is 2.1875 pJ per MAC, times the 318 MACs counted above.
  assert cost_model.compare(c, 4)["isaac_pj"] == pytest.approx(318 * 2.1875)


@pytest.mark.parametrize("kw, err, match", [({"u": 0}, ValueError, "u and w"),
                                            ({"w": 0}, ValueError, "u and w"),
                                            ({"u": 2.5}, TypeError, "u must be an integer"),
                                            ({"act_levels": 1}, ValueError, "act_levels"),
                                            ({"calib_points": 0}, ValueError, "calib_points")])
def test_bad_rapid_configs_raise(kw, err, match):
  with pytest.raises(err, match=match):
    rapidnn.RapidConfig(**kw)


def test_emulate_and_build_name_what_is_wrong():
  params, ops, x, cb = _built("mlp", MLP)
  with pytest.raises(ValueError, match=r"images \(B, H, W, C\).*x\[\.\.\., None\]"):
    rapidnn.emulate(cb, jnp.asarray(x[..., 0]), ops)   # the MLP input without its channel axis
  with pytest.raises(ValueError, match="expects 36 inputs"):
    rapidnn.emulate(cb, jnp.zeros((2, 5, 5, 1)), ops)
  deeper = program("mlp", mlp.MLPConfig(input_shape=(6, 6, 1), hidden=(12, 8, 4), num_classes=3))
  with pytest.raises(ValueError, match=r"lack the layers \['dense_3'\]"):
    rapidnn.build(params, deeper, x, rapidnn.RapidConfig(u=4, w=4))
  with pytest.raises(ValueError, match="calibration inputs"):
    rapidnn.build(params, ops, None, rapidnn.RapidConfig(u=4, w=4))


@pytest.mark.parametrize("bad, match", [(np.nan, "non-finite"), (np.inf, "non-finite")])
def test_kmeans_refuses_non_finite_data(bad, match):
  x = np.arange(10.0)
  x[3] = bad
  with pytest.raises(ValueError, match=match):
    kmeans(x, 2)


def test_more_weight_clusters_than_weights_and_unsupported_models_raise():
  cfg = cnn.CNNConfig(input_shape=(4, 4, 1), channels=(1,), hidden=(2,), num_classes=2)
  params = cnn.init(jax.random.key(0), cfg)
  with pytest.raises(ValueError, match="exceed its 9 weights"):
    rapidnn.build(params, program("cnn", cfg), np.zeros((2, 4, 4, 1), np.float32),
                  rapidnn.RapidConfig(u=2, w=16))
  with pytest.raises(ValueError, match="'mlp' and 'cnn'"):
    program("vit", None)
  with pytest.raises(TypeError, match="CNNConfig"):
    program("cnn", MLP)
