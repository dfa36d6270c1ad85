"""CuRTAIL's latent defender: a point far outside every class Gaussian is
flagged, class means pass, the threshold holds its security percentile on the
training set, and the Gaussian log-density equals scipy's up to the shared
constant; bad configurations raise clear errors."""

import jax
import numpy as np
import pytest
from scipy import stats

from core.models import mlp
from secure.classifier import from_core
from secure.curtail import latent

CFG = mlp.MLPConfig(input_shape=(4, 4, 1), hidden=(12, 8), num_classes=3)
CLF = from_core("mlp", CFG)


def _setup(steps=0):
  rng = np.random.default_rng(0)
  centres = rng.random((3, 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 3, 300)
  x = np.clip(centres[y] + 0.05 * rng.standard_normal((300, 4, 4, 1)), 0, 1).astype(np.float32)
  params = mlp.init(jax.random.key(0), CFG)
  d = latent.fit(CLF, params, x, y, latent.LatentConfig(steps=steps, security=0.05))
  return d, x, y, centres


def test_far_points_flagged_class_means_pass_and_security_holds():
  d, x, y, centres = _setup(steps=50)
  assert np.mean(d.flags(x, y)) == pytest.approx(0.05, abs=0.01)  # on its own training set
  mean_imgs = np.stack([x[y == c].mean(0) for c in range(3)])
  assert not d.flags(mean_imgs, np.arange(3)).any()
  # A far point claimed as any class is flagged (it sits outside every Gaussian).
  far = np.concatenate([np.zeros((1, 4, 4, 1)), np.ones((1, 4, 4, 1))]).astype(np.float32)
  for c in range(3):
    assert d.flags(far, np.full(2, c)).any()


def test_log_density_matches_scipy_up_to_a_constant():
  d, x, y, _ = _setup()
  z = (d.features(x[:20]) - d.mean) @ d.components
  ref = [stats.multivariate_normal(d.class_means[c], np.linalg.inv(d.class_prec[c])).logpdf(zi)
         for zi, c in zip(z, y[:20])]
  diff = d.log_density(x[:20], y[:20]) - np.array(ref)
  np.testing.assert_allclose(diff, diff[0], atol=1e-4)   # the shared -R/2 log(2 pi)
  assert d.components.shape[1] <= 8


def test_bad_inputs_raise_clear_errors():
  params = mlp.init(jax.random.key(0), CFG)
  x = np.zeros((6, 4, 4, 1), np.float32)
  with pytest.raises(ValueError, match="no hidden layer 5"):
    latent.fit(CLF, params, x, np.arange(6) % 3, latent.LatentConfig(layer=5))
  with pytest.raises(ValueError, match=r"classes \[2\] have no training images"):
    latent.fit(CLF, params, x, np.arange(6) % 2, latent.LatentConfig(steps=0))
  with pytest.raises(ValueError, match="0 < security < 1"):
    latent.LatentConfig(security=1.5)
