"""Batched evaluation: classifier loss/accuracy and LM loss/perplexity/bits-per-byte.

The last partial batch is padded and masked, so every batch has one shape and
the jitted function compiles once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def _padded_batches(arrays: tuple[np.ndarray, ...], batch_size: int):
  n = len(arrays[0])
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    k = len(chunk[0])
    pad = batch_size - k
    if pad:
      chunk = [np.concatenate([c, np.repeat(c[:1], pad, axis=0)]) for c in chunk]
    yield chunk, np.arange(batch_size) < k


# The jitted per-batch reductions are cached per apply function, so repeated
# evaluations of one model (e.g. many sync plans in a study) compile once.
@functools.lru_cache(maxsize=32)
def _classifier_sums(apply_fn):
  @jax.jit
  def sums(params, xb, yb, mask):
    logits = apply_fn(params, xb).astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yb[:, None], -1)[:, 0]
    correct = jnp.argmax(logits, -1) == yb
    return jnp.sum(nll * mask), jnp.sum(correct * mask)
  return sums


@functools.lru_cache(maxsize=32)
def _lm_sums(apply_fn):
  @jax.jit
  def sums(params, tokens, mask):
    logits = apply_fn(params, tokens[:, :-1]).astype(jnp.float32)
    targets = tokens[:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    correct = jnp.argmax(logits, -1) == targets
    return jnp.sum(nll * mask[:, None]), jnp.sum(correct * mask[:, None])
  return sums


def classifier_metrics(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> dict:
  """{'loss', 'accuracy'} of ``apply_fn(params, x) -> logits`` over the whole set."""
  sums = _classifier_sums(apply_fn)
  tot_nll = tot_correct = 0.0
  for (xb, yb), mask in _padded_batches((x, y), min(batch_size, len(x))):
    nll, correct = sums(params, xb, yb, mask)
    tot_nll += float(nll)
    tot_correct += float(correct)
  return {"loss": tot_nll / len(x), "accuracy": tot_correct / len(x)}


def lm_metrics(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
               windows: np.ndarray, batch_size: int = 16) -> dict:
  """Next-byte {'loss', 'perplexity', 'bits_per_byte', 'accuracy'} over
  ``windows`` of shape (n, L+1) (from ``data.text_eval_windows``)."""

  sums = _lm_sums(apply_fn)
  tot_nll = tot_correct = 0.0
  for (tb,), mask in _padded_batches((windows,), min(batch_size, len(windows))):
    nll, correct = sums(params, tb, mask)
    tot_nll += float(nll)
    tot_correct += float(correct)
  n_tok = windows.shape[0] * (windows.shape[1] - 1)
  loss = tot_nll / n_tok
  return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2),
          "accuracy": tot_correct / n_tok}


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray) -> float:
  """Cross-entropy (nats) of an add-one unigram byte model fitted on the train
  text: the floor a trained LM must beat to have learned anything."""
  counts = np.bincount(train_tokens, minlength=256).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(-logp[eval_tokens].mean())
