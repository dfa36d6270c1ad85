"""CodeX's bit-flexible encoding: every linear layer's kernel and its input
feature map stored as b-bit indices into a per-layer codebook (2^b entries,
fitted with ``accel.kmeans``), with b chosen per layer and per operand.

A CodeX codebook has the same layout as RAPIDNN's (``accel.rapidnn.Codebook``:
``in_c`` sorted input centroids, ``w_c`` weight centroids, ``w_idx`` the kernel
as indices, ``bias``), so the centroid-substituted float network
(``rapidnn.float_forward``) and centroid-preserving retraining
(``accel.retrain``) apply unchanged. What differs is the hardware datapath:
CodeX decodes indices to values and multiplies them (``emulate`` here), where
RAPIDNN looks products up in a (u x w) table -- a table that is 256 x 256 at
8 bits and whose gathered rows would not fit in memory for a conv layer.

Stand-alone weight encoding (the paper's baseline) is the same codebook
without ``in_c``: activations stay full precision.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from accel import rapidnn
# One definition of the widths for the op-list path and the interpreter's codebooks.
from accel.codebooks import FULL_PRECISION_BITS, MAX_BITS, check_bits  # noqa: F401
from accel.kmeans import nearest_sorted
from accel.program import Op, linear_layers
from core.models import cnn


@dataclasses.dataclass(frozen=True)
class BitConfig:
  """Per linear layer, in program order: weight bits and input-activation bits
  (``None``: the input stays full precision -- stand-alone weight encoding)."""
  weights: tuple[int, ...]
  acts: tuple[int | None, ...]

  def __post_init__(self):
    if len(self.weights) != len(self.acts) or not self.weights:
      raise ValueError(f"BitConfig needs one weight and one activation width per layer, got "
                       f"{len(self.weights)} and {len(self.acts)}")
    for i, b in enumerate(self.weights):
      check_bits(b, f"weight bits of layer {i}")
    for i, b in enumerate(self.acts):
      if b is not None:
        check_bits(b, f"activation bits of layer {i}")

  @classmethod
  def uniform(cls, n_layers: int, bits: int, weight_only: bool = False) -> "BitConfig":
    return cls((bits,) * n_layers, (None if weight_only else bits,) * n_layers)

  @classmethod
  def parse(cls, text: str, n_layers: int) -> "BitConfig":
    """'4' -> every layer w4a4; 'w4a3,w2a-' -> per layer ('a-': full-precision inputs)."""
    text = text.strip()
    if text.isdigit():
      return cls.uniform(n_layers, check_bits(int(text), "bits"))
    parts = text.split(",")
    if len(parts) != n_layers:
      raise ValueError(f"the bits string has {len(parts)} layers, the network {n_layers}")
    ws, acts = [], []
    for p in parts:
      w, sep, a = p[1:].partition("a")
      if not p.startswith("w") or not sep or not w.isdigit() or not (a == "-" or a.isdigit()):
        raise ValueError(f"per-layer bits look like 'w4a3' or 'w4a-', got {p!r}")
      ws.append(int(w))
      acts.append(None if a == "-" else int(a))
    return cls(tuple(ws), tuple(acts))

  @property
  def weight_only(self) -> bool:
    return all(a is None for a in self.acts)

  def label(self) -> str:
    return " ".join(f"w{w}a{'-' if a is None else a}" for w, a in zip(self.weights, self.acts))

  def to_json(self) -> dict:
    return {"weights": list(self.weights), "acts": list(self.acts)}

  @classmethod
  def from_json(cls, d: dict) -> "BitConfig":
    return cls(tuple(d["weights"]), tuple(d["acts"]))


@dataclasses.dataclass(frozen=True)
class LayerShape:
  name: str
  weights: int        # kernel entries
  inputs: int         # values of the input feature map, per image


def layer_shapes(ops: tuple[Op, ...], input_shape: tuple[int, ...], params: dict
                 ) -> list[LayerShape]:
  """Kernel size and input feature-map size of every linear layer, per image."""
  shape, out = tuple(input_shape), []
  for op in ops:
    if op[0] in ("conv", "dense"):
      kernel = params[op[1]]["kernel"] if "kernel" in params[op[1]] else params[op[1]]["w_idx"]
      out.append(LayerShape(op[1], int(np.prod(kernel.shape)), math.prod(shape)))
      shape = (*shape[:2], kernel.shape[-1]) if op[0] == "conv" else (kernel.shape[-1],)
    elif op[0] == "pool":
      shape = (shape[0] // 2, shape[1] // 2, shape[2])
    elif op[0] == "flatten":
      shape = (math.prod(shape),)
  return out


def total_bits(shapes: list[LayerShape], bits: BitConfig) -> dict:
  """Encoded storage of one image's pass: every kernel at its weight bits and every
  input feature map at its activation bits (full-precision inputs at 16 bits).
  Codebooks themselves (2^b 16-bit entries per operand) are counted separately."""
  if len(shapes) != len(bits.weights):
    raise ValueError(f"the bit config has {len(bits.weights)} layers, the network "
                     f"{len(shapes)}")
  w = sum(s.weights * b for s, b in zip(shapes, bits.weights))
  a = sum(s.inputs * (FULL_PRECISION_BITS if b is None else b)
          for s, b in zip(shapes, bits.acts))
  cb = sum(2 ** b * FULL_PRECISION_BITS for b in bits.weights) + sum(
      2 ** b * FULL_PRECISION_BITS for b in bits.acts if b is not None)
  return {"weight_bits": w, "act_bits": a, "total": w + a, "codebook_bits": cb}


class CodebookBank:
  """Every layer's codebooks at every bitwidth 1..8, fitted once: a layer's
  kernel codebook depends only on its kernel, its input codebook only on the
  float network's activations, so any per-layer configuration is assembled
  from the bank without clustering again (what makes a search of hundreds of
  configurations cheap)."""

  def __init__(self, params: dict, ops: tuple[Op, ...], activations: dict, seed: int = 0):
    rapidnn.check_layers(params, ops, "params")
    self.ops, self.layers = ops, linear_layers(ops)
    self._bank = {}
    for b in range(1, MAX_BITS + 1):
      k = 2 ** b
      # A layer with fewer weights than 2^b entries keeps one centroid per weight.
      cfg = rapidnn.RapidConfig(u=k, w=k, seed=seed)
      self._bank[b] = _build_capped(params, ops, activations, cfg)

  def codebook(self, bits: BitConfig, pad: bool = False) -> rapidnn.Codebook:
    """The codebook of ``bits``. ``pad``: every table padded to 2^8 entries
    (weight centroids with zeros no index reaches, input centroids with +inf,
    which no nearest search picks), so all configurations share array shapes
    and a jitted forward compiles once for a whole search."""
    if len(bits.weights) != len(self.layers):
      raise ValueError(f"the bit config has {len(bits.weights)} layers, the network "
                       f"{len(self.layers)} ({self.layers})")
    full = 2 ** MAX_BITS
    cb = {}
    for name, wb, ab in zip(self.layers, bits.weights, bits.acts):
      w = self._bank[wb][name]
      w_c = jnp.pad(w["w_c"], (0, full - len(w["w_c"]))) if pad else w["w_c"]
      entry = {"w_c": w_c, "w_idx": w["w_idx"], "bias": w["bias"]}
      if ab is not None:
        in_c = self._bank[ab][name]["in_c"]
        entry["in_c"] = jnp.pad(in_c, (0, full - len(in_c)),
                                constant_values=jnp.inf) if pad else in_c
      cb[name] = entry
    return cb


def _build_capped(params, ops, activations, cfg: rapidnn.RapidConfig) -> rapidnn.Codebook:
  """``rapidnn.build`` with ``w`` capped at each layer's weight count."""
  out = {}
  for name in linear_layers(ops):
    n = int(np.prod(params[name]["kernel"].shape))
    c = dataclasses.replace(cfg, w=min(cfg.w, n))
    single = tuple(op for op in ops if op[0] not in ("conv", "dense") or op[1] == name)
    out[name] = rapidnn.build({name: params[name]}, single, None, c,
                              activations={name: activations[name]})[name]
  return out


