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

import functools

import jax
import jax.numpy as jnp

from accel.codex.encoding import check_bits
from accel.program import Op, linear_layers
from accel.retrain import RetrainConfig, fine_tune
from core import data, evaluation
from core.models import cnn
from core.recipes import classifier_loss

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


def qat(params: dict, ops: tuple[Op, ...], bits: tuple[int, ...], ds: data.Dataset,
        cfg: RetrainConfig, progress: bool = False) -> dict:
  """Quantization-aware fine-tuning from ``params`` on ``ds``'s training split (the
  same recipe as centroid-preserving retraining, so the two compare at equal
  training)."""
  loss_fn = classifier_loss(lambda p, x: forward(p, ops, x, bits))
  return fine_tune(loss_fn, params, ds, cfg, salt=11, desc=f"AQT int{min(bits)}-{max(bits)}",
                   progress=progress)


def accuracy(params: dict, ops: tuple[Op, ...], bits: tuple[int, ...], x, y) -> float:
  """Top-1 accuracy in points (AQT's scales are per example, so padding a batch
  changes no other example's result)."""
  apply = lambda p, xb: forward(p, ops, xb, bits)
  return 100.0 * evaluation.classifier_metrics(apply, params, x, y)["accuracy"]


def interpreted(graph, bits: dict[str, int]):
  """AQT on any model: ``accel.interpret``'s ``on_linear`` for a graph, op
  ``name`` quantized to ``bits[name]`` (both operands; ops left out stay
  float). AQT's drop-in ``dot_general`` takes the op's own dimension numbers,
  attention's batched products included; convolutions go through the op-list
  path above."""
  from accel import interpret
  graph.check_ops(bits, "AQT widths")
  width = {k: check_bits(b, f"{k} integer bits") for k, b in bits.items()}

  def on_linear(name, eqn, lhs, rhs):
    if name not in width:
      return interpret.bind(eqn, [lhs, rhs])[0], None
    if eqn.primitive.name != "dot_general":
      raise NotImplementedError(f"{name}: AQT through the interpreter maps dot_general only "
                                f"(got {eqn.primitive.name})")
    return _dense(width[name])(lhs, rhs, eqn.params["dimension_numbers"], None), None
  return on_linear


def run_interpreted(graph, params, x, bits: dict[str, int]):
  """``graph``'s model with AQT-quantized ops (``interpreted``), jitted per width set."""
  from accel import interpret
  g = interpret.at(graph, params, x)
  return _run_aqt(g, tuple(sorted(bits.items())), params, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_aqt(graph, bits_items, params, x):
  from accel import interpret
  return interpret.evaluate(graph, params, x, interpreted(graph, dict(bits_items)))[0]
