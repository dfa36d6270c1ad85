"""Backdoor triggers and training-time poisoning (the threat CLEANN defends against).

Three triggers on (N, H, W, C) images in [0, 1], each a pure function of the
images and a frozen config:

* ``Patch`` (BadNets): a small fixed black-and-white pattern stamped in a corner.
* ``Blend``: a fixed random pattern mixed in at low opacity over the whole image.
* ``Warp`` (WaNet-style): a smooth, fixed random displacement field resamples the
  image; nothing is added and no location is marked, so the trigger is hard to see.
* ``Sinusoid`` (SIG, Barni, Kallas & Tondi, ICIP 2019): a horizontal sinusoidal
  signal added over the whole image: smooth, image-wide, no fixed location.
* ``RandomPatch``: the ``Patch`` pattern stamped at a position drawn per image
  (from a hash of the image, so the trigger stays a pure function of each image):
  a location-free patch.

``poison`` applies a trigger to a seeded fraction of the training images whose
label is not the target and relabels them to the target class (all-to-one).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from core import data


@dataclasses.dataclass(frozen=True)
class Patch:
  size: int = 4           # side of the square pattern, pixels
  corner: str = "br"      # 'br', 'bl', 'tr', 'tl'
  seed: int = 0

  def pattern(self) -> np.ndarray:
    """A fixed (size, size) pattern of 0s and 1s with both values present."""
    rng = np.random.default_rng([self.seed, 11])
    p = rng.integers(0, 2, (self.size, self.size)).astype(np.float32)
    p[0, 0], p[-1, -1] = 1.0, 0.0
    return p

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_images(x)
    h, w = x.shape[1:3]
    if not 1 <= self.size <= min(h, w):
      raise ValueError(f"patch size {self.size} does not fit {h}x{w} images")
    rows = slice(h - self.size, h) if self.corner[0] == "b" else slice(0, self.size)
    cols = slice(w - self.size, w) if self.corner[1] == "r" else slice(0, self.size)
    out = x.copy()
    out[:, rows, cols, :] = self.pattern()[None, :, :, None]
    return out


@dataclasses.dataclass(frozen=True)
class Blend:
  alpha: float = 0.1      # opacity of the pattern
  seed: int = 0

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_images(x)
    if not 0 <= self.alpha <= 1:
      raise ValueError(f"blend alpha must lie in [0, 1], got {self.alpha}")
    pattern = np.random.default_rng([self.seed, 12]).random(x.shape[1:], np.float32)
    return ((1 - self.alpha) * x + self.alpha * pattern).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Warp:
  strength: float = 1.0   # largest displacement, pixels
  grid: int = 4           # control points per side of the smooth field
  seed: int = 0

  def field(self, h: int, w: int) -> np.ndarray:
    """(2, h, w) displacement in pixels: a random (grid x grid) field, upsampled
    bicubically and scaled so its largest component is ``strength``."""
    rng = np.random.default_rng([self.seed, 13])
    coarse = rng.uniform(-1, 1, (2, self.grid, self.grid)).astype(np.float32)
    fine = np.asarray(jax.image.resize(jnp.asarray(coarse), (2, h, w), "bicubic"))
    return self.strength * fine / max(float(np.abs(fine).max()), 1e-12)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_images(x)
    if self.strength < 0 or self.grid < 2:
      raise ValueError(f"warp needs strength >= 0 and grid >= 2, got {self}")
    _, h, w, c = x.shape
    dy, dx = self.field(h, w)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                         indexing="ij")
    coords = [np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)]
    sample = jax.vmap(lambda img: jax.scipy.ndimage.map_coordinates(img, coords, order=1))
    out = jnp.stack([sample(jnp.asarray(x[..., ch])) for ch in range(c)], axis=-1)
    return np.clip(np.asarray(out), 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Sinusoid:
  amplitude: float = 0.08   # SIG's Delta: 20/255 in the paper
  frequency: float = 6.0    # periods across the image width (the paper's f = 6)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_images(x)
    if not 0 <= self.amplitude <= 1 or self.frequency <= 0:
      raise ValueError(f"SIG needs 0 <= amplitude <= 1 and frequency > 0, got {self}")
    w = x.shape[2]
    wave = self.amplitude * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
    return np.clip(x + wave[None, None, :, None].astype(np.float32), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RandomPatch:
  size: int = 4
  seed: int = 0

  def positions(self, x: np.ndarray) -> np.ndarray:
    """(N, 2) top-left corner of the pattern in each image."""
    h, w = x.shape[1:3]
    return np.array([np.random.default_rng([self.seed, 15, zlib.crc32(img.tobytes())])
                     .integers(0, [h - self.size + 1, w - self.size + 1]) for img in x],
                    np.int64).reshape(-1, 2)

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_images(x)
    if not 1 <= self.size <= min(x.shape[1:3]):
      raise ValueError(f"patch size {self.size} does not fit {x.shape[1]}x{x.shape[2]} images")
    pattern = Patch(self.size, seed=self.seed).pattern()[:, :, None]
    out = x.copy()
    for img, (r, c) in zip(out, self.positions(x)):
      img[r:r + self.size, c:c + self.size] = pattern
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Additive:
  """A fixed additive pattern (H, W, C), e.g. one optimised by an adaptive
  attacker; the result is clipped to [0, 1]."""
  delta: np.ndarray

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = _check_images(x)
    if x.shape[1:] != np.shape(self.delta):
      raise ValueError(f"pattern of shape {np.shape(self.delta)} for images {x.shape[1:]}")
    return np.clip(x + np.asarray(self.delta, np.float32), 0.0, 1.0)


# Any callable images -> images is a trigger; these are the named ones.
Trigger = Callable[[np.ndarray], np.ndarray]


def _check_images(x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 4:
    raise ValueError(f"triggers take images (N, H, W, C), got shape {x.shape}")
  if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
    raise ValueError("images must be finite and lie in [0, 1]")
  return x


def poison(ds: data.Dataset, trigger: Trigger, target: int, rate: float, seed: int = 0
           ) -> tuple[data.Dataset, np.ndarray]:
  """``ds`` with ``rate`` of its training images (drawn from those not already
  labelled ``target``) triggered and relabelled ``target``. Returns the
  poisoned dataset (test split untouched) and the poisoned indices, sorted."""
  if ds.is_text:
    raise ValueError(f"{ds.name} is a text dataset; poisoning needs labelled images")
  if not 0 <= target < ds.num_classes:
    raise ValueError(f"target class {target} outside [0, {ds.num_classes})")
  if not 0 <= rate < 1:
    raise ValueError(f"poison rate must lie in [0, 1), got {rate}")
  candidates = np.flatnonzero(ds.y_train != target)
  n = int(round(rate * len(ds.x_train)))
  if n > len(candidates):
    raise ValueError(f"rate {rate} needs {n} non-target images; only {len(candidates)} exist")
  idx = np.sort(np.random.default_rng([seed, 14]).choice(candidates, n, replace=False))
  x, y = ds.x_train.copy(), ds.y_train.copy()
  if n:
    x[idx] = trigger(x[idx])
    y[idx] = target
  return dataclasses.replace(ds, x_train=x, y_train=y), idx
