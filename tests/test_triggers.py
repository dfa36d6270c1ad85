"""Backdoor triggers and poisoning: exactly the intended images and labels
change, triggers stay in [0, 1], and the identity settings change nothing."""

import numpy as np
import pytest

from core import data
from secure import triggers


@pytest.fixture(scope="module")
def digits():
  return data.load("digits")


def test_poisoning_changes_exactly_the_intended_images_and_labels(digits):
  ds, idx = triggers.poison(digits, triggers.Patch(size=2), target=3, rate=0.05, seed=1)
  assert len(idx) == round(0.05 * len(digits.x_train)) and len(set(idx)) == len(idx)
  assert (digits.y_train[idx] != 3).all()               # drawn from non-target images
  assert (ds.y_train[idx] == 3).all()
  rest = np.setdiff1d(np.arange(len(ds.x_train)), idx)
  np.testing.assert_array_equal(ds.x_train[rest], digits.x_train[rest])
  np.testing.assert_array_equal(ds.y_train[rest], digits.y_train[rest])
  np.testing.assert_array_equal(ds.x_test, digits.x_test)
  changed = (ds.x_train[idx] != digits.x_train[idx]).any(axis=(1, 2, 3))
  assert changed.mean() > 0.9  # a few images may already hold the pattern's values
  # The patch writes only its corner: a 2x2 block at the bottom right of 8x8 images.
  diff = (ds.x_train[idx] != digits.x_train[idx]).any(axis=(0, 3))
  assert not diff[:6].any() and not diff[:, :6].any()
  again, idx2 = triggers.poison(digits, triggers.Patch(size=2), target=3, rate=0.05, seed=1)
  np.testing.assert_array_equal(idx, idx2)             # seeded


@pytest.mark.parametrize("trigger", [triggers.Patch(size=3), triggers.Blend(alpha=0.2),
                                     triggers.Warp(strength=1.5)], ids=type)
def test_triggers_stay_in_range_and_change_the_images(digits, trigger):
  x = digits.x_test[:16]
  out = trigger(x)
  assert out.shape == x.shape and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 1
  assert np.abs(out - x).max() > 0.05
  np.testing.assert_array_equal(out, trigger(x))       # a fixed trigger, not noise


def test_identity_settings_change_nothing(digits):
  x = digits.x_test[:8]
  np.testing.assert_allclose(triggers.Blend(alpha=0.0)(x), x)
  np.testing.assert_allclose(triggers.Warp(strength=0.0)(x), x, atol=1e-6)


def test_warp_moves_content_by_about_its_strength():
  # A horizontal ramp warped by a field of at most 1 pixel changes by at most one step.
  ramp = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (16, 1))[None, :, :, None]
  out = triggers.Warp(strength=1.0, seed=2)(ramp)
  assert 0 < np.abs(out - ramp).max() <= 1 / 15 + 1e-6


def test_bad_inputs_raise(digits):
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    triggers.Patch()(digits.x_test[0])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    triggers.Blend()(digits.x_test[:2] + 1.0)
  with pytest.raises(ValueError, match="NaN|finite"):
    triggers.Blend()(np.full((1, 8, 8, 1), np.nan, np.float32))
  with pytest.raises(ValueError, match="does not fit"):
    triggers.Patch(size=9)(digits.x_test[:2])
  with pytest.raises(ValueError, match="target class 10"):
    triggers.poison(digits, triggers.Patch(), target=10, rate=0.05)
  with pytest.raises(ValueError, match="rate"):
    triggers.poison(digits, triggers.Patch(), target=0, rate=1.5)
