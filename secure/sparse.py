"""Sparse coding in JAX for the secure/ methods (CLEANN's analyzers, CuRTAIL's
input defenders): batched orthogonal matching pursuit and dictionary learning.

Conventions follow scikit-learn, the reference these are tested against:
a dictionary is (K atoms, F features) with unit-norm rows, signals are rows of
X (N, F), codes are (N, K) and X ~ codes @ D.

``omp`` is Gram-based OMP with Cholesky updates (the algorithm of
``sklearn.linear_model.orthogonal_mp_gram``), jitted and vmapped over
thousands of signals at once. ``learn_dictionary`` alternates OMP sparse
coding with the approximate K-SVD atom update (Rubinstein, Zibulevsky & Elad,
"Efficient implementation of the K-SVD algorithm using batch orthogonal
matching pursuit", Technion CS-2008-08): one power-iteration step per atom on
the residual of the signals that use it. Deterministic under a seed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _identity(a):
  return a


def _solve_lower(L_kxk, b_k):
  """L w = b for lower-triangular L by forward substitution, a loop over the k
  rows: vmapped, each row is one vector op over all signals, where XLA:CPU runs
  a vmapped ``solve_triangular`` as a tiny kernel per signal (87 of 150 ms of
  OMP on 84,500 4x4 patches). A loop, not unrolled rows: unrolling tripled the
  compile time at k = 12."""
  row = lambda r, w: w.at[r].set((b_k[r] - jnp.dot(L_kxk[r], w)) / L_kxk[r, r])
  return jax.lax.fori_loop(0, b_k.shape[0], row, jnp.zeros_like(b_k))


def _solve_upper_t(L_kxk, y_k):
  """L^T g = y by back substitution (``_solve_lower``'s transpose)."""
  k = y_k.shape[0]
  row = lambda i, g: g.at[k - 1 - i].set((y_k[k - 1 - i] - jnp.dot(L_kxk[:, k - 1 - i], g))
                                         / L_kxk[k - 1 - i, k - 1 - i])
  return jax.lax.fori_loop(0, k, row, jnp.zeros_like(y_k))


def _omp_one(xy_K, x_norm2, gram_KxK, k: int, tol, q_factor=_identity, q_coef=_identity):
  """OMP for one signal from its correlations ``xy`` = D x. Fixed-size arrays:
  L is the Cholesky factor of the selected atoms' Gram matrix, padded with the
  identity, so triangular solves over all k slots leave unused slots at zero.
  ``q_factor`` / ``q_coef`` round the factor and the coefficients (identity in
  floating point; a fixed-point datapath passes its quantisers)."""
  n_atoms = gram_KxK.shape[0]
  eps = jnp.finfo(xy_K.dtype).eps

  def solve(L, idx, active):
    rhs = jnp.where(active, xy_K[idx], 0.0)
    return q_coef(_solve_upper_t(L, q_coef(_solve_lower(L, rhs))))

  def body(i, carry):
    L, idx, active, gamma, done = carry
    coef = jnp.zeros(n_atoms, xy_K.dtype).at[idx].add(jnp.where(active, gamma, 0.0))
    corr = jnp.abs(xy_K - gram_KxK @ coef)
    corr = jnp.where(jnp.zeros(n_atoms, bool).at[idx].max(active), -jnp.inf, corr)
    j = jnp.argmax(corr)
    v = jnp.where(active, gram_KxK[idx, j], 0.0)
    w = q_factor(_solve_lower(L, v))
    diag2 = gram_KxK[j, j] - jnp.dot(w, w)
    # A new atom (numerically) in the span of the chosen ones ends the pursuit,
    # as in scikit-learn; so does reaching the residual tolerance.
    stop = done | (diag2 <= eps) | (corr[j] <= 0)
    new_L = L.at[i].set(jnp.where(jnp.arange(k) < i, w, 0.0)).at[i, i].set(
        q_factor(jnp.sqrt(jnp.maximum(diag2, eps))))
    new_idx, new_active = idx.at[i].set(j), active.at[i].set(True)
    new_gamma = solve(new_L, new_idx, new_active)
    L, idx, active, gamma = jax.tree.map(lambda a, b: jnp.where(stop, a, b),
                                         (L, idx, active, gamma),
                                         (new_L, new_idx, new_active, new_gamma))
    resid2 = x_norm2 - jnp.dot(jnp.where(active, xy_K[idx], 0.0), gamma)
    done = stop | (resid2 <= tol)
    return L, idx, active, gamma, done

  init = (jnp.eye(k, dtype=xy_K.dtype), jnp.zeros(k, jnp.int32), jnp.zeros(k, bool),
          jnp.zeros(k, xy_K.dtype), x_norm2 <= tol)
  _, idx, active, gamma, _ = jax.lax.fori_loop(0, k, body, init)
  return jnp.zeros(n_atoms, xy_K.dtype).at[idx].add(jnp.where(active, gamma, 0.0))


def omp_traced(x_NxF, d_KxF, n_nonzero: int, tol=-1.0) -> jax.Array:
  """``omp`` without checks, chunking or jit, for use inside a traced function
  (jit, vmap, shard_map, grad-free paths): codes (N, K) of the rows of ``x``;
  ``tol`` < 0 means fixed sparsity."""
  gram = d_KxF @ d_KxF.T
  xy = x_NxF @ d_KxF.T
  norms = jnp.sum(x_NxF * x_NxF, axis=1)
  return jax.vmap(_omp_one, in_axes=(0, 0, None, None, None))(
      xy, norms, gram, n_nonzero, jnp.asarray(tol, x_NxF.dtype))


@functools.partial(jax.jit, static_argnames=("n_nonzero",))
def _omp(x_NxF, d_KxF, n_nonzero: int, tol):
  return omp_traced(x_NxF, d_KxF, n_nonzero, tol)


def _check_signals(x, d) -> tuple[np.ndarray | jax.Array, np.ndarray | jax.Array]:
  if getattr(d, "ndim", None) != 2 or d.shape[0] < 1:
    raise ValueError(f"dictionary must be (atoms, features), got shape {getattr(d, 'shape', None)}")
  if getattr(x, "ndim", None) != 2 or x.shape[1] != d.shape[1]:
    raise ValueError(f"signals must be (N, {d.shape[1]}) for a dictionary of {d.shape[1]} "
                     f"features, got shape {getattr(x, 'shape', None)}")
  for name, a in (("signals", x), ("dictionary", d)):
    if not isinstance(a, jax.core.Tracer) and not np.isfinite(np.asarray(a)).all():
      raise ValueError(f"{name} contain NaN or inf")
  return x, d


def _buckets(n: int, chunk: int) -> list[tuple[int, int, int]]:
  """(start, stop, padded size) pieces covering [0, n): full chunks of ``chunk``,
  then the rest padded to the next power of two (at least 1024, which costs
  little next to a compile), so a stream of calls with varying N compiles a
  handful of shapes, not one per N."""
  out = [(i, i + chunk, chunk) for i in range(0, n - n % chunk, chunk)]
  if n % chunk:
    start = n - n % chunk
    out.append((start, n, min(chunk, max(1024, 1 << (n - start - 1).bit_length()))))
  return out


def omp(x_NxF, d_KxF, n_nonzero: int, tol: float | None = None, chunk: int = 4096
        ) -> jax.Array:
  """Sparse codes (N, K) of the rows of ``x`` in the dictionary ``d`` (unit-norm
  rows): greedy OMP with at most ``n_nonzero`` atoms per signal, stopping
  earlier once the squared residual norm is at most ``tol``. Signals are coded
  ``chunk`` at a time (zero rows pad the last piece; a zero signal codes to
  zero), which bounds memory and the number of compiled shapes."""
  x_NxF, d_KxF = _check_signals(jnp.asarray(x_NxF, jnp.float32), jnp.asarray(d_KxF, jnp.float32))
  if isinstance(n_nonzero, bool) or not isinstance(n_nonzero, (int, np.integer)):
    raise TypeError(f"n_nonzero must be an integer, got {n_nonzero!r}")
  if not 1 <= n_nonzero <= min(d_KxF.shape):
    raise ValueError(f"n_nonzero={n_nonzero} must lie in [1, {min(d_KxF.shape)}] for a "
                     f"dictionary of {d_KxF.shape[0]} atoms of {d_KxF.shape[1]} features")
  if tol is not None and not tol >= 0:
    raise ValueError(f"tol must be >= 0 (a squared residual norm), got {tol}")
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  tol_ = jnp.float32(-1.0 if tol is None else tol)
  pieces = []
  for start, stop, size in _buckets(x_NxF.shape[0], chunk):
    xs = jnp.pad(x_NxF[start:stop], ((0, size - (stop - start)), (0, 0)))
    pieces.append(_omp(xs, d_KxF, int(n_nonzero), tol_)[:stop - start])
  if not pieces:
    return jnp.zeros((0, d_KxF.shape[0]), jnp.float32)
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def reconstruction_error(x_NxF, d_KxF, codes_NxK, relative: bool = True) -> jax.Array:
  """Per-signal squared residual ||x - codes D||^2 (divided by ||x||^2 if ``relative``)."""
  r = jnp.sum((x_NxF - codes_NxK @ d_KxF) ** 2, axis=1)
  return r / jnp.maximum(jnp.sum(x_NxF * x_NxF, axis=1), 1e-12) if relative else r


@dataclasses.dataclass(frozen=True)
class DictConfig:
  n_atoms: int = 256
  n_nonzero: int = 5     # OMP sparsity while learning
  iters: int = 20        # sparse-coding / atom-update rounds
  seed: int = 0

  def __post_init__(self):
    if self.n_atoms < 1 or self.n_nonzero < 1 or self.iters < 0:
      raise ValueError(f"need n_atoms, n_nonzero >= 1 and iters >= 0, got {self}")


def _normalise(d):
  return d / jnp.maximum(jnp.linalg.norm(d, axis=1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("n_nonzero", "iters"))
def _ksvd(x_NxF, d0_KxF, n_nonzero: int, iters: int):
  def atom_update(j, carry):
    d, codes = carry
    g = codes[:, j]
    used = g != 0
    # Residual without atom j, restricted to the signals that use it.
    e = jnp.where(used[:, None], x_NxF - codes @ d + g[:, None] * d[j][None], 0.0)
    atom = e.T @ g
    norm = jnp.linalg.norm(atom)
    # An unused atom is replaced by the worst-represented signal (normalised).
    worst = jnp.argmax(jnp.sum((x_NxF - codes @ d) ** 2, axis=1))
    new_atom = jnp.where(norm > 1e-12, atom / jnp.maximum(norm, 1e-12),
                         x_NxF[worst] / jnp.maximum(jnp.linalg.norm(x_NxF[worst]), 1e-12))
    new_g = jnp.where(used, e @ new_atom, 0.0)
    return d.at[j].set(new_atom), codes.at[:, j].set(new_g)

  def round_(d, _):
    codes = jax.vmap(_omp_one, in_axes=(0, 0, None, None, None))(
        x_NxF @ d.T, jnp.sum(x_NxF ** 2, 1), d @ d.T, n_nonzero, jnp.float32(-1.0))
    d, codes = jax.lax.fori_loop(0, d.shape[0], atom_update, (d, codes))
    err = jnp.mean(jnp.sum((x_NxF - codes @ d) ** 2, axis=1))
    return d, err

  return jax.lax.scan(round_, d0_KxF, None, length=iters)


def learn_dictionary(x_NxF, cfg: DictConfig) -> tuple[np.ndarray, np.ndarray]:
  """A dictionary (K, F) with unit-norm atoms for the rows of ``x``, by
  approximate K-SVD; initialised from ``n_atoms`` distinct training signals
  chosen by the seed. Returns (dictionary, mean squared error per round)."""
  x = np.asarray(x_NxF, np.float32)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"learn_dictionary needs a non-empty (N, F) array, got shape {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("training signals contain NaN or inf")
  if cfg.n_atoms > len(x):
    raise ValueError(f"{cfg.n_atoms} atoms need at least as many training signals, got {len(x)}")
  if cfg.n_nonzero > min(cfg.n_atoms, x.shape[1]):
    raise ValueError(f"n_nonzero={cfg.n_nonzero} exceeds min(atoms, features) = "
                     f"{min(cfg.n_atoms, x.shape[1])}")
  rng = np.random.default_rng(cfg.seed)
  pick = rng.choice(len(x), cfg.n_atoms, replace=False)
  # Near-zero signals make useless atoms: perturb them into general position.
  d0 = x[pick] + 1e-3 * rng.standard_normal((cfg.n_atoms, x.shape[1])).astype(np.float32)
  d, errs = _ksvd(jnp.asarray(x), _normalise(jnp.asarray(d0)), cfg.n_nonzero, cfg.iters)
  return np.asarray(d), np.asarray(errs)
