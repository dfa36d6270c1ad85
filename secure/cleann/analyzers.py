"""CLEANN's analyzers (Javaheripi, Samragh et al., ICCAD 2020): dictionaries
learned on a few benign, unlabelled inputs characterise benign data; an input
whose sparse reconstruction is anomalous is flagged as Trojan-triggered, and
the victim's label on the sparse reconstruction recovers the true class.

Input analyzer: the image is cut into overlapping patches, each taken to the
DCT (frequency) domain and sparse-coded (OMP) in one dictionary; the image's
score is its worst patch's squared residual, since a trigger occupies a few
patches. Its reconstruction (inverse DCT, overlapping patches averaged) is the
input to label recovery. A patch's residual is compared with what benign
images leave at the same position (their 99th percentile there, fitted on the
calibration images): a corner that is always empty in benign digits makes even
a faint trigger stand out, where a raw maximum over patches would be dominated
by the busiest benign strokes (our choice; measured on MNIST, see the tests). Latent analyzer: one dictionary on a hidden layer's
features, scored by the squared residual. Thresholds come from a benign
validation split at a target false-positive rate (our choice; the paper's
rule is not available offline).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from secure import sparse


@dataclasses.dataclass(frozen=True)
class PatchConfig:
  size: int = 8     # patch side, pixels
  stride: int = 4   # step between patches (overlap = size - stride)

  def __post_init__(self):
    if not 1 <= self.stride <= self.size:
      raise ValueError(f"need 1 <= stride <= size, got {self}")


def _starts(n: int, size: int, stride: int) -> list[int]:
  """Patch origins covering [0, n) (the last patch flush with the edge)."""
  if size > n:
    raise ValueError(f"patch size {size} exceeds the image side {n}")
  s = list(range(0, n - size + 1, stride))
  return s if s[-1] == n - size else s + [n - size]


@functools.lru_cache(maxsize=None)
def _patch_index(h: int, w: int, cfg: PatchConfig) -> tuple[np.ndarray, np.ndarray]:
  """(P, size*size) flat pixel index of every patch (row-major origins), and
  how many patches cover each pixel (H*W,)."""
  rows, cols = _starts(h, cfg.size, cfg.stride), _starts(w, cfg.size, cfg.stride)
  off = (np.arange(cfg.size)[:, None] * w + np.arange(cfg.size)[None]).ravel()
  idx = np.stack([r * w + c + off for r in rows for c in cols]).astype(np.int32)
  return idx, np.bincount(idx.ravel(), minlength=h * w).astype(np.float32)


def patches(x_NxHxWx1, cfg: PatchConfig) -> jax.Array:
  """(N, P, size*size) patches of single-channel images, row-major origins
  (one gather, so it compiles in no time for any batch)."""
  x = jnp.asarray(x_NxHxWx1, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"the input analyzer takes single-channel images (N, H, W, 1), got "
                     f"shape {x.shape}")
  idx, _ = _patch_index(x.shape[1], x.shape[2], cfg)
  return x.reshape(x.shape[0], -1)[:, idx]


def assemble(p_NxPxS, image_hw: tuple[int, int], cfg: PatchConfig) -> jax.Array:
  """Images (N, H, W, 1) from patches, overlapping pixels averaged (inverse of
  ``patches`` on consistent patches): one scatter-add."""
  h, w = image_hw
  idx, cnt = _patch_index(h, w, cfg)
  n = p_NxPxS.shape[0]
  out = jnp.zeros((n, h * w), jnp.float32).at[:, idx.ravel()].add(p_NxPxS.reshape(n, -1))
  return (out / cnt).reshape(n, h, w, 1)


@functools.lru_cache(maxsize=None)
def dct_matrix(size: int) -> np.ndarray:
  """The orthonormal DCT-II matrix C (size x size): DCT(x) = C x."""
  k, n = np.arange(size)[:, None], np.arange(size)[None]
  c = np.sqrt(2.0 / size) * np.cos(np.pi * (2 * n + 1) * k / (2 * size))
  c[0] /= np.sqrt(2.0)
  return c.astype(np.float32)


def to_dct(p_NxPxS, size: int) -> jax.Array:
  """2-D orthonormal DCT-II of each flattened size x size patch (C X C^T)."""
  c = jnp.asarray(dct_matrix(size))
  sq = jnp.asarray(p_NxPxS).reshape(*p_NxPxS.shape[:-1], size, size)
  return (c @ sq @ c.T).reshape(p_NxPxS.shape)


def from_dct(c_NxPxS, size: int) -> jax.Array:
  """Inverse of ``to_dct`` (C^T X C, C orthonormal)."""
  c = jnp.asarray(dct_matrix(size))
  sq = jnp.asarray(c_NxPxS).reshape(*c_NxPxS.shape[:-1], size, size)
  return (c.T @ sq @ c).reshape(c_NxPxS.shape)


def _bucket(n: int) -> int:
  """Batch sizes are padded to a few buckets (powers of two up to 1024, then
  multiples of 1024) so calls with varying N reuse compiled code."""
  return max(64, 1 << max(n - 1, 0).bit_length()) if n <= 1024 else -(-n // 1024) * 1024


def _padded(fn, x, *args):
  n = x.shape[0]
  out = fn(jnp.pad(jnp.asarray(x, jnp.float32), [(0, _bucket(n) - n)] + [(0, 0)] * (x.ndim - 1)),
           *args)
  return out[:n]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dct_patches(x, cfg: PatchConfig):
  return to_dct(patches(x, cfg), cfg.size)


@functools.partial(jax.jit, static_argnames=("image_hw", "cfg"))
def _images(c, image_hw, cfg: PatchConfig):
  return assemble(from_dct(c, cfg.size), image_hw, cfg)


def dct_patches(x_NxHxWx1, cfg: PatchConfig) -> jax.Array:
  """(N, P, size*size) DCT-domain patches (jitted, batch padded to a bucket)."""
  x = jnp.asarray(x_NxHxWx1, jnp.float32)
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"the input analyzer takes single-channel images (N, H, W, 1), got "
                     f"shape {x.shape}")
  return _padded(_dct_patches, x, cfg)


def images_from_dct(c_NxPxS, image_hw: tuple[int, int], cfg: PatchConfig) -> jax.Array:
  """Images (N, H, W, 1) from DCT-domain patches, overlaps averaged."""
  return _padded(_images, c_NxPxS, tuple(image_hw), cfg)


@dataclasses.dataclass(frozen=True)
class InputAnalyzer:
  dictionary: np.ndarray   # (K, size*size), DCT domain, unit-norm atoms
  patch: PatchConfig
  n_nonzero: int
  position_scale: np.ndarray | None = None  # (P,) benign residual scale per patch position

  mean_patches: np.ndarray | None = None    # (P, size*size) benign mean, pixel domain

  def _codes(self, x, tol: float | None = None):
    p = dct_patches(x, self.patch)
    n, np_, s = p.shape
    codes = sparse.omp(p.reshape(n * np_, s), self.dictionary, self.n_nonzero, tol=tol)
    return p, codes.reshape(n, np_, -1)

  def residuals(self, x) -> np.ndarray:
    """(N, P) squared residual of each DCT patch's sparse reconstruction."""
    p, codes = self._codes(x)
    return np.asarray(jnp.sum((p - codes @ jnp.asarray(self.dictionary)) ** 2, axis=-1))

  def _relative(self, r: np.ndarray) -> np.ndarray:
    if self.position_scale is None:
      return r
    if r.shape[1] != len(self.position_scale):
      raise ValueError(f"images give {r.shape[1]} patches; the analyzer was fitted on "
                       f"images with {len(self.position_scale)}")
    return r / self.position_scale

  def score(self, x) -> np.ndarray:
    """Per image: the largest patch residual relative to the benign scale at
    that position (raw residual without ``position_scale``)."""
    return self._relative(self.residuals(x)).max(axis=1)

  def reconstruct(self, x, tol: float | None = None, excise: bool = True) -> np.ndarray:
    """Images rebuilt from their sparse codes, clipped to [0, 1]. ``tol``: stop
    each patch's pursuit once its squared residual is at most ``tol`` (drops
    low-energy content a benign dictionary needs no atom for, e.g. a faint
    blended pattern). ``excise``: a patch the dictionary cannot explain
    (residual above its position's benign scale) is replaced by the benign
    mean patch there instead of its partial reconstruction, which still
    carries part of a stamped trigger."""
    x = np.asarray(x, np.float32)
    p, codes = self._codes(x)
    d = jnp.asarray(self.dictionary)
    rec = codes @ d if tol is None else self._codes(x, tol)[1] @ d
    if excise and self.mean_patches is not None:
      r = self._relative(np.asarray(jnp.sum((p - codes @ d) ** 2, axis=-1)))
      mean = to_dct(jnp.asarray(self.mean_patches)[None], self.patch.size)
      rec = jnp.where((r > 1.0)[..., None], mean, rec)
    return np.clip(np.asarray(images_from_dct(rec, x.shape[1:3], self.patch)), 0.0, 1.0)


