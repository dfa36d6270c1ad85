"""STRIP (Gao et al., ACSAC 2019), a run-time Trojan input detector and CLEANN's
peer: a triggered input keeps its (target) prediction when superimposed with
benign images, so the victim's mean prediction entropy over the overlays is
low. Score = minus that entropy (flag high scores). Detection only: a flagged
input is rejected, not relabelled."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from secure import detection


@dataclasses.dataclass(frozen=True)
class StripConfig:
  n_overlays: int = 16    # benign images superimposed on each input
  alpha: float = 0.5      # weight of the input in each blend
  seed: int = 0
  batch: int = 256

  def __post_init__(self):
    if self.n_overlays < 1 or not 0 < self.alpha < 1:
      raise ValueError(f"need n_overlays >= 1 and 0 < alpha < 1, got {self}")


@dataclasses.dataclass(frozen=True)
class Strip:
  logits: Callable[[jax.Array], jax.Array]
  overlays: np.ndarray           # (M, H, W, C) benign images
  cfg: StripConfig
  thresholds: dict[float, float]

  def scores(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1:] != self.overlays.shape[1:]:
      raise ValueError(f"STRIP takes images (N, {self.overlays.shape[1:]}), got {x.shape}")
    out = [np.asarray(_mean_entropy(self.logits, jnp.asarray(x[i:i + self.cfg.batch]),
                                    jnp.asarray(self.overlays), self.cfg.alpha))
           for i in range(0, len(x), self.cfg.batch)]
    return -np.concatenate(out)


def _mean_entropy(logits_fn, x_BxHxWxC, o_MxHxWxC, alpha: float) -> jax.Array:
  blend = alpha * x_BxHxWxC[:, None] + (1 - alpha) * o_MxHxWxC[None]
  logp = jax.nn.log_softmax(logits_fn(blend.reshape(-1, *x_BxHxWxC.shape[1:])), axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return ent.reshape(x_BxHxWxC.shape[0], -1).mean(axis=1)


def fit(logits: Callable, x_fit: np.ndarray, x_val: np.ndarray, cfg: StripConfig = StripConfig(),
        fprs=(0.01, 0.05)) -> Strip:
  """Overlays drawn from the defender's fitting images; thresholds from its
  validation images (the same split CLEANN uses)."""
  x_fit = np.asarray(x_fit, np.float32)
  if len(x_fit) < 1:
    raise ValueError("STRIP needs at least one benign overlay image")
  pick = np.random.default_rng(cfg.seed).choice(len(x_fit), min(cfg.n_overlays, len(x_fit)),
                                                replace=False)
  raw = Strip(logits, x_fit[pick], cfg, {})
  s = raw.scores(x_val)
  return dataclasses.replace(raw, thresholds={f: detection.threshold_for_fpr(s, f) for f in fprs})
