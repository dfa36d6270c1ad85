"""RAPIDNN's reinterpretation of a trained MLP/CNN, and its lookup datapath.

``build`` clusters every linear layer's kernel into ``w`` values and its input
into ``u`` values (fitted on calibration activations), giving a *codebook*
per layer: sorted input centroids ``in_c``, weight centroids ``w_c``, the
kernel as indices ``w_idx`` into ``w_c``, the bias, and optionally ``act``,
the levels the layer's pre-activation is snapped to before the ReLU.

Two ways to run a codebook:
* ``float_forward``: a float network whose inputs and weights are replaced by
  their centroids (ordinary matmul/conv; also the retraining forward, with
  straight-through rounding);
* ``emulate``: the in-memory datapath -- every multiplication a lookup into
  the layer's (u x w) table of centroid products, accumulation of looked-up
  values (float32 or fixed point), ReLU folded into the nearest-centroid search
  that encodes a layer's output for the next layer, max-pooling on the codes
  (codes are ordered like values because ``in_c`` is sorted).
Up to float summation order the two agree; a test pins that.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from accel import codebooks
from accel.kmeans import kmeans, nearest_sorted
from accel.program import Op, linear_layers
from core.models import cnn

Codebook = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RapidConfig:
  u: int = 16                      # input clusters per layer
  w: int = 16                      # weight clusters per layer
  act_levels: int | None = None    # None: exact ReLU before the next encoding
  calib_points: int = 65536        # input values sampled per layer to cluster
  seed: int = 0

  def __post_init__(self):
    for f in ("u", "w", "calib_points", "seed", "act_levels"):
      v = getattr(self, f)
      if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
        raise TypeError(f"RapidConfig.{f} must be an integer, got {v!r}")
    if self.u < 1 or self.w < 1:
      raise ValueError(f"u and w must be >= 1 clusters, got u={self.u}, w={self.w}")
    if self.act_levels is not None and self.act_levels < 2:
      raise ValueError(f"act_levels must be None or >= 2, got {self.act_levels}")
    if self.calib_points < 1:
      raise ValueError(f"calib_points must be >= 1, got {self.calib_points}")


def _snap(x: jax.Array, c_sorted: jax.Array) -> jax.Array:
  """Nearest centroid value (``nearest_sorted`` is tested against a brute-force argmin)."""
  return c_sorted[nearest_sorted(x, c_sorted)]


def _next_linear(ops: tuple[Op, ...], i: int) -> str | None:
  return next((op[1] for op in ops[i + 1:] if op[0] in ("conv", "dense")), None)


def float_forward(cb: Codebook, ops: tuple[Op, ...], x: jax.Array, *, ste: bool = False,
                  collect: bool = False):
  """The centroid-substituted float network. ``ste``: straight-through rounding
  (for retraining). ``collect``: also return each linear layer's input and
  pre-activation (used by ``build`` on a codebook that holds raw weights)."""
  q = lambda v, c: v + jax.lax.stop_gradient(_snap(v, c) - v) if ste else _snap(v, c)
  h, seen, last = x, {}, None
  for op in ops:
    kind = op[0]
    if kind in ("conv", "dense"):
      p = cb[op[1]]
      hq = h if "in_c" not in p else q(h, p["in_c"])
      kernel = p["kernel"] if "kernel" in p else p["w_c"][p["w_idx"]]
      seen[op[1]] = {"input": h}
      h = cnn.conv2d(hq, kernel, p["bias"]) if kind == "conv" else hq @ kernel + p["bias"]
      seen[op[1]]["pre"] = h
      last = op[1]
    elif kind == "relu":
      if "act" in cb[last]:
        h = q(h, cb[last]["act"])
      h = jax.nn.relu(h)
    elif kind == "pool":
      h = cnn.max_pool_2x2(h)
    elif kind == "flatten":
      h = h.reshape(h.shape[0], -1)
  return (h, seen) if collect else h


def _fit_1d(values: np.ndarray, k: int, cfg: RapidConfig, salt: int) -> np.ndarray:
  """Sorted centroids of a layer's values (``accel.codebooks.fit_activation``)."""
  return codebooks.fit_activation(values, k, cfg.seed, salt, cfg.calib_points)


