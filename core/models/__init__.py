"""Shared models: MLP, CNN and ViT classifiers and a LLaMA-style byte LM.

Every model is ``init(key, cfg) -> params`` and ``apply(params, x, cfg)`` over a
Flax-compatible nested dict; configs are frozen dataclasses.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any, Callable

import jax

from core.models import cnn, mlp, vit

CLASSIFIERS: dict[str, ModuleType] = {"mlp": mlp, "cnn": cnn, "vit": vit}
_CONFIGS = {"mlp": mlp.MLPConfig, "cnn": cnn.CNNConfig, "vit": vit.ViTConfig}


def classifier_config(name: str, input_shape: tuple[int, ...], num_classes: int,
                      **overrides: Any):
  """A classifier config sized for the inputs; small images get smaller patches."""
  if name not in CLASSIFIERS:
    raise ValueError(f"Unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}.")
  kwargs: dict[str, Any] = {"input_shape": tuple(input_shape), "num_classes": num_classes}
  if name == "vit" and "patch" not in overrides:
    kwargs["patch"] = 7 if input_shape[0] % 7 == 0 else 2
  return _CONFIGS[name](**(kwargs | overrides))


@functools.lru_cache(maxsize=64)  # configs are frozen dataclasses: hashable
def _param_shapes(init: Callable[[jax.Array, Any], Any], cfg: Any) -> Any:
  return jax.eval_shape(init, jax.random.key(0), cfg)


def check_params(init: Callable[[jax.Array, Any], Any], params: Any, cfg: Any,
                 where: str) -> None:
  """A clear error unless ``params`` has exactly the leaves and shapes that
  ``init(key, cfg)`` makes (e.g. params of a deeper or wider model than ``cfg``)."""
  expected = _param_shapes(init, cfg)
  paths = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}
  have, want = paths(params), paths(expected)
  if have.keys() != want.keys():
    raise ValueError(f"{where}: params do not match {cfg}: missing "
                     f"{sorted(want.keys() - have.keys())[:5]}, unexpected "
                     f"{sorted(have.keys() - want.keys())[:5]}")
  for k, w in want.items():
    if tuple(have[k].shape) != tuple(w.shape):
      raise ValueError(f"{where}: param {k} has shape {tuple(have[k].shape)}; {cfg} needs "
                       f"{tuple(w.shape)}")


def num_params(params: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
