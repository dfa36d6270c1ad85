"""CuRTAIL's input defender on the 8x8 digits: a class's own dictionary
rebuilds its images far better than another class's does, denoising removes
a good part of the error an off-dictionary perturbation adds, and the label-change
flag is exactly 'the classifier disagrees after denoising'."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from core import data
from secure import sparse
from secure.cleann import analyzers
from secure.curtail import input_defender

CFG = input_defender.InputDefenderConfig(
    patch=analyzers.PatchConfig(size=4, stride=2),
    dictionary=sparse.DictConfig(n_atoms=24, n_nonzero=3, iters=5), images_per_class=100)


@functools.lru_cache(maxsize=None)
def _setup():
  ds = data.load("digits")
  return ds, input_defender.fit(ds.x_train, ds.y_train, 10, CFG)


def test_own_class_dictionary_rebuilds_best():
  ds, d = _setup()
  x, y = ds.x_test[:100], ds.y_test[:100]
  own = np.mean((d.denoise(x, y) - x) ** 2)
  other = np.mean((d.denoise(x, (y + 5) % 10) - x) ** 2)
  assert own < 0.6 * other, (own, other)


def test_denoising_removes_most_of_a_random_perturbation():
  ds, d = _setup()
  x, y = ds.x_test[:100], ds.y_test[:100]
  noisy = np.clip(x + 0.15 * np.sign(np.random.default_rng(0).standard_normal(x.shape)), 0, 1)
  base = np.mean((d.denoise(x, y) - x) ** 2)           # what sparse coding loses anyway
  added = np.mean((d.denoise(noisy, y) - x) ** 2) - base
  assert added < 0.7 * np.mean((noisy - x) ** 2), (added, base)   # measured: 0.57


def test_flag_is_label_change_after_denoising():
  ds, d = _setup()
  means = jnp.asarray(np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)]))
  logits = lambda z: -jnp.sum((z[:, None] - means[None]) ** 2, axis=(2, 3, 4))
  x = ds.x_test[:60]
  pred = np.asarray(logits(jnp.asarray(x)).argmax(-1))
  labels = (pred + 1) % 10                       # claimed labels the images do not look like
  expected = np.asarray(logits(jnp.asarray(d.denoise(x, labels))).argmax(-1)) != labels
  np.testing.assert_array_equal(d.flags(x, labels, logits), expected)
  assert d.flags(x, labels, logits).mean() > d.flags(x, pred, logits).mean()
  with pytest.raises(ValueError, match="labels must lie in"):
    d.denoise(x[:2], np.array([0, 10]))
