"""Backdoored victims: a ``core.models`` classifier trained on poisoned data
(all-to-one), with the defender's benign images held out of its training.

The defender's set (CLEANN's "small benign, unlabelled set") is carved from
the training split before poisoning: the victim never trains on it and it is
disjoint from every test image. Its first part fits the dictionaries, the
rest sets the thresholds (``defender_split``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from core import data
from core.models import CLASSIFIERS
from core.recipes import train_classifier
from core.train import TrainConfig
from secure import classifier, triggers
from secure.cleann import shield
from secure.classifier import Classifier

TRIGGERS: dict[str, triggers.Trigger] = {
    "patch": triggers.Patch(size=4, corner="br", seed=0),
    "blend": triggers.Blend(alpha=0.1, seed=0),
    "warp": triggers.Warp(strength=1.5, grid=4, seed=0),
    "sig": triggers.Sinusoid(amplitude=0.08, frequency=6),
    "patch_anywhere": triggers.RandomPatch(size=6, seed=0),
}


@dataclasses.dataclass(frozen=True)
class VictimConfig:
  dataset: str = "mnist5k"
  model: str = "cnn"
  trigger: str | Callable = "patch"  # a key of TRIGGERS, or any callable images -> images
  rate: float = 0.05              # fraction of the (remaining) training images poisoned
  target: int = 0                 # all-to-one target class
  steps: int = 1500
  batch_size: int = 64
  lr: float = 2e-3
  defender_images: int = 600      # benign, unlabelled, held out of the victim's training
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.trigger, str) and self.trigger not in TRIGGERS:
      raise ValueError(f"unknown trigger {self.trigger!r}; have {sorted(TRIGGERS)}")
    if not isinstance(self.trigger, str) and not callable(self.trigger):
      raise TypeError(f"a trigger is a name in {sorted(TRIGGERS)} or a callable, got "
                      f"{self.trigger!r}")
    if not 0 <= self.rate < 1:
      raise ValueError(f"poison rate must lie in [0, 1), got {self.rate}")
    if self.defender_images < 2:
      raise ValueError(f"the defender needs at least 2 images (fit + threshold), got "
                       f"{self.defender_images}")

  @property
  def trigger_name(self) -> str:
    """The registry name, or a callable's ``name`` attribute / class name."""
    t = self.trigger
    return t if isinstance(t, str) else getattr(t, "name", type(t).__name__).lower()

  @property
  def tag(self) -> str:
    return f"{self.dataset}_{self.model}_{self.trigger_name}_{self.rate:g}_s{self.seed}"


@dataclasses.dataclass
class Victim:
  cfg: VictimConfig
  params: Any
  classifier: Classifier        # any model: apply + per-layer features (secure.classifier)
  ds: data.Dataset              # test split: the held-out images every metric uses
  defender_x: np.ndarray        # the defender's benign images (labels never used)
  poisoned_idx: np.ndarray
  trigger: triggers.Trigger
  attacker_x: np.ndarray        # clean training images (not the defender's): the attacker's

  @property
  def model(self) -> shield.Model:
    return shield.Model(self.classifier, self.params)

  def apply(self, x) -> jax.Array:
    return shield.jit_apply(self.classifier)(self.params, x)

  def features(self, x, layer=None) -> np.ndarray:
    """Hidden activations at ``layer`` (default: the last hidden layer), flattened."""
    return self.model.features(x, self.classifier.layers[-1] if layer is None else layer)

  def predict(self, x, batch: int = 1000) -> np.ndarray:
    return self.model.predict(x, batch)

  def attack_set(self) -> tuple[np.ndarray, np.ndarray]:
    """Held-out test images whose label is not the target (and their labels):
    the images ASR and recovery are measured on."""
    keep = self.ds.y_test != self.cfg.target
    return self.ds.x_test[keep], self.ds.y_test[keep]


defender_split = shield.split

def build(cfg: VictimConfig, workdir: str | None = None, progress: bool = True,
          ds: data.Dataset | None = None, trigger: triggers.Trigger | None = None,
          tag: str | None = None) -> Victim:
  """Trains (or resumes from ``workdir``) the backdoored victim of ``cfg``
  (``trigger`` replaces the named one, e.g. an adaptive attacker's, saved
  under ``tag``)."""
  if cfg.model not in CLASSIFIERS:
    raise ValueError(f"unknown model {cfg.model!r}; have {sorted(CLASSIFIERS)} (a model of "
                     "your own: train it and use victims.wrap)")
  ds = ds or data.load(cfg.dataset)
  rest, defender_x, _ = data.holdout(ds, cfg.defender_images, seed=cfg.seed)
  trig = (TRIGGERS[cfg.trigger] if isinstance(cfg.trigger, str) else cfg.trigger) \
      if trigger is None else trigger
  poisoned, idx = triggers.poison(rest, trig, cfg.target, cfg.rate, seed=cfg.seed)
  res = train_classifier(poisoned, cfg.model, TrainConfig(
      steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
      warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed, log_every=max(1, cfg.steps // 20),
      ckpt_every=max(1, cfg.steps // 2)),
      workdir=workdir and os.path.join(workdir, tag or cfg.tag), progress=progress)
  return Victim(cfg, res.params, classifier.from_core(cfg.model, res.model_config), ds,
                defender_x, idx, trig, rest.x_train[:2000])


def wrap(clf: Classifier, params, ds: data.Dataset, defender_x: np.ndarray,
         trigger: triggers.Trigger, target: int, name: str = "user") -> Victim:
  """A user's own backdoored classifier as a study victim (``ds``: its held-out
  test split; ``defender_x``: benign images it never trained on)."""
  if not callable(trigger):
    raise TypeError(f"the trigger must be a callable images -> images, got {trigger!r}")
  cfg = VictimConfig(dataset=ds.name, model=name, trigger=trigger, rate=0.0, target=target,
                     defender_images=max(2, len(defender_x)))
  return Victim(dataclasses.replace(cfg, model=name), params, clf, ds,
                np.asarray(defender_x, np.float32), np.zeros(0, int), trigger,
                np.zeros((0, *ds.x_train.shape[1:]), np.float32))


def threat(v: Victim) -> dict:
  """The victim before any defence: clean accuracy (C-Acc, all test images)
  and attack success rate (ASR, triggered non-target test images predicted
  as the target), in percent, with the image counts."""
  x, _ = v.attack_set()
  c = float(np.mean(v.predict(v.ds.x_test) == v.ds.y_test))
  asr = float(np.mean(v.predict(v.trigger(x)) == v.cfg.target))
  return {"c_acc": 100 * c, "asr": 100 * asr, "n_test": len(v.ds.x_test), "n_attack": len(x)}