def fit_input_analyzer(x_benign, patch: PatchConfig, dict_cfg: sparse.DictConfig,
                       max_patches: int = 20000, scale_quantile: float = 0.99,
                       scale_floor: float = 1e-3) -> InputAnalyzer:
  """Learns the DCT patch dictionary on benign, unlabelled images, the benign
  residual scale per patch position (``scale_quantile`` of the calibration
  images' residuals there, at least ``scale_floor``) and the benign mean patch
  at each position (what excised patches are filled with)."""
  x_benign = np.asarray(x_benign, np.float32)
  if len(x_benign) == 0:
    raise ValueError("the input analyzer needs at least one benign calibration image")
  if not np.isfinite(x_benign).all():
    raise ValueError("benign calibration images contain NaN or inf")
  p = np.asarray(dct_patches(x_benign, patch)).reshape(-1, patch.size ** 2)
  if len(p) > max_patches:
    p = p[np.random.default_rng(dict_cfg.seed).choice(len(p), max_patches, replace=False)]
  d, _ = sparse.learn_dictionary(p, dict_cfg)
  raw = InputAnalyzer(d, patch, dict_cfg.n_nonzero)
  scale = np.maximum(np.quantile(raw.residuals(x_benign), scale_quantile, axis=0), scale_floor)
  mean = np.asarray(patches(x_benign.mean(0, keepdims=True), patch))[0]
  return dataclasses.replace(raw, position_scale=scale.astype(np.float32), mean_patches=mean)


@dataclasses.dataclass(frozen=True)
class LatentAnalyzer:
  dictionary: np.ndarray   # (K, features)
  n_nonzero: int

  def score(self, feats_NxF) -> np.ndarray:
    """Per input: the squared residual of its sparse reconstruction."""
    f = jnp.asarray(feats_NxF, jnp.float32)
    codes = sparse.omp(f, self.dictionary, self.n_nonzero)
    return np.asarray(sparse.reconstruction_error(f, jnp.asarray(self.dictionary), codes,
                                                  relative=False))


def fit_latent_analyzer(feats_benign, dict_cfg: sparse.DictConfig) -> LatentAnalyzer:
  feats = np.asarray(feats_benign, np.float32)
  if feats.ndim != 2 or len(feats) == 0:
    raise ValueError(f"the latent analyzer needs benign features (N, F), got shape {feats.shape}")
  d, _ = sparse.learn_dictionary(feats, dict_cfg)
  return LatentAnalyzer(d, dict_cfg.n_nonzero)