def check_layers(tree: dict, ops: tuple[Op, ...], what: str) -> None:
  """A clear error unless ``tree`` has an entry for every linear layer of ``ops``
  (e.g. params of a 2-layer MLP with the op list of a 3-layer one)."""
  missing = [n for n in linear_layers(ops) if n not in tree]
  if missing:
    raise ValueError(f"{what} lack the layers {missing} that the op list needs (it has "
                     f"{linear_layers(ops)}, {what} have {sorted(tree)}): were ops made "
                     "from this model's config?")


def layer_activations(params: dict, ops: tuple[Op, ...], x_calib: np.ndarray) -> dict:
  """{layer: {'input', 'pre'}}: each linear layer's float input and pre-activation
  on ``x_calib`` -- what ``build`` clusters; independent of (u, w)."""
  raw = {name: {"kernel": params[name]["kernel"], "bias": params[name]["bias"]}
         for name in linear_layers(ops)}
  return jax.jit(functools.partial(float_forward, ops=ops, collect=True))(raw, x=x_calib)[1]


def build(params: dict, ops: tuple[Op, ...], x_calib: np.ndarray | None, cfg: RapidConfig, *,
          activations: dict | None = None) -> Codebook:
  """Clusters each linear layer's kernel (w) and float-network input (u) on
  ``x_calib``, or on ``activations`` from ``layer_activations`` when building
  many codebooks from the same calibration set."""
  check_layers(params, ops, "params")
  if activations is None and x_calib is None:
    raise ValueError("build needs calibration inputs: pass x_calib (a batch of training "
                     "images) or activations from layer_activations")
  seen = activations if activations is not None else layer_activations(params, ops, x_calib)
  check_layers(seen, ops, "activations")
  cb: Codebook = {}
  for i, name in enumerate(linear_layers(ops)):
    kernel = np.asarray(params[name]["kernel"])
    if cfg.w > kernel.size:
      raise ValueError(f"{name}: w={cfg.w} clusters exceed its {kernel.size} weights")
    km = kmeans(kernel.reshape(-1), cfg.w, seed=cfg.seed + 1000 + i)
    entry = {"in_c": _fit_1d(np.asarray(seen[name]["input"]), cfg.u, cfg, i),
             "w_c": km.centroids, "w_idx": km.labels.reshape(kernel.shape).astype(np.int32),
             "bias": np.asarray(params[name]["bias"])}
    if cfg.act_levels and name != linear_layers(ops)[-1]:
      entry["act"] = _fit_1d(np.asarray(seen[name]["pre"]), cfg.act_levels, cfg, 500 + i)
    cb[name] = jax.tree.map(jnp.asarray, entry)
  return cb


def product_rows(table, w_idx_KxN, frac_bits=None):
  """(u+1, K, N): row [i, k] holds table[i, w_idx[k, :]] -- the products of input
  code i with the weights at tap k, read from the layer's (u x w) table. Row u
  (the padding sentinel) is zero. With ``frac_bits`` the table stores
  fixed-point products and the adders are integer."""
  t = jnp.concatenate([table, jnp.zeros((1, table.shape[1]), table.dtype)])
  if frac_bits is not None:
    t = jnp.round(t * 2.0 ** frac_bits).astype(jnp.int32)
  return t[:, w_idx_KxN]


def _lookup_sum(idx_in, rows, frac_bits):
  """sum_k table[idx_in[..., k], w_idx[k, n]]: one row read per input value and
  tap, then accumulation. ``idx_in`` (..., K) may hold the sentinel u."""
  k = rows.shape[1]
  s = jnp.sum(rows[idx_in, jnp.arange(k)], axis=-2)             # (..., N)
  return s.astype(jnp.float32) / 2.0 ** frac_bits if frac_bits is not None else s


