"""CuRTAIL's label-free input module: how far an image lies from benign images
whatever the victim says about it.

One patch dictionary for all classes, learned on clean training images; an
image is rebuilt from its patches' OMP codes (overlaps averaged, clipped to
[0, 1]) and given two scores from the residual x - rebuilt:

* ``residual``: the mean absolute residual per pixel, each pixel's divided by
  what clean images leave there (their mean, plus a floor). A pixel clean
  images never use (MNIST's border, Fashion-MNIST's background) makes any
  change there stand out, which is where dense L-inf and L2 perturbations put
  most of their mass.
* ``energy``: the mean squared residual, unscaled: the energy a dictionary of
  clean strokes cannot explain, which is what a high-confidence perturbation
  (CW at kappa 10-20) adds along the strokes, where the scaled score is blind.

The class-conditional modules miss both kinds because they judge the image
in the claimed class's terms (an attack that overshoots deep into that class
looks *more* typical of it). Chosen on the seed-0 mnist5k MLP's clean and
attacked images: 4x4 patches at stride 2, 32 atoms, 3 per patch (8x8, 14x14
and whole-image dictionaries did worse on every attack tried there).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from secure import sparse
from secure.cleann import analyzers


@dataclasses.dataclass(frozen=True)
class ResidualConfig:
  patch: analyzers.PatchConfig = analyzers.PatchConfig(size=4, stride=2)
  dictionary: sparse.DictConfig = sparse.DictConfig(n_atoms=32, n_nonzero=3, iters=8)
  images: int = 2000          # clean training images the dictionary and scales see
  max_patches: int = 20000
  floor: float = 1e-3         # added to each pixel's benign mean residual

  def __post_init__(self):
    if self.images < 1 or self.floor <= 0:
      raise ValueError(f"need images >= 1 and floor > 0, got {self}")


def rebuild(d_KxS, x_NxHxWx1, patch: analyzers.PatchConfig, n_nonzero: int):
  """Images rebuilt from their patches' OMP codes in one dictionary, clipped
  to [0, 1] (traceable)."""
  p = analyzers.patches(x_NxHxWx1, patch)                               # (N, P, S)
  n, n_p, s = p.shape
  codes = sparse.omp_traced(p.reshape(n * n_p, s), d_KxS, n_nonzero)
  rec = (codes @ d_KxS).reshape(n, n_p, s)
  return jnp.clip(analyzers.assemble(rec, x_NxHxWx1.shape[1:3], patch), 0.0, 1.0)


_rebuild = jax.jit(rebuild, static_argnums=(2, 3))


NAMES = ("residual", "energy")


def scores(arr: dict, x, patch: analyzers.PatchConfig, n_nonzero: int, bpda: bool = False):
  """(N, 2): mean over pixels of |x - rebuilt x| / the benign scale there, and
  of (x - rebuilt x)^2. ``bpda``: the rebuilt image's gradient is dropped
  (OMP's reconstruction treated as a constant), so only x - rebuilt moves."""
  rec = rebuild(arr["dict"], x, patch, n_nonzero)
  if bpda:
    rec = jax.lax.stop_gradient(rec)
  r = (x - rec).reshape(x.shape[0], -1)
  return jnp.stack([jnp.mean(jnp.abs(r) / arr["scale"].reshape(-1), axis=-1),
                    jnp.mean(r ** 2, axis=-1)], axis=1)


def fit(x_train, cfg: ResidualConfig = ResidualConfig(), seed: int = 0) -> dict:
  """The dictionary and per-pixel scales from clean (unlabelled) training
  images: {'dict': (K, S), 'scale': (H, W, 1)}."""
  x = np.asarray(x_train, np.float32)
  if len(x) == 0 or not np.isfinite(x).all():
    raise ValueError("the residual module needs finite clean training images")
  x = x[np.random.default_rng([seed, 7]).permutation(len(x))[:cfg.images]]
  p = np.asarray(analyzers.patches(x, cfg.patch)).reshape(-1, cfg.patch.size ** 2)
  if len(p) > cfg.max_patches:
    p = p[np.random.default_rng([seed, 8]).choice(len(p), cfg.max_patches, replace=False)]
  d = sparse.learn_dictionary(p, dataclasses.replace(cfg.dictionary,
                                                     seed=cfg.dictionary.seed + seed))[0]
  dj = jnp.asarray(d, jnp.float32)
  r = np.concatenate([np.abs(x[i:i + 500] - np.asarray(_rebuild(
      dj, jnp.asarray(x[i:i + 500]), cfg.patch, cfg.dictionary.n_nonzero)))
      for i in range(0, len(x), 500)])
  return {"dict": d.astype(np.float32), "scale": (r.mean(0) + cfg.floor).astype(np.float32)}
