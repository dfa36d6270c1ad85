"""A small ReLU MLP classifier (e.g. CuRTAIL's 784-300-100-10 victim)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from core.models import layers


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  input_shape: tuple[int, ...] = (28, 28, 1)
  hidden: tuple[int, ...] = (300, 100)
  num_classes: int = 10

  def __post_init__(self):
    if any(h < 1 for h in self.hidden) or self.num_classes < 2:
      raise ValueError(f"bad MLPConfig: hidden={self.hidden}, num_classes={self.num_classes}")

  @property
  def widths(self) -> tuple[int, ...]:
    return (math.prod(self.input_shape), *self.hidden, self.num_classes)


@functools.partial(jax.jit, static_argnums=1)  # one compile instead of one per leaf shape
def init(key: jax.Array, cfg: MLPConfig) -> dict:
  widths = cfg.widths
  keys = jax.random.split(key, len(widths) - 1)
  return {f"dense_{i}": {"kernel": layers.normal_init(k, (a, b), a) * jnp.sqrt(2.0),
                         "bias": jnp.zeros((b,))}
          for i, (k, a, b) in enumerate(zip(keys, widths[:-1], widths[1:]))}


def features(params: dict, x: jax.Array, cfg: MLPConfig, layer: int = -1) -> jax.Array:
  """Hidden layer ``layer``'s activations (after ReLU) that latent-space
  defences read; negative indices count from the end (-1: the layer the
  output layer reads)."""
  if tuple(x.shape[1:]) != tuple(cfg.input_shape):
    raise ValueError(f"MLP expects inputs (B, {cfg.input_shape}), got {x.shape}")
  n = len(cfg.widths) - 2
  if not -n <= layer < n:
    raise ValueError(f"layer {layer} is past the model: it has {n} hidden layers")
  layer %= n
  h = x.reshape(x.shape[0], -1)
  for i in range(layer + 1):
    h = jax.nn.relu(h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"])
  return h


def apply(params: dict, x: jax.Array, cfg: MLPConfig) -> jax.Array:
  """Logits (B, num_classes) for images (B, *input_shape)."""
  last = params[f"dense_{len(cfg.widths) - 2}"]
  return features(params, x, cfg) @ last["kernel"] + last["bias"]
