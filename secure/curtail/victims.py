"""CuRTAIL's victims: the paper's MNIST MLP (784-300-100-10) and the shared CNN,
trained on clean data with a validation split carved out, or any classifier a
user brings (``Victim.of``: a ``secure.classifier.Classifier``, its params and
the data splits).

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
from secure import classifier as classifier_lib


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
  classifier: classifier_lib.Classifier
  params: Any
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str = "victim"
  cfg: VictimConfig | None = None     # how ``build`` trained it (None: the user's model)

  @classmethod
  def of(cls, classifier: classifier_lib.Classifier, params, x_train, y_train, x_val, y_val,
         x_test, y_test, name: str | None = None) -> "Victim":
    """A user's trained classifier with its clean splits: ``train`` fits the
    defences, ``val`` sets their thresholds, ``test`` is reported."""
    arrs = [np.asarray(a, np.float32) for a in (x_train, x_val, x_test)]
    labs = [np.asarray(a) for a in (y_train, y_val, y_test)]
    for split, xs, ys in zip(("train", "val", "test"), arrs, labs):
      if len(xs) != len(ys) or not len(xs):
        raise ValueError(f"{split}: {len(xs)} images but {len(ys)} labels (need >= 1)")
      if not np.isfinite(xs).all() or xs.min() < 0 or xs.max() > 1:
        raise ValueError(f"{split}: images must be finite and lie in [0, 1]")
      if not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0 or \
          ys.max() >= classifier.num_classes:
        raise ValueError(f"{split}: labels must be integers in [0, {classifier.num_classes})")
    return cls(classifier, params, arrs[0], labs[0], arrs[1], labs[1], arrs[2], labs[2],
               name or classifier.name)

  @property
  def tag(self) -> str:
    return self.cfg.tag if self.cfg else self.name

  @property
  def num_classes(self) -> int:
    return self.classifier.num_classes

  @property
  def logits_fn(self) -> Callable:
    """Jitted images -> logits, hashable (the attacks take it as a static argument)."""
    return _bound(self.classifier, _Frozen(self.params))

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
def _bound(clf: classifier_lib.Classifier, frozen: _Frozen) -> Callable:
  return jax.jit(lambda x: clf.apply(frozen.tree, x))


def build(cfg: VictimConfig, workdir: str | None = None, progress: bool = True) -> Victim:
  """Trains (or resumes from ``workdir``) the clean victim of ``cfg``."""
  ds = data.load(cfg.dataset)
  rest, x_val, y_val = data.holdout(ds, cfg.val_images, seed=cfg.seed)
  res = train_classifier(rest, cfg.model, TrainConfig(
      steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
      warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed, log_every=max(1, cfg.steps // 20),
      ckpt_every=max(1, cfg.steps // 2)),
      workdir=workdir and os.path.join(workdir, cfg.tag), progress=progress)
  return Victim(classifier_lib.from_core(cfg.model, res.model_config), res.params,
                rest.x_train, rest.y_train, x_val, y_val, ds.x_test, ds.y_test, cfg.tag, cfg)
