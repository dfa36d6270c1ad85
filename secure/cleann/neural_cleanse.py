"""Neural Cleanse (Wang et al., IEEE S&P 2019), CLEANN's peer: for every class,
reverse-engineer the smallest mask-and-pattern trigger that sends benign
images to it; a backdoor's target needs a far smaller mask than the others
(anomaly index by the median absolute deviation of the masks' L1 norms, > 2 is
infected). Its input-filter mitigation then flags inputs that strongly
activate the hidden neurons the reversed trigger excites most.

Here every class's trigger is optimised at once (``vmap`` over classes) with
a fixed L1 weight (the paper tunes it per class while searching; our
simplification, reported beside the reversed triggers' success rates).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.models import layers
from secure import detection


@dataclasses.dataclass(frozen=True)
class NCConfig:
  steps: int = 300
  batch: int = 32
  lr: float = 0.1
  l1_weight: float = 1e-2     # weight of the mask's L1 norm, per pixel-sum
  anomaly_threshold: float = 2.0
  neuron_fraction: float = 0.02  # hidden neurons the input filter reads (at least one)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class NeuralCleanse:
  mask_norms: np.ndarray          # (classes,) L1 norm of each reversed mask
  masks: np.ndarray               # (classes, H, W, 1)
  patterns: np.ndarray            # (classes, H, W, C)
  reversed_asr: np.ndarray        # (classes,) success of each reversed trigger on x_fit
  anomaly_index: float            # of the smallest-norm class
  suspect: int                    # the smallest-norm class
  infected: bool                  # anomaly_index > threshold
  neurons: np.ndarray             # feature indices the filter reads
  features: Callable
  thresholds: dict[float, float]

  def scores(self, x) -> np.ndarray:
    """Input filter: mean activation of the reversed trigger's top neurons."""
    f = np.asarray(self.features(np.asarray(x, np.float32)))
    return f[:, self.neurons].mean(axis=1)


def stamp(x, mask, pattern):
  return (1 - mask) * x + mask * pattern


@functools.partial(jax.jit, static_argnames=("logits", "cfg", "n_classes"))
def _reverse(logits, x_fit, cfg: NCConfig, n_classes: int, key):
  h, w, c = x_fit.shape[1:]
  opt = optax.adam(cfg.lr)
  init = {"m": jnp.full((n_classes, h, w, 1), -2.0), "p": jnp.zeros((n_classes, h, w, c))}

  def loss(v, xb, cls):
    m, p = jax.nn.sigmoid(v["m"]), jax.nn.sigmoid(v["p"])
    out = logits(stamp(xb, m, p))
    return layers.cross_entropy(out, jnp.full((xb.shape[0],), cls)) + cfg.l1_weight * m.sum()

  grad = jax.vmap(jax.grad(loss), in_axes=(0, None, 0))

  def step(carry, k):
    v, s = carry
    xb = x_fit[jax.random.choice(k, x_fit.shape[0], (cfg.batch,))]
    g = grad(v, xb, jnp.arange(n_classes))
    upd, s = opt.update(g, s, v)
    return (optax.apply_updates(v, upd), s), None

  (v, _), _ = jax.lax.scan(step, (init, opt.init(init)), jax.random.split(key, cfg.steps))
  return jax.nn.sigmoid(v["m"]), jax.nn.sigmoid(v["p"])


def anomaly_index(norms) -> tuple[float, int]:
  """(MAD anomaly index of the smallest norm, its class): the consistency
  constant 1.4826 makes the MAD estimate a normal distribution's sigma."""
  norms = np.asarray(norms, np.float64)
  med = np.median(norms)
  mad = 1.4826 * np.median(np.abs(norms - med))
  j = int(np.argmin(norms))
  return float((med - norms[j]) / max(mad, 1e-12)), j


def fit(logits: Callable, features: Callable, x_fit: np.ndarray, x_val: np.ndarray,
        n_classes: int, cfg: NCConfig = NCConfig(), fprs=(0.01, 0.05)) -> NeuralCleanse:
  """Reverse-engineers every class's trigger on the defender's fitting images,
  picks the suspect class and sets the filter's thresholds on its validation
  images. ``logits`` must be hashable (a jitted function is)."""
  x_fit = np.asarray(x_fit, np.float32)
  if len(x_fit) < 1:
    raise ValueError("Neural Cleanse needs benign images to reverse-engineer triggers")
  masks, pats = _reverse(logits, jnp.asarray(x_fit), cfg, n_classes, jax.random.key(cfg.seed))
  masks, pats = np.asarray(masks), np.asarray(pats)
  norms = masks.reshape(n_classes, -1).sum(axis=1)
  asr = np.array([np.mean(np.asarray(logits(stamp(x_fit, masks[c], pats[c]))).argmax(-1) == c)
                  for c in range(n_classes)])
  ai, j = anomaly_index(norms)
  f_clean = np.asarray(features(x_fit))
  f_trig = np.asarray(features(stamp(x_fit, masks[j], pats[j])))
  k = max(1, int(round(cfg.neuron_fraction * f_clean.shape[1])))
  neurons = np.argsort(-(f_trig.mean(0) - f_clean.mean(0)))[:k]
  raw = NeuralCleanse(norms, masks, pats, asr, ai, j, ai > cfg.anomaly_threshold, neurons,
                      features, {})
  s = raw.scores(x_val)
  return dataclasses.replace(raw, thresholds={f: detection.threshold_for_fpr(s, f) for f in fprs})
