"""CLEANN's analyzers on MNIST (5k subset): patching and the DCT invert exactly, benign
images reconstruct well and a foreign patch badly, thresholds hit their
false-positive rate, and the victim's label on the reconstruction recovers the
true class on a constructed backdoored classifier."""

import functools

import numpy as np
import pytest
import scipy.fft

from core import data
from secure import detection, sparse, triggers
from secure.cleann import analyzers as cleann

PATCH = cleann.PatchConfig(size=4, stride=2)  # for 8x8 digits
MNIST_PATCH = cleann.PatchConfig(size=7, stride=7)
TRIGGER = triggers.Patch(size=4, seed=4)


@functools.lru_cache(maxsize=None)
def _setup():
  ds = data.load("mnist5k")
  an = cleann.fit_input_analyzer(ds.x_train[:400], MNIST_PATCH,
                                 sparse.DictConfig(n_atoms=48, n_nonzero=4, iters=5))
  return ds, an


def test_patches_and_dct_invert_exactly():
  x = data.load("digits").x_test[:5]
  p = cleann.patches(x, PATCH)
  assert p.shape == (5, 9, 16)  # origins 0, 2, 4 on each side of 8 pixels
  np.testing.assert_allclose(cleann.assemble(p, (8, 8), PATCH), x, atol=1e-6)
  np.testing.assert_allclose(cleann.from_dct(cleann.to_dct(p, 4), 4), p, atol=1e-5)
  ref = scipy.fft.dctn(np.asarray(p).reshape(5, 9, 4, 4), axes=(-2, -1), norm="ortho")
  np.testing.assert_allclose(cleann.to_dct(p, 4), ref.reshape(5, 9, 16), atol=1e-5)
  ref_p = np.stack([x[:, r:r + 4, c:c + 4, 0].reshape(5, 16) for r in (0, 2, 4)
                    for c in (0, 2, 4)], axis=1)             # row-major origins, by slicing
  np.testing.assert_array_equal(p, ref_p)
  odd = cleann.patches(np.zeros((1, 7, 7, 1)), cleann.PatchConfig(size=4, stride=2))
  assert odd.shape == (1, 9, 16)  # origins 0, 2 and a last one flush with the edge (3)


def test_benign_images_score_low_and_a_foreign_patch_high():
  ds, an = _setup()
  benign = an.score(ds.x_test[:200])
  thr = detection.threshold_for_fpr(an.score(ds.x_train[400:800]), 0.01)
  patched = an.score(TRIGGER(ds.x_test[:200]))
  assert np.mean(benign > thr) < 0.05
  assert np.mean(patched > thr) > 0.9
  rec = an.reconstruct(ds.x_test[:50])
  assert np.mean((rec - ds.x_test[:50]) ** 2) < 0.1 * np.mean(ds.x_test[:50] ** 2)


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.2])
def test_threshold_gives_the_requested_fpr_on_its_split(fpr):
  scores = np.random.default_rng(0).exponential(size=1000)
  thr = detection.threshold_for_fpr(scores, fpr)
  assert np.mean(scores > thr) <= fpr and np.mean(scores > thr) >= fpr - 0.002


def test_label_recovery_on_a_constructed_backdoored_classifier():
  ds, an = _setup()
  means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
  trig = TRIGGER
  mark = trig.pattern()

  def victim(x):
    """Nearest class mean, except that the trigger in the corner means class 0."""
    pred = np.argmin(((x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4)), axis=1)
    hit = np.abs(x[:, -4:, -4:, 0] - mark).max(axis=(1, 2)) < 0.1
    return np.where(hit, 0, pred)

  x, y = ds.x_test[ds.y_test != 0][:150], ds.y_test[ds.y_test != 0][:150]
  clean_acc = np.mean(victim(x) == y)
  assert np.mean(victim(trig(x)) == 0) == 1.0            # the backdoor fires on every one
  recovered = np.mean(victim(an.reconstruct(trig(x))) == y)
  assert recovered > 0.8 * clean_acc, (recovered, clean_acc)


def test_latent_analyzer_flags_features_off_the_benign_subspace():
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.standard_normal((32, 32)))[0][:8]
  benign = rng.standard_normal((600, 8)) @ basis
  an = cleann.fit_latent_analyzer(benign[:400], sparse.DictConfig(n_atoms=16, n_nonzero=8,
                                                                  iters=5))
  thr = detection.threshold_for_fpr(an.score(benign[400:500]), 0.05)
  off = benign[500:] + 0.5 * rng.standard_normal((100, 32))
  assert np.mean(an.score(benign[500:]) > thr) < 0.1 and np.mean(an.score(off) > thr) > 0.95


def test_bad_inputs_raise_clear_errors():
  ds, an = _setup()
  with pytest.raises(ValueError, match=r"single-channel images \(N, H, W, 1\)"):
    an.score(ds.x_test[:2, :, :, 0])
  with pytest.raises(ValueError, match="fitted on images with 16"):
    an.score(np.zeros((1, 14, 14, 1), np.float32))
  with pytest.raises(ValueError, match="at least one benign calibration image"):
    cleann.fit_input_analyzer(np.zeros((0, 8, 8, 1)), PATCH, sparse.DictConfig())
  with pytest.raises(ValueError, match="NaN or inf"):
    an.score(np.full((1, 28, 28, 1), np.nan, np.float32))
  with pytest.raises(ValueError, match="n_nonzero=60 must lie"):
    cleann.InputAnalyzer(an.dictionary, MNIST_PATCH, 60).score(ds.x_test[:2])
  with pytest.raises(ValueError, match="at least one benign validation score"):
    detection.threshold_for_fpr([], 0.01)
  with pytest.raises(ValueError, match="patch size 9 exceeds"):
    cleann.patches(data.load("digits").x_test[:1], cleann.PatchConfig(size=9, stride=1))
