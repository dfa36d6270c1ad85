"""CuRTAIL's victims: the paper's MNIST MLP (784-300-100-10) and the shared CNN,
trained on clean data with a validation split carved out.

Splits: the victim and every defender train on ``train`` (clean, labelled: no
adversarial example anywhere); thresholds and the security sweep use the
``val`` images (held out of all training); every reported number uses the
held-out test split.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np

from core import data
from core.models import CLASSIFIERS
from core.recipes import train_classifier
from core.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class VictimConfig:
  dataset: str = "mnist5k"
  model: str = "mlp"
  steps: int = 2000
  batch_size: int = 64
  lr: float = 2e-3
  val_images: int = 500        # carved from the training split for thresholds
  seed: int = 0

  def __post_init__(self):
    if self.model not in CLASSIFIERS:
      raise ValueError(f"unknown model {self.model!r}; have {sorted(CLASSIFIERS)}")
    if self.steps < 1 or self.val_images < 10:
      raise ValueError(f"need steps >= 1 and val_images >= 10, got {self}")

  @property
  def tag(self) -> str:
    return f"{self.dataset}_{self.model}_s{self.seed}"


@dataclasses.dataclass
class Victim:
  cfg: VictimConfig
  params: Any
  model_config: Any
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def logits_fn(self) -> Callable:
    """Jitted images -> logits, hashable (the attacks take it as a static argument)."""
    return _bound(self.cfg.model, self.model_config, _Frozen(self.params))

  def predict(self, x, batch: int = 1000) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.concatenate([np.asarray(self.logits_fn(x[i:i + batch]).argmax(-1))
                           for i in range(0, len(x), batch)]) if len(x) else np.zeros(0, int)


class _Frozen:
  """Parameters hashed by identity, so a victim's bound logits function is one
  cached jitted callable (a static argument the attacks compile against once)."""

  def __init__(self, tree):
    self.tree = tree

  def __hash__(self):
    return id(self.tree)

  def __eq__(self, other):
    return isinstance(other, _Frozen) and other.tree is self.tree


@functools.lru_cache(maxsize=32)
def _bound(model: str, mcfg, frozen: _Frozen) -> Callable:
  apply = CLASSIFIERS[model].apply
  return jax.jit(lambda x: apply(frozen.tree, x, mcfg))


def build(cfg: VictimConfig, workdir: str | None = None, progress: bool = True) -> Victim:
  """Trains (or resumes from ``workdir``) the clean victim of ``cfg``."""
  ds = data.load(cfg.dataset)
  rest, x_val, y_val = data.holdout(ds, cfg.val_images, seed=cfg.seed)
  res = train_classifier(rest, cfg.model, TrainConfig(
      steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
      warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed, log_every=max(1, cfg.steps // 20),
      ckpt_every=max(1, cfg.steps // 2)),
      workdir=workdir and os.path.join(workdir, cfg.tag), progress=progress)
  return Victim(cfg, res.params, res.model_config, rest.x_train, rest.y_train, x_val, y_val,
                ds.x_test, ds.y_test)