def _patches_3x3(idx_HxWxC, sentinel):
  """SAME 3x3 windows of codes, ordered (kh, kw, cin) like an HWIO kernel."""
  h, w, _ = idx_HxWxC.shape
  p = jnp.pad(idx_HxWxC, ((1, 1), (1, 1), (0, 0)), constant_values=sentinel)
  return jnp.concatenate([p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], -1)


def _emulate_one(cb: Codebook, rows: dict, x, ops: tuple[Op, ...], frac_bits):
  """One example through the lookup datapath; returns logits."""
  codes, acc = None, x
  for i, op in enumerate(ops):
    kind = op[0]
    if kind in ("conv", "dense"):
      p = cb[op[1]]
      if codes is None:  # only the network input arrives unencoded (programs put a ReLU
        codes = nearest_sorted(acc, p["in_c"])  # between linear layers)
      u = p["in_c"].shape[0]
      idx = _patches_3x3(codes, u) if kind == "conv" else codes
      acc = _lookup_sum(idx, rows[op[1]], frac_bits) + p["bias"]
      codes = None
      last = op[1]
    elif kind == "relu":
      z = acc
      if "act" in cb[last]:
        z = cb[last]["act"][nearest_sorted(z, cb[last]["act"])]
      # ReLU and the next layer's encoding are one nearest search over its centroids.
      codes = nearest_sorted(jnp.maximum(z, 0.0), cb[_next_linear(ops, i)]["in_c"])
    elif kind == "pool":
      codes = jax.lax.reduce_window(codes, jnp.iinfo(jnp.int32).min, jax.lax.max,
                                    (2, 2, 1), (2, 2, 1), "VALID")
    elif kind == "flatten":
      if codes is None:
        acc = acc.reshape(-1)
      else:
        codes = codes.reshape(-1)
  return acc


def emulate(cb: Codebook, x_BxHxWxC: jax.Array, ops: tuple[Op, ...],
            frac_bits: int | None = None, chunk: int = 4) -> jax.Array:
  """Logits (B, classes) of the lookup datapath, vmapped over ``chunk`` examples at a
  time (small chunks are fastest on CPU: the row gathers stay in cache).
  ``x_BxHxWxC`` is a batch of images (B, H, W, C), MLP inputs included."""
  check_layers(cb, ops, "codebook")
  shape = getattr(x_BxHxWxC, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"emulate expects images (B, H, W, C), got shape {shape}; add the "
                     "channel axis with x[..., None]")
  first = cb[linear_layers(ops)[0]]["w_idx"]
  if ops[0][0] == "conv" and first.shape[2] != shape[3]:
    raise ValueError(f"the first conv expects {first.shape[2]} input channels, got {shape[3]}")
  if ops[0][0] != "conv" and first.shape[0] != int(np.prod(shape[1:])):
    raise ValueError(f"the first dense layer expects {first.shape[0]} inputs per example, "
                     f"got {shape[1:]}")
  if frac_bits is not None and not 0 <= frac_bits <= 20:
    raise ValueError(f"frac_bits must be None or in [0, 20], got {frac_bits}")
  return _emulate(cb, x_BxHxWxC, ops, frac_bits, chunk)


@functools.partial(jax.jit, static_argnames=("ops", "frac_bits", "chunk"))
def _emulate(cb: Codebook, x_BxHxWxC: jax.Array, ops: tuple[Op, ...],
             frac_bits: int | None, chunk: int) -> jax.Array:
  rows = {}
  for name, p in cb.items():
    table = p["in_c"][:, None] * p["w_c"][None, :]               # (u, w) centroid products
    rows[name] = product_rows(table, p["w_idx"].reshape(-1, p["w_idx"].shape[-1]), frac_bits)
  return jax.lax.map(lambda xi: _emulate_one(cb, rows, xi, ops, frac_bits), x_BxHxWxC,
                     batch_size=chunk)
