"""CuRTAIL's input defender: one patch dictionary per class, learned on clean
training images of that class. An input is denoised by sparse-coding its
patches (OMP) in the dictionary of the class the victim predicts and
reassembling them; it is flagged when the victim's label on the denoised
image differs (an adversarial perturbation is not made of the claimed
class's atoms, so denoising undoes it). The continuous score for ROC sweeps
is minus the victim's log-probability of its original label after denoising.
Shares the sparse-coding module with CLEANN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from secure import sparse
from secure.cleann import analyzers


@dataclasses.dataclass(frozen=True)
class InputDefenderConfig:
  patch: analyzers.PatchConfig = analyzers.PatchConfig(size=8, stride=4)
  dictionary: sparse.DictConfig = sparse.DictConfig(n_atoms=64, n_nonzero=4, iters=8)
  images_per_class: int = 300
  max_patches: int = 10000


@functools.lru_cache(maxsize=None)
def _denoise_fn(patch: analyzers.PatchConfig, n_nonzero: int):
  from secure.curtail import modules
  return jax.jit(functools.partial(modules.denoise, patch=patch, n_nonzero=n_nonzero))


@dataclasses.dataclass(frozen=True)
class InputDefender:
  dictionaries: np.ndarray        # (C, K, size*size), pixel domain, unit-norm atoms
  patch: analyzers.PatchConfig
  n_nonzero: int

  def denoise(self, x, labels) -> np.ndarray:
    """Each image rebuilt from its patches' sparse codes in the dictionary of
    its label (``labels``: e.g. the victim's predictions), clipped to [0, 1]."""
    x = np.asarray(x, np.float32)
    labels = np.asarray(labels)
    if len(labels) != len(x):
      raise ValueError(f"{len(x)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(self.dictionaries)):
      raise ValueError(f"labels must lie in [0, {len(self.dictionaries)})")
    fn = _denoise_fn(self.patch, self.n_nonzero)
    d = jnp.asarray(self.dictionaries, jnp.float32)
    return np.concatenate([np.asarray(fn(d, jnp.asarray(x[i:i + 500]),
                                         jnp.asarray(labels[i:i + 500])))
                           for i in range(0, len(x), 500)]) if len(x) else x.copy()

  def score(self, x, labels, logits_fn: Callable) -> np.ndarray:
    """Minus the victim's log-probability of ``labels`` on the denoised inputs."""
    z = jax.nn.log_softmax(logits_fn(jnp.asarray(self.denoise(x, labels))), axis=-1)
    return -np.asarray(jnp.take_along_axis(z, jnp.asarray(labels)[:, None], 1)[:, 0])

  def flags(self, x, labels, logits_fn: Callable) -> np.ndarray:
    """True where the victim's label changes after denoising."""
    return np.asarray(logits_fn(jnp.asarray(self.denoise(x, labels))).argmax(-1)) != labels


def fit(x_train, y_train, n_classes: int, cfg: InputDefenderConfig = InputDefenderConfig()
        ) -> InputDefender:
  """One dictionary per class from up to ``images_per_class`` clean images."""
  x = np.asarray(x_train, np.float32)
  y = np.asarray(y_train)
  dicts = []
  for c in range(n_classes):
    xc = x[y == c][:cfg.images_per_class]
    if len(xc) == 0:
      raise ValueError(f"class {c} has no training images; it needs a dictionary")
    p = np.asarray(analyzers.patches(xc, cfg.patch)).reshape(-1, cfg.patch.size ** 2)
    if len(p) > cfg.max_patches:
      p = p[np.random.default_rng([cfg.dictionary.seed, c]).choice(len(p), cfg.max_patches,
                                                                   replace=False)]
    dicts.append(sparse.learn_dictionary(p, dataclasses.replace(
        cfg.dictionary, seed=cfg.dictionary.seed + c))[0])
  return InputDefender(np.stack(dicts), cfg.patch, cfg.dictionary.n_nonzero)
