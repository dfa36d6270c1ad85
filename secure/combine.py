"""Combining detector modules into one decision, with each module's scores
first turned into calibrated p-values on clean validation images.

A module's p-value is the share of clean validation scores at or above its
score: piecewise linear in log p between the validation order statistics,
and past the largest one an exponential tail fitted to the top scores
(peaks-over-threshold with shape 0: the mean excess of the top ``tail``
scores), so a score far beyond everything clean gets a p-value far below
1/n instead of stopping there. Continuous and monotone, so it is traced and
differentiated like the modules themselves (the adaptive attacker).

Rules on q_m = -log p_m (higher = more suspicious):

* ``or``: max_m q_m, i.e. flag when any module's p-value is below one common
  level: the per-module thresholds of Modular Robust Redundancy's OR.
* ``fisher``: 2 sum_m q_m (Fisher's method): moderate evidence from several
  modules adds up, and one module's extreme p-value is not capped by a
  per-module share of the FPR budget.

Split conformal (the default, ``p_values="conformal"``): a new input's p-value
counts itself, (1 + #{val >= s}) / (n + 1), while each validation image's
counts itself among the n; the threshold lets K = floor(fpr (n + 1))
validation statistics exceed it, so a module flags a new clean input,
exchangeable with the validation images, exactly where it flags a validation
image one rank further out, and the FPR is about K / (n + 1) <= fpr. The in-sample
variant (``"in_sample"``: new inputs read the validation images' own p-values
and the threshold lets floor(fpr n) of them exceed) is what issue 23 measured
CuRTAIL with; it overshoots by about one validation rank per module (simulated
with 300 images and five independent modules: 1.5% at a 1% target, 6.6% at
5%; the test in tests/test_curtail_combine.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from core import buckets
from secure import detection

RULES = ("or", "fisher")
P_VALUES = ("conformal", "in_sample")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["sorted_val", "log_p", "tail_scale", "threshold"],
                   meta_fields=["rule", "fpr"])
@dataclasses.dataclass(frozen=True)
class Combiner:
  """A pytree (its arrays and threshold are leaves), so a jitted attack takes
  it as an argument and compiles once for every combiner of a shape."""
  sorted_val: np.ndarray     # (M, n) each module's clean validation scores, ascending
  log_p: np.ndarray          # (M, n) log p at each order statistic
  tail_scale: np.ndarray     # (M,) exponential tail's scale past the largest score
  rule: str
  threshold: float           # on the combined statistic, at ``fpr`` on validation
  fpr: float

  @property
  def n_modules(self) -> int:
    return self.sorted_val.shape[0]

  # Both are jitted, traceable inside other jits, and row-wise. Eagerly, the
  # interpolation went op by op at 20 ms a call (calibration makes hundreds);
  # jitted, each N compiled afresh (N: the images an attack fooled, different in
  # every call), so outside a trace the rows are padded to a ``core.buckets`` size.
  def neg_log_p(self, s_NxM) -> jax.Array:
    """(N, M) -log p of each module's score."""
    return _by_rows(_neg_log_p, self, s_NxM)

  def statistic(self, s_NxM) -> jax.Array:
    """(N,) combined statistic; flagged above ``threshold``."""
    return _by_rows(_statistic, self, s_NxM)

  def flags(self, s_NxM) -> np.ndarray:
    return np.asarray(self.statistic(s_NxM)) > self.threshold

  def penalty(self, s_NxM, margin: float = 0.0) -> jax.Array:
    """(N,) how far each input is from passing, in -log p units (0 where it
    passes with ``margin`` to spare): for ``or`` a hinge per module, so every
    module that fires is pushed down at once; for ``fisher`` one hinge."""
    q = self.neg_log_p(s_NxM)
    if self.rule == "or":
      return jnp.sum(jax.nn.relu(q - self.threshold + margin), axis=-1)
    return jax.nn.relu(_combine(self.rule, q) - self.threshold + margin)


