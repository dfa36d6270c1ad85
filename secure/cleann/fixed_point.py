"""A fixed-point emulator of CLEANN's OMP / reconstruction datapath.

Three word lengths are the knobs, each a signed fixed-point format whose
integer part is sized once from the benign calibration data (what a hardware
designer does; values beyond the range saturate):

* ``dict_bits``: the dictionary and its Gram matrix (entries in [-1, 1]);
* ``resid_bits``: the input, the correlations D x and the reconstruction;
* ``factor_bits``: the Cholesky factor and the least-squares coefficients.

The emulation runs the same Gram-Cholesky OMP as ``secure.sparse.omp`` with
every stored quantity rounded to its format (round to nearest, saturate).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from secure import sparse
from secure.cleann import analyzers


@dataclasses.dataclass(frozen=True)
class FixedPoint:
  dict_bits: int = 16
  resid_bits: int = 16
  factor_bits: int = 16

  def __post_init__(self):
    for f in ("dict_bits", "resid_bits", "factor_bits"):
      if not 2 <= getattr(self, f) <= 32:
        raise ValueError(f"{f} must lie in [2, 32], got {getattr(self, f)}")


def int_bits(max_abs: float) -> int:
  """Integer bits (excluding sign) so that ``max_abs`` fits."""
  return max(0, int(np.ceil(np.log2(max(max_abs, 1e-12) + 1e-12))))


def quantize(a, bits: int, ibits: int):
  """Round to a signed fixed-point format with ``bits`` in all (one sign bit,
  ``ibits`` integer bits, the rest fractional), saturating."""
  frac = bits - 1 - ibits
  step = 2.0 ** -frac
  top = 2.0 ** ibits - step
  return jnp.clip(jnp.round(a / step) * step, -top - step, top)


@functools.partial(jax.jit, static_argnames=("n_nonzero", "fmt", "ranges"))
def _omp_fixed(x_NxF, d_KxF, n_nonzero: int, fmt: FixedPoint, ranges: tuple[int, int]):
  r_i, c_i = ranges
  qd = lambda a: quantize(a, fmt.dict_bits, 0)
  qr = lambda a: quantize(a, fmt.resid_bits, r_i)
  qc = lambda a: quantize(a, fmt.factor_bits, c_i)
  d = qd(d_KxF)
  x = qr(x_NxF)
  gram = qd(d @ d.T)
  xy = qr(x @ d.T)
  norms = qr(jnp.sum(x * x, axis=1))
  one = functools.partial(sparse._omp_one, q_factor=qc, q_coef=qc)
  codes = jax.vmap(one, in_axes=(0, 0, None, None, None))(xy, norms, gram, n_nonzero,
                                                           jnp.float32(-1.0))
  return codes, qr(codes @ d)


def calibrate_ranges(an: analyzers.InputAnalyzer, x_benign) -> tuple[int, int]:
  """Integer bits of the residual-path and coefficient formats, from the
  benign images' DCT patches and their float OMP coefficients."""
  p = np.asarray(analyzers.dct_patches(x_benign, an.patch))
  p = p.reshape(-1, p.shape[-1])
  codes = np.asarray(sparse.omp(p, an.dictionary, an.n_nonzero))
  corr = p @ an.dictionary.T
  norms = (p * p).sum(1)
  return (int_bits(max(np.abs(corr).max(), np.abs(p).max(), norms.max())),
          int_bits(np.abs(codes).max()))


@dataclasses.dataclass(frozen=True)
class FixedPointAnalyzer:
  """The input analyzer with its OMP and reconstruction in fixed point."""
  analyzer: analyzers.InputAnalyzer
  fmt: FixedPoint
  ranges: tuple[int, int]

  def _run(self, x):
    an = self.analyzer
    p = analyzers.dct_patches(x, an.patch)
    n, np_, s = p.shape
    codes, rec = _omp_fixed(p.reshape(n * np_, s), jnp.asarray(an.dictionary, jnp.float32),
                            an.n_nonzero, self.fmt, self.ranges)
    return p, rec.reshape(n, np_, s)

  def score(self, x) -> np.ndarray:
    p, rec = self._run(np.asarray(x, np.float32))
    r = np.asarray(jnp.sum((p - rec) ** 2, axis=-1))
    return self.analyzer._relative(r).max(axis=1)

  def reconstruct(self, x) -> np.ndarray:
    """Fixed-point reconstruction with the float analyzer's excision rule."""
    x = np.asarray(x, np.float32)
    p, rec = self._run(x)
    r = self.analyzer._relative(np.asarray(jnp.sum((p - rec) ** 2, axis=-1)))
    if self.analyzer.mean_patches is not None:
      mean = analyzers.to_dct(jnp.asarray(self.analyzer.mean_patches)[None],
                              self.analyzer.patch.size)
      rec = jnp.where((r > 1.0)[..., None], mean, rec)
    return np.clip(np.asarray(analyzers.images_from_dct(rec, x.shape[1:3], self.analyzer.patch)),
                   0, 1)
