"""Backdoored victims: a ``core.models`` classifier trained on poisoned data
(all-to-one), with the defender's benign images held out of its training.

The defender's set (CLEANN's "small benign, unlabelled set") is carved from
the training split before poisoning: the victim never trains on it and it is
disjoint from every test image. Its first part fits the dictionaries, the
rest sets the thresholds (``defender_split``).
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
from secure import triggers

TRIGGERS: dict[str, triggers.Trigger] = {
    "patch": triggers.Patch(size=4, corner="br", seed=0),
    "blend": triggers.Blend(alpha=0.1, seed=0),
    "warp": triggers.Warp(strength=1.5, grid=4, seed=0),
}


@dataclasses.dataclass(frozen=True)
class VictimConfig:
  dataset: str = "mnist5k"
  model: str = "cnn"
  trigger: str = "patch"          # a key of TRIGGERS
  rate: float = 0.05              # fraction of the (remaining) training images poisoned
  target: int = 0                 # all-to-one target class
  steps: int = 1500
  batch_size: int = 64
  lr: float = 2e-3
  defender_images: int = 600      # benign, unlabelled, held out of the victim's training
  seed: int = 0

  def __post_init__(self):
    if self.trigger not in TRIGGERS:
      raise ValueError(f"unknown trigger {self.trigger!r}; have {sorted(TRIGGERS)}")
    if self.model not in CLASSIFIERS:
      raise ValueError(f"unknown model {self.model!r}; have {sorted(CLASSIFIERS)}")
    if not 0 <= self.rate < 1:
      raise ValueError(f"poison rate must lie in [0, 1), got {self.rate}")
    if self.defender_images < 2:
      raise ValueError(f"the defender needs at least 2 images (fit + threshold), got "
                       f"{self.defender_images}")

  @property
  def tag(self) -> str:
    return f"{self.dataset}_{self.model}_{self.trigger}_{self.rate:g}_s{self.seed}"


@dataclasses.dataclass
class Victim:
  cfg: VictimConfig
  params: Any
  model_config: Any
  ds: data.Dataset              # test split: the held-out images every metric uses
  defender_x: np.ndarray        # the defender's benign images (labels never used)
  poisoned_idx: np.ndarray
  trigger: triggers.Trigger
  attacker_x: np.ndarray        # clean training images (not the defender's): the attacker's

  def apply(self, x) -> jax.Array:
    return _apply(self.cfg.model, self.model_config)(self.params, x)

  def features(self, x) -> jax.Array:
    return _features(self.cfg.model, self.model_config)(self.params, x)

  def predict(self, x, batch: int = 1000) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.concatenate([np.asarray(self.apply(x[i:i + batch]).argmax(-1))
                           for i in range(0, len(x), batch)]) if len(x) else np.zeros(0, int)

  def attack_set(self) -> tuple[np.ndarray, np.ndarray]:
    """Held-out test images whose label is not the target (and their labels):
    the images ASR and recovery are measured on."""
    keep = self.ds.y_test != self.cfg.target
    return self.ds.x_test[keep], self.ds.y_test[keep]


@functools.lru_cache(maxsize=None)
def _apply(model: str, mcfg) -> Callable:
  return jax.jit(functools.partial(CLASSIFIERS[model].apply, cfg=mcfg))


@functools.lru_cache(maxsize=None)
def _features(model: str, mcfg) -> Callable:
  return jax.jit(functools.partial(CLASSIFIERS[model].features, cfg=mcfg))


def defender_split(x: np.ndarray, fit_fraction: float = 2 / 3) -> tuple[np.ndarray, np.ndarray]:
  """(images that fit the dictionaries, images that set the thresholds)."""
  n_fit = int(round(fit_fraction * len(x)))
  if not 1 <= n_fit < len(x):
    raise ValueError(f"{len(x)} defender images cannot be split {fit_fraction:.2f} / rest")
  return x[:n_fit], x[n_fit:]


def build(cfg: VictimConfig, workdir: str | None = None, progress: bool = True,
          ds: data.Dataset | None = None, trigger: triggers.Trigger | None = None,
          tag: str | None = None) -> Victim:
  """Trains (or resumes from ``workdir``) the backdoored victim of ``cfg``
  (``trigger`` replaces the named one, e.g. an adaptive attacker's, saved
  under ``tag``)."""
  ds = ds or data.load(cfg.dataset)
  rest, defender_x, _ = data.holdout(ds, cfg.defender_images, seed=cfg.seed)
  trig = TRIGGERS[cfg.trigger] if trigger is None else trigger
  poisoned, idx = triggers.poison(rest, trig, cfg.target, cfg.rate, seed=cfg.seed)
  res = train_classifier(poisoned, cfg.model, TrainConfig(
      steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
      warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed, log_every=max(1, cfg.steps // 20),
      ckpt_every=max(1, cfg.steps // 2)),
      workdir=workdir and os.path.join(workdir, tag or cfg.tag), progress=progress)
  return Victim(cfg, res.params, res.model_config, ds, defender_x, idx, trig,
                rest.x_train[:2000])


def threat(v: Victim) -> dict:
  """The victim before any defence: clean accuracy (C-Acc, all test images)
  and attack success rate (ASR, triggered non-target test images predicted
  as the target), in percent, with the image counts."""
  x, _ = v.attack_set()
  c = float(np.mean(v.predict(v.ds.x_test) == v.ds.y_test))
  asr = float(np.mean(v.predict(v.trigger(x)) == v.cfg.target))
  return {"c_acc": 100 * c, "asr": 100 * asr, "n_test": len(v.ds.x_test), "n_attack": len(x)}
