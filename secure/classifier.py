"""A classifier as the secure/ defences see it: pure functions over a param
pytree, so any JAX model can be defended, not only ``core.models``'.

* ``apply(params, x_Bx...) -> logits_BxC``
* ``features(params, x_Bx..., layer) -> h_BxF``: the hidden activations at
  ``layer``, one of ``layers`` (whatever names the model gives its layers:
  ints here, negative ones counting from the end as ``core.models`` do).

Hashable (a jit static argument) and picklable when its functions are
module-level (``core.multiprocess`` ships it to other processes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Hashable

from core.models import CLASSIFIERS


@dataclasses.dataclass(frozen=True)
class Classifier:
  apply: Callable[[Any, Any], Any]
  features: Callable[[Any, Any, Hashable], Any]
  layers: tuple[Hashable, ...]      # hidden layers ``features`` takes, input side first
  num_classes: int
  name: str = "classifier"

  def __post_init__(self):
    if not callable(self.apply) or not callable(self.features):
      raise TypeError("a Classifier needs callable apply(params, x) and "
                      "features(params, x, layer)")
    if not self.layers:
      raise ValueError(f"{self.name}: a Classifier needs at least one hidden layer for the "
                       "latent defences")
    if self.num_classes < 2:
      raise ValueError(f"{self.name}: num_classes must be >= 2, got {self.num_classes}")

  def check_layer(self, layer: Hashable) -> None:
    if layer not in self.layers:
      raise ValueError(f"{self.name} has no hidden layer {layer!r}; it has {self.layers}")


def _core_apply(model: str, cfg, params, x):
  return CLASSIFIERS[model].apply(params, x, cfg)


def _core_features(model: str, cfg, params, x, layer):
  return CLASSIFIERS[model].features(params, x, cfg, layer=layer)


def _hidden_layers(model: str, cfg) -> int:
  if model == "mlp":
    return len(cfg.widths) - 2
  if model == "cnn":
    return len(cfg.channels) + len(cfg.hidden)
  raise ValueError(f"no hidden-layer list for core model {model!r}; build a Classifier by hand")


@functools.lru_cache(maxsize=64)   # one object per (model, config): jit caches stay warm
def from_core(model: str, cfg) -> Classifier:
  """One of ``core.models``' classifiers (MLP or CNN); its layers are named by
  negative indices (-1: the layer the output layer reads)."""
  n = _hidden_layers(model, cfg)
  return Classifier(functools.partial(_core_apply, model, cfg),
                    functools.partial(_core_features, model, cfg),
                    tuple(range(-n, 0)), cfg.num_classes, model)