def encode_input(cb: rapidnn.Codebook, ops: tuple[Op, ...], x: jax.Array) -> jax.Array:
  """The network input as indices into the first layer's input codebook."""
  return nearest_sorted(x, cb[linear_layers(ops)[0]]["in_c"])


def emulate(cb: rapidnn.Codebook, x_BxHxWxC: jax.Array, ops: tuple[Op, ...]) -> jax.Array:
  """Logits of the encoded datapath: indices in; per linear layer decode the
  input indices and the kernel indices, multiply-accumulate, add the bias;
  ReLU and encoding into the next layer's codebook are one nearest-centroid
  search; max-pooling compares indices (input codebooks are sorted, so index
  order is value order). Weight-only layers (no ``in_c``) take float inputs."""
  rapidnn.check_layers(cb, ops, "codebook")
  shape = getattr(x_BxHxWxC, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"emulate expects images (B, H, W, C), got shape {shape}")
  return _emulate(cb, jnp.asarray(x_BxHxWxC), ops)


@functools.partial(jax.jit, static_argnames=("ops",))
def _emulate(cb, x, ops):
  layers = linear_layers(ops)
  first = cb[layers[0]]
  codes, h = (encode_input(cb, ops, x), None) if "in_c" in first else (None, x)
  li = 0
  for op in ops:
    kind = op[0]
    if kind in ("conv", "dense"):
      p = cb[op[1]]
      v = p["in_c"][codes] if codes is not None else h           # decode
      kernel = p["w_c"][p["w_idx"]]                               # decode
      h = cnn.conv2d(v, kernel, p["bias"]) if kind == "conv" else v @ kernel + p["bias"]
      codes, li = None, li + 1
    elif kind == "relu":
      nxt = cb[layers[li]]
      if "in_c" in nxt:   # ReLU + encode: one search over the next codebook
        codes, h = nearest_sorted(jnp.maximum(h, 0.0), nxt["in_c"]), None
      else:
        h = jax.nn.relu(h)
    elif kind == "pool":
      if codes is not None:
        codes = jax.lax.reduce_window(codes, jnp.iinfo(jnp.int32).min, jax.lax.max,
                                      (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
      else:
        h = cnn.max_pool_2x2(h)
    elif kind == "flatten":
      if codes is not None:
        codes = codes.reshape(codes.shape[0], -1)
      else:
        h = h.reshape(h.shape[0], -1)
  return h
