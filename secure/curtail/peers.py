"""CuRTAIL's peers, in JAX, each scoring inputs (higher = more suspicious):

* ``Mahalanobis`` (Lee et al., 2018): class-conditional Gaussians with one
  tied covariance on a hidden layer's features; score = the smallest
  Mahalanobis distance to a class mean.
* ``FeatureSqueezing`` (Xu et al., 2018): the largest L1 distance between the
  victim's softmax on the input and on its squeezed versions (bit-depth
  reduction, 2x2 median smoothing).
* ``MagNet`` (Meng & Chen, 2017): an auto-encoder trained on clean images;
  detector score = reconstruction error, reformer = the victim's label on the
  reconstruction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.models import layers


@dataclasses.dataclass(frozen=True)
class Mahalanobis:
  features: Callable[[np.ndarray], np.ndarray]
  class_means: np.ndarray   # (C, F)
  precision: np.ndarray     # (F, F), of the tied (pooled within-class) covariance

  def score(self, x) -> np.ndarray:
    f = np.asarray(self.features(np.asarray(x, np.float32)), np.float64)
    d = f[:, None] - self.class_means[None]
    return np.einsum("ncf,fg,ncg->nc", d, self.precision, d).min(axis=1)


def fit_mahalanobis(features: Callable, x_train, y_train, n_classes: int,
                    ridge: float = 1e-3) -> Mahalanobis:
  f = np.asarray(features(np.asarray(x_train, np.float32)), np.float64)
  y = np.asarray(y_train)
  means = np.stack([f[y == c].mean(0) for c in range(n_classes)])
  centred = f - means[y]
  cov = centred.T @ centred / len(f)
  cov += ridge * np.trace(cov) / len(cov) * np.eye(len(cov)) + 1e-9 * np.eye(len(cov))
  return Mahalanobis(features, means, np.linalg.inv(cov))


def bit_depth(x, bits: int):
  """Squeeze to ``bits`` bits per pixel (2**bits levels over [0, 1])."""
  levels = 2 ** bits - 1
  return jnp.round(jnp.asarray(x) * levels) / levels


def median_2x2(x_NxHxWxC):
  """2x2 median filter with the window's extra row/column on the bottom/right
  (edge-replicated), as in Xu et al.'s implementation; a 4-value median is the
  mean of the middle two."""
  x = jnp.asarray(x_NxHxWxC)
  p = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="edge")
  win = jnp.stack([p[:, :-1, :-1], p[:, 1:, :-1], p[:, :-1, 1:], p[:, 1:, 1:]], axis=-1)
  s = jnp.sort(win, axis=-1)
  return (s[..., 1] + s[..., 2]) / 2


@dataclasses.dataclass(frozen=True)
class FeatureSqueezing:
  logits_fn: Callable
  bits: int = 1             # Xu et al. use 1 bit for MNIST

  def score(self, x) -> np.ndarray:
    x = jnp.asarray(x, jnp.float32)
    p = jax.nn.softmax(self.logits_fn(x), -1)
    d = [jnp.abs(p - jax.nn.softmax(self.logits_fn(sq), -1)).sum(-1)
         for sq in (bit_depth(x, self.bits), median_2x2(x))]
    return np.asarray(jnp.maximum(*d))


@dataclasses.dataclass(frozen=True)
class MagNetConfig:
  channels: int = 3         # Meng & Chen's MNIST auto-encoder: 3x3 convs with 3 filters
  steps: int = 2000
  batch: int = 64
  lr: float = 3e-3
  noise: float = 0.1        # denoising auto-encoder: Gaussian noise on its inputs
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class MagNet:
  params: Any
  logits_fn: Callable

  def reconstruct(self, x) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return _ae(self.params, x)

  def score(self, x) -> np.ndarray:
    """Mean absolute reconstruction error per image (the detector; L1 is
    Meng & Chen's MNIST detector)."""
    return np.asarray(magnet_score(self.params, jnp.asarray(x, jnp.float32)))

  def reform(self, x) -> np.ndarray:
    """The victim's labels on the reconstructions (the reformer)."""
    return np.asarray(self.logits_fn(self.reconstruct(x)).argmax(-1))


def magnet_score(params, x) -> jax.Array:
  """Traceable detector score: mean |AE(x) - x| per image."""
  return jnp.mean(jnp.abs(_ae(params, x) - x).reshape(x.shape[0], -1), -1)


def _ae(p, x_NxHxWxC):
  """MagNet's MNIST auto-encoder (Meng & Chen 2017, Table 1): sigmoid 3x3
  convs, 2x2 average pooling, convs, 2x2 upsampling, convs back to the
  input's channels (odd sides are padded to even and cropped back)."""
  from core.models.cnn import conv2d
  n, h, w, c = x_NxHxWxC.shape
  z = jnp.pad(x_NxHxWxC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  z = jax.nn.sigmoid(conv2d(z, **p["enc0"]))
  z = z.reshape(n, z.shape[1] // 2, 2, z.shape[2] // 2, 2, -1).mean((2, 4))
  z = jax.nn.sigmoid(conv2d(z, **p["enc1"]))
  z = jax.nn.sigmoid(conv2d(z, **p["dec0"]))
  z = jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)
  z = jax.nn.sigmoid(conv2d(z, **p["dec1"]))
  return jax.nn.sigmoid(conv2d(z, **p["out"]))[:, :h, :w]


def fit_magnet(logits_fn: Callable, x_train, cfg: MagNetConfig = MagNetConfig()) -> MagNet:
  x = np.asarray(x_train, np.float32)
  if x.ndim != 4:
    raise ValueError(f"MagNet takes images (N, H, W, C), got {x.shape}")
  k = cfg.channels
  shapes = {"enc0": (x.shape[-1], k), "enc1": (k, k), "dec0": (k, k), "dec1": (k, k),
            "out": (k, x.shape[-1])}
  keys = jax.random.split(jax.random.key(cfg.seed), len(shapes))
  p = {name: {"kernel": layers.normal_init(kk, (3, 3, ci, co), 9 * ci), "bias": jnp.zeros(co)}
       for kk, (name, (ci, co)) in zip(keys, shapes.items())}
  opt = optax.adam(cfg.lr)

  @jax.jit
  def step(p, o, xb, key):
    noisy = jnp.clip(xb + cfg.noise * jax.random.normal(key, xb.shape), 0, 1)
    g = jax.grad(lambda q: jnp.mean((_ae(q, noisy) - xb) ** 2))(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  o = opt.init(p)
  rng = np.random.default_rng(cfg.seed)
  key = jax.random.key(cfg.seed + 1)
  for i in range(cfg.steps):
    xb = jnp.asarray(x[rng.choice(len(x), min(cfg.batch, len(x)), replace=False)])
    p, o = step(p, o, xb, jax.random.fold_in(key, i))
  return MagNet(p, logits_fn)
