"""Batched evaluation against direct NumPy computation (including the padded tail)."""

import math

import jax.numpy as jnp
import numpy as np

from core import evaluation


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_classifier_metrics_match_numpy_with_a_partial_last_batch():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(6, 4)).astype(np.float32)
  x = rng.normal(size=(23, 6)).astype(np.float32)
  y = rng.integers(0, 4, 23).astype(np.int32)
  m = evaluation.classifier_metrics(lambda p, xb: xb @ p, jnp.asarray(w), x, y, batch_size=10)
  logits = x @ w
  nll = -_np_log_softmax(logits)[np.arange(23), y]
  np.testing.assert_allclose(m["loss"], nll.mean(), rtol=1e-5)
  assert m["accuracy"] == np.mean(logits.argmax(-1) == y)


def test_lm_metrics_match_numpy():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(256, 256)).astype(np.float32)  # bigram logits
  windows = rng.integers(0, 256, (7, 9)).astype(np.int32)
  m = evaluation.lm_metrics(lambda p, t: p[t], jnp.asarray(table), windows, batch_size=3)
  logp = _np_log_softmax(table[windows[:, :-1]])
  nll = -np.take_along_axis(logp, windows[:, 1:, None], -1).mean()
  np.testing.assert_allclose(m["loss"], nll, rtol=1e-5)
  np.testing.assert_allclose(m["perplexity"], math.exp(nll), rtol=1e-5)
  np.testing.assert_allclose(m["bits_per_byte"], nll / math.log(2), rtol=1e-5)


def test_unigram_loss_by_hand():
  train = np.array([0, 0, 1], np.uint8)  # add-one counts: 3, 2, then 1 for the other 254
  loss = evaluation.unigram_loss(train, np.array([1], np.uint8))
  np.testing.assert_allclose(loss, -math.log(2 / 259))
