"""CuRTAIL's peers against independent references: the 2x2 median against a
NumPy loop, bit-depth squeezing by hand, Mahalanobis scores against
scikit-learn's EmpiricalCovariance on the pooled residuals, and MagNet's
auto-encoder reconstructing digits better than noise."""

import jax.numpy as jnp
import numpy as np
from sklearn.covariance import EmpiricalCovariance

from core import data
from secure.curtail import peers


def test_median_and_bit_depth_by_hand():
  x = np.random.default_rng(0).random((2, 5, 4, 1)).astype(np.float32)
  p = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
  ref = np.zeros_like(x)
  for i in range(5):
    for j in range(4):
      ref[:, i, j] = np.median(p[:, i:i + 2, j:j + 2].reshape(2, 4, 1), axis=1)
  np.testing.assert_allclose(peers.median_2x2(x), ref, atol=1e-6)
  np.testing.assert_allclose(peers.bit_depth(jnp.array([0.1, 0.4, 0.6, 0.9]), 1), [0, 0, 1, 1])
  np.testing.assert_allclose(peers.bit_depth(jnp.array([0.2, 0.5]), 2), [1 / 3, 2 / 3])


def test_mahalanobis_matches_sklearn_tied_covariance():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 200)
  f = rng.standard_normal((200, 4)) + 3 * np.eye(4)[y][:, :4]
  m = peers.fit_mahalanobis(lambda x: x.reshape(len(x), -1), f.reshape(200, 4, 1, 1), y, 3,
                            ridge=0.0)
  means = np.stack([f[y == c].mean(0) for c in range(3)])
  cov = EmpiricalCovariance(assume_centered=True).fit(f - means[y])
  q = rng.standard_normal((10, 4))
  ref = np.min([cov.mahalanobis(q - means[c]) for c in range(3)], axis=0)
  np.testing.assert_allclose(m.score(q.reshape(10, 4, 1, 1)), ref, rtol=1e-5)


def test_magnet_reconstructs_digits_better_than_noise():
  ds = data.load("digits")
  mag = peers.fit_magnet(lambda x: jnp.zeros((len(x), 10)), ds.x_train,
                         peers.MagNetConfig(steps=1000))
  noise = np.random.default_rng(0).random((50, 8, 8, 1)).astype(np.float32)
  assert np.median(mag.score(ds.x_test[:50])) < 0.5 * np.median(mag.score(noise))
