"""Codebooks for the operands of every linear op of any model
(``accel.graph``), fitted on what the float model multiplies on calibration
inputs (``accel.interpret.operands``): one scalar codebook per operand, sorted.

* A stored weight (an operand that depends on params alone) is clustered
  whole with ``accel.kmeans`` into at most one centroid per distinct weight.
* An activation -- a layer's input, or either side of attention's Q.K^T and
  P.V -- is clustered on its calibration values: weighted k-means on the
  distinct values when there are few (pixels), else on a sample.

RAPIDNN gives activations ``u`` entries and weights ``w`` (its (u x w) product
table); CodeX gives every operand its own width of 1..8 bits, assembled from a
``Bank`` fitted once. The seeds follow the op order exactly as the MLP/CNN
builders of ``accel.rapidnn`` / ``accel.codex.encoding`` did, so both
reproduce through this path.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from accel.graph import Graph, LinearOp
from accel.interpret import Encoding
from accel.kmeans import kmeans

MAX_BITS = 8
FULL_PRECISION_BITS = 16   # what an unencoded operand costs (16-bit fixed point)
SIDES = ("lhs", "rhs")
Bits = dict[str, tuple[int | None, int | None]]   # op -> (lhs bits, rhs bits); None: float


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """How codebooks are fitted. ``calib_points`` / ``weight_points``:
  activations / weights are clustered on a draw of this many when there are
  more (k-means++ seeding is linear in the points per centre: MiniLM's 590k
  MLP weights took 3.2 s per width, a 65,536 draw 0.16 s; every value is
  still encoded to its nearest entry). ``tail``: the share of values at each
  end always kept in a draw (``_draw``). ``seed_per_op``: each op's k-means
  seeded by its place in the graph."""
  seed: int = 0
  calib_points: int = 65536
  tail: float = 0.001
  weight_points: int | None = 65536
  seed_per_op: bool = True

  def __post_init__(self):
    if not 0 <= self.tail < 0.5:
      raise ValueError(f"tail must be in [0, 0.5), got {self.tail}")
    if self.calib_points < 1 or (self.weight_points is not None and self.weight_points < 1):
      raise ValueError("calib_points and weight_points must be >= 1")

  @classmethod
  def mlp_cnn(cls, seed: int = 0, calib_points: int = 65536, per_op: bool = True) -> "FitConfig":
    """As the MLP/CNN builders of issues 12-13 fitted (every weight clustered,
    activations drawn plainly; the CodeX bank seeded every layer alike,
    ``per_op=False``): their results reproduce through this path."""
    return cls(seed, calib_points, 0.0, None, per_op)


def _draw(v: np.ndarray, points: int, tail: float, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray | None]:
  """``points`` values drawn from ``v`` and their k-means weights. ``tail`` > 0:
  every value beyond the ``tail`` and 1 - ``tail`` quantiles is kept, and the
  body drawn and weighted to its share: rare outliers (a transformer's outlier
  features and weights) are otherwise missed by the draw and clipped to the
  largest entry."""
  if tail <= 0:
    return rng.choice(v, points, replace=False), None
  lo, hi = np.quantile(v, [tail, 1.0 - tail])
  ends, body = v[(v < lo) | (v > hi)], v[(v >= lo) & (v <= hi)]
  drawn = rng.choice(body, min(points, len(body)), replace=False)
  w = np.concatenate([np.full(len(drawn), len(body) / len(drawn), np.float32),
                      np.ones(len(ends), np.float32)])
  return np.concatenate([drawn, ends]), w


def fit_weight(values: np.ndarray, k: int, seed: int, points: int | None = None,
               tail: float = 0.0) -> np.ndarray:
  """Sorted centroids of a stored weight: k-means on every value (or on
  ``points`` drawn, tails kept, when there are more), ``k`` capped at the
  number of values."""
  v = np.asarray(values, np.float32).reshape(-1)
  w = None
  if points is not None and v.size > points:
    v, w = _draw(v, points, tail, np.random.default_rng([seed, 7]))
  return np.sort(kmeans(v, min(k, v.size), seed=seed, weights=w).centroids)


def fit_activation(values: np.ndarray, k: int, seed: int, salt: int,
                   calib_points: int = 65536, tail: float = 0.0) -> np.ndarray:
  """Sorted centroids of calibration activations. Few distinct values
  (pixels): weighted k-means on the distinct values (fewer than ``k``: each
  its own entry, the last repeated); many: k-means on ``calib_points`` drawn
  (``_draw``: with ``tail``, MiniLM's 8-bit embedding error fell from
  1 - cos 0.0061 to 0.0004; its outlier features reach 9.8 where 99.9% of
  values lie within 3.5)."""
  v = np.asarray(values, np.float32).reshape(-1)
  uniq, counts = np.unique(v, return_counts=True)
  if len(uniq) <= calib_points:
    if k > len(uniq):
      return np.sort(np.concatenate([uniq, np.full(k - len(uniq), uniq[-1])]))
    res = kmeans(uniq, k, seed=seed + salt, weights=counts)
  else:
    pts, w = _draw(v, calib_points, tail, np.random.default_rng([seed, salt]))
    res = kmeans(pts, k, seed=seed + salt, weights=w)
  return np.sort(res.centroids)


def _fit(op: LinearOp, i: int, side: str, values: np.ndarray, k: int, fit: FitConfig
         ) -> np.ndarray:
  """Operand ``side`` of ``op``, the i-th op: seeds as the MLP/CNN builders had them."""
  i = i if fit.seed_per_op else 0
  if op.weight_side == side:
    return fit_weight(values, k, fit.seed + 1000 + i, fit.weight_points, fit.tail)
  return fit_activation(values, k, fit.seed, i if side == "lhs" else 2000 + i, fit.calib_points,
                        fit.tail)


def _operands_of(graph: Graph, operands: dict) -> None:
  missing = [o.name for o in graph.ops if o.name not in operands]
  if missing:
    raise ValueError(f"no calibration operands for ops {missing[:3]}: were they recorded "
                     "from this model (accel.interpret.operands)?")


def rapidnn(graph: Graph, operands: dict, u: int, w: int, *, fit: FitConfig = FitConfig(),
            ops: Iterable[str] | None = None) -> Encoding:
  """RAPIDNN's codebooks: ``u`` entries per activation operand, ``w`` per stored
  weight, for every op (or those named in ``ops``)."""
  if u < 1 or w < 1:
    raise ValueError(f"u and w must be >= 1, got u={u}, w={w}")
  _operands_of(graph, operands)
  want = set(ops) if ops is not None else None
  books = {}
  for i, op in enumerate(graph.ops):
    if want is not None and op.name not in want:
      continue
    books[op.name] = {
        side: jnp.asarray(_fit(op, i, side, operands[op.name][j],
                               w if op.weight_side == side else u, fit))
        for j, side in enumerate(SIDES)}
  return Encoding(graph.fingerprint, books, f"RAPIDNN u={u} w={w}")


class Bank:
  """Every operand's codebook at every width in ``widths`` (default 1..8),
  fitted once: an operand's codebook depends only on its own calibration
  values, so any per-operand configuration is assembled without clustering
  again (what makes a search over hundreds of configurations cheap)."""

  def __init__(self, graph: Graph, operands: dict, *, fit: FitConfig = FitConfig(),
               widths: Iterable[int] = range(1, MAX_BITS + 1)):
    _operands_of(graph, operands)
    self.graph, self.widths = graph, tuple(widths)
    for b in self.widths:
      check_bits(b, "a bank width")
    self._bank = {(op.name, side, b): _fit(op, i, side, operands[op.name][j], 2 ** b, fit)
                  for i, op in enumerate(graph.ops) for j, side in enumerate(SIDES)
                  for b in self.widths}

  def encoding(self, bits: Bits, pad: bool = False) -> Encoding:
    """The codebooks of ``bits`` ({op: (lhs bits, rhs bits)}; an op left out,
    or a width of None, stays float). ``pad``: every codebook padded to 2^8
    entries with +inf (never the nearest), so all configurations share array
    shapes and the jitted model compiles once for a whole search."""
    check_config(self.graph, bits)
    books = {}
    for name, widths in bits.items():
      entry = {}
      for side, b in zip(SIDES, widths):
        if b is None:
          continue
        if b not in self.widths:
          raise ValueError(f"{name}: {side} width {b} is not in this bank ({self.widths})")
        c = self._bank[(name, side, b)]
        if pad:
          c = np.pad(c, (0, 2 ** MAX_BITS - len(c)), constant_values=np.inf)
        entry[side] = jnp.asarray(c, jnp.float32)
      if entry:
        books[name] = entry
    return Encoding(self.graph.fingerprint, books, label(bits))


def check_bits(b, what: str) -> int:
  """``b`` as an int, or a clear error unless it is an integer in 1..MAX_BITS."""
  if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= MAX_BITS:
    raise ValueError(f"{what} must be an integer number of bits in 1..{MAX_BITS}, got {b!r}")
  return int(b)


def check_config(graph: Graph, bits: Bits) -> None:
  """A clear error for widths naming ops this model does not have, or bad widths."""
  graph.check_ops(bits, "bit widths")
  for name, widths in bits.items():
    if len(widths) != 2:
      raise ValueError(f"{name}: widths are (lhs bits, rhs bits), got {widths!r}")
    for side, b in zip(SIDES, widths):
      if b is not None:
        check_bits(b, f"{name} {side} bits")


def uniform(graph: Graph, bits: int, *, weight_only: bool = False) -> Bits:
  """Every operand of every op at ``bits`` (``weight_only``: activations float;
  activation x activation ops then stay float entirely)."""
  out = {}
  for op in graph.ops:
    out[op.name] = tuple(bits if (op.weight_side == s or not weight_only) else None
                         for s in SIDES)
  return out


def label(bits: Bits) -> str:
  ws = sorted({b for w in bits.values() for b in w}, key=lambda b: (b is None, b))
  return "float" if not bits else f"{len(bits)} ops at " + "/".join(
      "-" if b is None else str(b) for b in ws) + " bits"


def average_bits(graph: Graph, bits: Bits) -> dict[str, float]:
  """Element-weighted mean width of the stored weights (each counted once) and
  of the activation operands (per traced call); float operands count as
  ``FULL_PRECISION_BITS``."""
  w_n = w_b = a_n = a_b = 0.0
  for op in graph.ops:
    widths = bits.get(op.name, (None, None))
    for side, shape, b in zip(SIDES, (op.lhs_shape, op.rhs_shape), widths):
      n = float(np.prod(shape))
      b = FULL_PRECISION_BITS if b is None else b
      if op.weight_side == side:
        w_n, w_b = w_n + n, w_b + n * b
      else:
        a_n, a_b = a_n + n, a_b + n * b
  return {"weights": w_b / max(w_n, 1), "activations": a_b / max(a_n, 1)}


@dataclasses.dataclass(frozen=True)
class OpCount:
  name: str
  multiplies: int
  on_datapath: bool      # both operands encoded: every multiply is a lookup / decode-multiply


def accounting(graph: Graph, enc: Encoding) -> tuple[tuple[OpCount, ...], dict[str, int]]:
  """Per op and in total, the multiplies done on the datapath (both operands
  encoded) vs in float, from the jaxpr's counts (``accel.graph``)."""
  rows = tuple(OpCount(o.name, o.multiplies, all(s in enc.books.get(o.name, {}) for s in SIDES))
               for o in graph.ops)
  on = sum(r.multiplies for r in rows if r.on_datapath)
  total = sum(r.multiplies for r in rows)
  return rows, {"datapath": on, "float": total - on, "total": total}
