"""A global input analyzer: the benign envelope of every pixel.

The patch analyzer scores an image by its worst patch, so it sees a trigger
that occupies a few patches and misses one spread thinly over the whole
image (a blended pattern, a sinusoid): every patch stays within what benign
images leave there, and dimmed strokes are even explained *better*. This
analyzer adds the evidence up over the image instead: each pixel's benign
range [lo, hi] is its ``quantile`` / ``1 - quantile`` over the defender's
calibration images, and the score is the share of pixels outside it by more
than ``margin`` on either side (two-sided: a value below everything benign
counts as much as one above, so a trigger that dims or smooths the image is
not rewarded). A thin image-wide pattern moves hundreds of pixels a little
out of their range; a benign outlier moves a few pixels a lot, and a count
does not let those few dominate (a sum of excesses did: on Fashion-MNIST it
ranked blend at AUC 0.99 but caught 1% at 1% FPR; the count 100%).

Recovery on this path clips every pixel into its benign range: what the
trigger added where benign images are uniform (the background of a digit)
goes, the content stays.

Chosen on the seed-0 development victims (docs/RESULTS.md, issue 24) against
whole-image DCT band energies (two-sided z over 8-27 radial bands), per-
coefficient DCT z-scores, a PCA residual and per-pixel / per-patch rank
statistics.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class EnvelopeConfig:
  quantile: float = 0.0   # benign range per pixel: [q, 1 - q] quantiles (0: min / max)
  margin: float = 1e-3    # how far outside the range a pixel must lie to count
  clip_quantile: float = 0.01  # recovery clips into the [q, 1 - q] range (tighter)

  def __post_init__(self):
    if not (0 <= self.quantile < 0.5 and 0 <= self.clip_quantile < 0.5 and self.margin >= 0):
      raise ValueError(f"need 0 <= quantiles < 0.5 and margin >= 0, got {self}")


@dataclasses.dataclass(frozen=True)
class EnvelopeAnalyzer:
  lo: np.ndarray        # (H, W, C) benign lower bound per pixel
  hi: np.ndarray
  clip_lo: np.ndarray   # recovery's range
  clip_hi: np.ndarray
  margin: float

  def _check(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.shape[1:] != self.lo.shape:
      raise ValueError(f"the envelope was fitted on images {self.lo.shape}, got {x.shape}")
    return x

  def score(self, x) -> np.ndarray:
    """Per image: the share of pixels outside their benign range."""
    x = self._check(x)
    out = (x > self.hi + self.margin) | (x < self.lo - self.margin)
    return out.reshape(len(x), -1).mean(axis=1)

  def reconstruct(self, x) -> np.ndarray:
    """Every pixel clipped into its benign range."""
    return np.clip(self._check(x), self.clip_lo, self.clip_hi)


def fit(x_benign, cfg: EnvelopeConfig = EnvelopeConfig()) -> EnvelopeAnalyzer:
  x = np.asarray(x_benign, np.float32)
  if x.ndim != 4 or len(x) < 2:
    raise ValueError(f"the envelope needs >= 2 benign images (N, H, W, C), got {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("benign calibration images contain NaN or inf")
  q = lambda a: np.quantile(x, a, axis=0).astype(np.float32)
  return EnvelopeAnalyzer(q(cfg.quantile), q(1 - cfg.quantile), q(cfg.clip_quantile),
                          q(1 - cfg.clip_quantile), cfg.margin)
