"""Issue 24's parts of CLEANN against independent references: the envelope
by NumPy, the latent-guided purification's residual against scikit-learn's
OMP, the new triggers by hand, the consistency peers on constructed models
whose answers are known, and a user's own classifier and trigger shielded
end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.linear_model import orthogonal_mp

from core import data
from secure import combine, sparse, triggers
from secure.classifier import Classifier
from secure.cleann import consistency, envelope, purify, shield, victims


def test_envelope_counts_pixels_outside_the_benign_range_on_either_side():
  rng = np.random.default_rng(0)
  benign = rng.random((50, 4, 4, 1)).astype(np.float32) * 0.5 + 0.25   # within [0.25, 0.75]
  an = envelope.fit(benign, envelope.EnvelopeConfig(quantile=0.0, margin=0.01,
                                                    clip_quantile=0.0))
  lo, hi = benign.min(0), benign.max(0)
  x = rng.random((7, 4, 4, 1)).astype(np.float32)
  ref = ((x > hi + 0.01) | (x < lo - 0.01)).reshape(7, -1).mean(1)
  np.testing.assert_allclose(an.score(x), ref)
  dim = np.full((1, 4, 4, 1), 0.0, np.float32)          # below everything benign: counted
  assert an.score(dim)[0] == 1.0 and an.score(benign[:3]).max() == 0.0
  np.testing.assert_allclose(an.reconstruct(x), np.clip(x, lo, hi))
  with pytest.raises(ValueError, match="fitted on images"):
    an.score(np.zeros((1, 5, 5, 1), np.float32))


def test_latent_residual_matches_sklearn_omp_and_purification_lowers_it():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((16, 12)), jnp.float32)
  feats = lambda params, x: jnp.tanh(x.reshape(x.shape[0], -1) @ params)
  d = rng.standard_normal((20, 12))
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  x = rng.random((5, 4, 4, 1)).astype(np.float32)
  got = np.asarray(purify.latent_residual(feats, w, d, 3, jnp.asarray(x)))
  f = np.asarray(feats(w, jnp.asarray(x)), np.float64)
  codes = orthogonal_mp(d.T, f.T, n_nonzero_coefs=3).T
  np.testing.assert_allclose(got, ((f - codes @ d) ** 2).sum(1), rtol=1e-4, atol=1e-5)
  cfg = purify.PurifyConfig(epsilon=0.2, steps=20)
  z = purify.purify(feats, w, d, 3, x, cfg)
  after = np.asarray(purify.latent_residual(feats, w, d, 3, jnp.asarray(z)))
  assert np.abs(z - x).max() <= 0.2 + 1e-6 and (after < got).all()


def test_sinusoid_and_location_free_patch_by_hand():
  x = np.full((2, 6, 8, 1), 0.5, np.float32)
  out = triggers.Sinusoid(amplitude=0.1, frequency=2)(x)
  col = 0.5 + 0.1 * np.sin(2 * np.pi * np.arange(8) * 2 / 8)
  np.testing.assert_allclose(out[1, 3, :, 0], col, rtol=1e-6)
  imgs = np.random.default_rng(0).random((20, 10, 10, 1)).astype(np.float32)
  rp = triggers.RandomPatch(size=3, seed=0)
  t, pos = rp(imgs), rp.positions(imgs)
  pattern = triggers.Patch(3, seed=0).pattern()
  for img, (r, c) in zip(t, pos):
    np.testing.assert_array_equal(img[r:r + 3, c:c + 3, 0], pattern)
  assert len({tuple(p) for p in pos}) > 5                      # the location varies
  np.testing.assert_array_equal(rp(imgs[5:6]), t[5:6])         # a pure function of each image


def _linear(params, x):
  return x.reshape(x.shape[0], -1) @ params


def test_scale_up_is_one_for_a_scale_invariant_model_and_counts_flips():
  w = jnp.asarray([[1.0, 0.0], [0.0, 1.0]])
  x = np.array([[[[0.05]], [[0.01]]], [[[0.2]], [[0.6]]]], np.float32).reshape(2, 2, 1, 1)
  # No bias, no clipping below 1 for factor 1 ... but clip(n x) saturates at 1:
  # image 0 (0.05, 0.01) keeps class 0 for n = 3, 5, 7, 9, 11 (0.15 > 0.03 ... 0.55 > 0.11);
  # image 1 (0.2, 0.6) -> (0.6, 1), (1, 1) ties to class 0 from n = 5 on (argmax takes the first).
  s = consistency.ScaleUp(_linear, w).scores(x)
  np.testing.assert_allclose(s, [1.0, 1 / 5])


def test_teco_flip_severity_on_a_brightness_threshold_model():
  # Class 1 iff the mean pixel exceeds 0.5: brightness +c flips an image of mean m at the
  # first severity with m + c > 0.5 (0.0 + 0.5 ties, and a tie keeps class 0).
  apply = lambda p, x: jnp.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], -1)
  x = np.stack([np.full((4, 4, 1), m, np.float32) for m in (0.45, 0.25, 0.05, 0.0)])
  bright = [c for c in consistency.CORRUPTIONS if c[0] == "brightness"]
  t = consistency.TeCo(apply, None, corruptions=tuple(bright))
  np.testing.assert_array_equal(t.flip_severity(x)[:, 0], [1, 3, 5, 6])   # 6 = never


def test_ibd_psc_is_the_scaled_models_confidence_by_hand():
  rng = np.random.default_rng(2)
  params = {"dense_0": {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                        "bias": jnp.zeros(3)},
            "dense_1": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
                        "bias": jnp.asarray([0.3, -0.2])}}

  def apply(p, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    return h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]

  x = rng.random((6, 2, 2, 1)).astype(np.float32)
  d = consistency.IbdPsc(apply, params, factor=2.0)
  # The only hidden kernel is dense_0's; doubling it (zero bias) doubles h.
  h = np.maximum(x.reshape(6, -1) @ np.asarray(params["dense_0"]["kernel"]), 0)
  z0 = h @ np.asarray(params["dense_1"]["kernel"]) + [0.3, -0.2]
  z1 = 2 * h @ np.asarray(params["dense_1"]["kernel"]) + [0.3, -0.2]
  p1 = np.exp(z1) / np.exp(z1).sum(1, keepdims=True)
  np.testing.assert_allclose(d.scores(x), p1[np.arange(6), z0.argmax(1)], rtol=1e-5)


# --- a user's own classifier and trigger, shielded end to end ------------------------------


def _tanh_apply(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  return h @ params["w2"] + params["b2"]


def _tanh_features(params, x, layer):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])


def _diagonal(x):
  """The user's trigger: a bright anti-diagonal stroke."""
  x = np.array(x, np.float32)
  i = np.arange(x.shape[1])
  x[:, i, x.shape[2] - 1 - i, :] = 1.0
  return x


