"""Modular Robust Redundancy: independent defender modules combined by OR.

Each module gives a score per input (higher = more suspicious). At a security
parameter s, each module's threshold is the (1 - s) quantile of its scores on
clean validation inputs, and an input is flagged if any module fires;
sweeping s traces the combination's ROC.
"""

from __future__ import annotations

import numpy as np

from secure import detection


def thresholds(val_scores: dict[str, np.ndarray], security: float) -> dict[str, float]:
  """Per-module thresholds flagging at most ``security`` of its clean validation scores."""
  return {k: detection.threshold_for_fpr(v, security) for k, v in val_scores.items()}


def flag_or(scores: dict[str, np.ndarray], thr: dict[str, float]) -> np.ndarray:
  """Flagged by any module (modules without a threshold are an error)."""
  missing = set(scores) - set(thr)
  if missing:
    raise ValueError(f"no threshold for modules {sorted(missing)}")
  if not scores:
    raise ValueError("the combination needs at least one module")
  return np.any([scores[k] > thr[k] for k in scores], axis=0)


def sweep(val: dict[str, np.ndarray], clean: dict[str, np.ndarray],
          attacked: dict[str, np.ndarray], securities=None) -> dict:
  """ROC of the OR combination over security parameters: for each s, the
  clean false-positive rate and the attacked true-positive rate on held-out
  inputs (thresholds from ``val`` only)."""
  securities = np.geomspace(1e-3, 0.5, 40) if securities is None else np.asarray(securities)
  fpr, tpr = [], []
  for s in securities:
    thr = thresholds(val, float(s))
    fpr.append(float(flag_or(clean, thr).mean()))
    tpr.append(float(flag_or(attacked, thr).mean()))
  order = np.argsort(fpr, kind="stable")
  f, t = np.r_[0.0, np.asarray(fpr)[order], 1.0], np.r_[0.0, np.asarray(tpr)[order], 1.0]
  t = np.maximum.accumulate(t)
  return {"security": securities.tolist(), "fpr": f.tolist(), "tpr": t.tolist(),
          "auc": float(np.trapezoid(t, f))}
