"""Detector metrics shared by the secure/ methods: thresholds from a benign
validation split at a target false-positive rate, and what they give on
held-out benign and attacked inputs (ROC from scikit-learn, the reference)."""

from __future__ import annotations

import numpy as np
from sklearn import metrics


def threshold_for_fpr(benign_scores, fpr: float) -> float:
  """The score above which at most ``fpr`` of ``benign_scores`` lie (inputs with
  a higher score are flagged)."""
  s = np.sort(np.asarray(benign_scores, np.float64))
  if len(s) == 0:
    raise ValueError("thresholds need at least one benign validation score")
  if not np.isfinite(s).all():
    raise ValueError("benign validation scores contain NaN or inf")
  if not 0 < fpr < 1:
    raise ValueError(f"fpr must lie in (0, 1), got {fpr}")
  k = int(np.floor(fpr * len(s)))   # at most k benign scores may exceed the threshold
  return float(s[len(s) - 1 - k])


def roc(benign_scores, attacked_scores) -> dict:
  """ROC of a detector that flags high scores: {'fpr', 'tpr', 'auc'}."""
  b, a = np.asarray(benign_scores, np.float64), np.asarray(attacked_scores, np.float64)
  if len(b) == 0 or len(a) == 0:
    raise ValueError("a ROC needs benign and attacked scores")
  y = np.r_[np.zeros(len(b)), np.ones(len(a))]
  s = np.r_[b, a]
  fpr, tpr, _ = metrics.roc_curve(y, s)
  return {"fpr": fpr, "tpr": tpr, "auc": float(metrics.roc_auc_score(y, s))}


def binomial_se(p: float, n: int) -> float:
  """Standard error of a proportion ``p`` (in [0, 1]) measured on ``n`` trials."""
  return float(np.sqrt(max(p * (1 - p), 0.0) / max(n, 1)))