@functools.lru_cache(maxsize=None)
def _user_victim():
  ds = data.load("digits")                       # 8x8 images, 1,797 of them
  rest, defender_x, _ = data.holdout(ds, 300, seed=0)
  poisoned, _ = triggers.poison(rest, _diagonal, target=0, rate=0.1, seed=0)
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32),
            "b1": jnp.zeros(64), "w2": jnp.asarray(rng.standard_normal((64, 10)) / 8,
                                                   jnp.float32), "b2": jnp.zeros(10)}
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(_tanh_apply(p, xb), yb).mean()
    g = jax.grad(loss)(p)
    u, s = opt.update(g, s)
    return optax.apply_updates(p, u), s

  for i in range(600):
    idx = rng.integers(0, len(poisoned.x_train), 64)
    params, state = step(params, state, poisoned.x_train[idx], poisoned.y_train[idx])
  clf = Classifier(_tanh_apply, _tanh_features, ("hidden",), 10, "user_tanh")
  return victims.wrap(clf, params, ds, defender_x, _diagonal, target=0)


def test_a_user_classifier_and_trigger_are_shielded_end_to_end():
  v = _user_victim()
  t = victims.threat(v)
  assert t["asr"] > 90 and t["c_acc"] > 85, t
  cfg = shield.ShieldConfig(patch=shield.analyzers.PatchConfig(size=4, stride=2),
                            input_dict=sparse.DictConfig(n_atoms=32, n_nonzero=3, iters=4),
                            latent_dict=sparse.DictConfig(n_atoms=32, n_nonzero=4, iters=4),
                            purify=purify.PurifyConfig(epsilon=0.1, steps=10))
  sh = shield.fit(v, cfg)
  assert sh.modules == ("input", "envelope", "latenthidden")
  # The combination's FPR holds on the split that set it, by construction.
  _, x_val = victims.defender_split(v.defender_x, cfg.fit_fraction)
  s_val = sh.module_scores(x_val)
  for f, c in sh.combiners.items():
    assert np.mean(c.flags(s_val)) <= f
    ref = combine.fit(s_val, cfg.rule, f)                # the same calibration, refitted
    np.testing.assert_allclose(np.asarray(c.statistic(s_val)), np.asarray(ref.statistic(s_val)))
  x_att, y_att = v.attack_set()
  labels, flagged = sh(v.trigger(x_att), fpr=0.05)
  assert flagged.mean() > 0.9 and np.mean(labels == 0) < 0.1
  assert np.mean(labels == y_att) > 0.6
  _, cflag = sh(v.ds.x_test, fpr=0.05)
  assert cflag.mean() < 0.12                              # held-out clean images
  with pytest.raises(TypeError, match="callable"):
    victims.VictimConfig(trigger=3)