def _by_rows(fn, c: Combiner, s_NxM) -> jax.Array:
  if isinstance(s_NxM, jax.core.Tracer):
    return fn(c, s_NxM.astype(jnp.float32))
  s = np.asarray(s_NxM, np.float32)
  return fn(c, jnp.asarray(buckets.pad_rows(s, buckets.bucket(len(s)))))[:len(s)]


@jax.jit
def _neg_log_p(c: Combiner, s_NxM) -> jax.Array:
  v = jnp.asarray(c.sorted_val, jnp.float32)
  lp = jnp.asarray(c.log_p, jnp.float32)
  body = jax.vmap(jnp.interp, in_axes=(1, 0, 0), out_axes=1)(s_NxM, v, lp)
  tail = lp[:, -1] - (s_NxM - v[:, -1]) / jnp.asarray(c.tail_scale, jnp.float32)
  return -jnp.where(s_NxM > v[:, -1], tail, body)


@jax.jit
def _statistic(c: Combiner, s_NxM) -> jax.Array:
  return _combine(c.rule, _neg_log_p(c, s_NxM))


def _combine(rule: str, q_NxM):
  if rule == "or":
    return jnp.max(q_NxM, axis=-1)
  if rule == "fisher":
    return 2 * jnp.sum(q_NxM, axis=-1)
  raise ValueError(f"unknown rule {rule!r}; have {RULES}")


def fit(val_NxM, rule: str = "or", fpr: float = 0.05, tail: int | None = None,
        p_values: str = "conformal") -> Combiner:
  """Calibrates each module on the clean validation scores ``val_NxM`` and
  sets the combined threshold at ``fpr`` (see the module docstring)."""
  val = np.asarray(val_NxM, np.float64)
  if val.ndim != 2 or val.shape[0] < 10 or val.shape[1] < 1:
    raise ValueError(f"need (N >= 10, M >= 1) validation scores, got shape {val.shape}")
  if not np.isfinite(val).all():
    raise ValueError("validation scores contain NaN or inf")
  if rule not in RULES:
    raise ValueError(f"unknown rule {rule!r}; have {RULES}")
  if p_values not in P_VALUES:
    raise ValueError(f"unknown p_values {p_values!r}; have {P_VALUES}")
  if not 0 < fpr < 1:
    raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
  n = len(val)
  conformal = p_values == "conformal"
  v = np.sort(val, axis=0).T                                    # (M, n)
  # p at the i-th smallest of n scores: the share of scores >= it, (n - i) / (n + 1)
  # (i from 0; tied scores take their first i), so the largest gets 1 / (n + 1)
  # and no score gets p = 1 or 0. A new input counts itself: one more.
  first = np.stack([np.searchsorted(vm, vm, side="left") for vm in v])
  log_p_val = np.log((n - first) / (n + 1))
  log_p = np.log((n + 1 - first) / (n + 1)) if conformal else log_p_val
  k = tail or max(10, n // 20)
  excess = v[:, n - k:] - v[:, n - k - 1:n - k]
  scale = np.maximum(excess.mean(1), 1e-6 * np.maximum(np.abs(v).max(1), 1e-12))
  c = Combiner(v.astype(np.float32), log_p_val.astype(np.float32), scale.astype(np.float32),
               rule, 0.0, fpr)
  t = np.asarray(c.statistic(val))                              # validation p-values: in-sample
  if conformal:   # K = floor(fpr (n + 1)) validation images above it; a new one: <= K / (n + 1)
    threshold = float(np.sort(t)[n - 1 - int(np.floor(fpr * (n + 1)))])
  else:
    threshold = detection.threshold_for_fpr(t, fpr)
  return dataclasses.replace(c, log_p=log_p.astype(np.float32), threshold=threshold)


def auc(c: Combiner, clean_NxM, attacked_NxM) -> float:
  """ROC AUC of the combined statistic (clean vs attacked)."""
  return detection.roc(np.asarray(c.statistic(clean_NxM)),
                       np.asarray(c.statistic(attacked_NxM)))["auc"]
