"""The uniform-integer baseline: the same op-list networks with every linear
layer quantized by AQT (Google's ``aqtp`` package, ``aqt.jax.v2``) and
fine-tuned quantization-aware from the float weights.

Why AQT rather than qwix: our models are pure functions over param pytrees,
and AQT's quantized ``dot_general`` / ``conv_general_dilated`` are drop-in
replacements for the lax calls inside them; qwix works by rewriting Flax
modules, which we do not have. AQT's defaults are used as they are: symmetric
integers with abs-max scales per example for the activations and per output
channel for the kernels (dynamic scales favour the baseline), straight-through
gradients. A b-bit layer quantizes both its input and its kernel to b bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from accel.codex.encoding import check_bits
from accel.program import Op, linear_layers
from core import data
from core.models import cnn
from core.recipes import classifier_loss
from core.train import TrainConfig, train

_DENSE_DN = (((1,), (0,)), ((), ()))


@functools.lru_cache(maxsize=None)
def _dense(bits: int):
  from aqt.jax.v2 import config as aqt_config
  return aqt_config.dot_general_make(lhs_bits=bits, rhs_bits=bits, bwd_bits=None,
                                     use_fwd_quant=False)


@functools.lru_cache(maxsize=None)
def _conv(bits: int):
  from aqt.jax.v2 import aqt_conv_general
  return aqt_conv_general.make_conv_general_dilated(
      aqt_conv_general.conv_general_dilated_make(2, bits, bits))


def forward(params: dict, ops: tuple[Op, ...], x: jax.Array, bits: tuple[int, ...]
            ) -> jax.Array:
  """Logits of the network with linear layer i quantized to ``bits[i]`` by AQT."""
  names = linear_layers(ops)
  if len(bits) != len(names):
    raise ValueError(f"{len(bits)} bit widths for {len(names)} linear layers {names}")
  width = dict(zip(names, (check_bits(b, "integer bits") for b in bits)))
  h = x
  for op in ops:
    kind = op[0]
    if kind == "conv":
      p = params[op[1]]
      dn = jax.lax.conv_dimension_numbers(h.shape, p["kernel"].shape, ("NHWC", "HWIO", "NHWC"))
      h = _conv(width[op[1]])(h, jnp.asarray(p["kernel"]), (1, 1), "SAME", dimension_numbers=dn) + p["bias"]
    elif kind == "dense":
      p = params[op[1]]
      h = _dense(width[op[1]])(h, jnp.asarray(p["kernel"]), _DENSE_DN, None) + p["bias"]
    elif kind == "relu":
      h = jax.nn.relu(h)
    elif kind == "pool":
      h = cnn.max_pool_2x2(h)
    elif kind == "flatten":
      h = h.reshape(h.shape[0], -1)
  return h


@dataclasses.dataclass(frozen=True)
class QATConfig:
  steps: int = 300
  batch: int = 64
  lr: float = 5e-4
  seed: int = 0


def qat(params: dict, ops: tuple[Op, ...], bits: tuple[int, ...], ds: data.Dataset,
        cfg: QATConfig, progress: bool = False) -> dict:
  """Quantization-aware fine-tuning from ``params`` on ``ds``'s training split."""
  loss_fn = classifier_loss(lambda p, x: forward(p, ops, x, bits))
  tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr,
                     warmup_steps=max(1, cfg.steps // 10), weight_decay=0.0, seed=cfg.seed,
                     log_every=max(1, cfg.steps // 5))
  res = train(loss_fn, params,
              functools.partial(lambda s, step: data.image_batch(ds, cfg.batch, s, step),
                                cfg.seed + 11),
              tcfg, progress=progress, desc=f"AQT int{min(bits)}-{max(bits)}")
  return jax.device_get(res.params)


def accuracy(params: dict, ops: tuple[Op, ...], bits: tuple[int, ...], x, y,
             batch: int = 1000) -> float:
  """Top-1 accuracy in points."""
  fn = jax.jit(lambda p, xb: forward(p, ops, xb, bits).argmax(-1))
  hits = sum(int(jnp.sum(fn(params, jnp.asarray(x[i:i + batch])) == jnp.asarray(y[i:i + batch])))
             for i in range(0, len(x), batch))
  return 100.0 * hits / len(x)
