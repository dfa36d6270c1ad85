"""How the combination is calibrated and chosen on clean validation images:

* ``choose``: the rule (``combine.RULES``) whose threshold, set on one set of
  clean images, flags the most adversarial images on average over a list of
  attack settings (the study runs it on the development victim's validation
  split only).
* ``fpr_resplits``: how much the clean false-positive rate at the validation
  point moves with the validation images drawn: the clean validation and test
  scores pooled and re-split at random many times, the threshold set on a
  validation-sized part and the FPR measured on the rest.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from secure import combine

# CuRTAIL's thresholds read the validation images' in-sample p-values: issue 23's
# reported numbers were made so (its re-splits: 5.1-5.5% mean clean FPR at a 5%
# target). combine's default, split conformal, removes that overshoot; switching
# CuRTAIL to it means re-running issue 23's full study, left for that rerun.
P_VALUES = "in_sample"


def choose(cal_NxM: np.ndarray, adversarial: Iterable[np.ndarray],
           rules=combine.RULES, fpr: float = 0.05) -> dict:
  """{'mean_tpr': {rule: %}, 'n_settings', 'rule'}: each rule's combiner fitted
  on the clean ``cal_NxM`` scores, its TPR on each set of adversarial scores
  (sets without images are skipped), averaged; the best rule."""
  combiners = {r: combine.fit(cal_NxM, r, fpr, p_values=P_VALUES) for r in rules}
  tpr = {r: [] for r in rules}
  for s in adversarial:
    if len(s):
      for r, c in combiners.items():
        tpr[r].append(100 * float(c.flags(s).mean()))
  if not tpr[rules[0]]:
    raise ValueError("no adversarial images to choose a rule on")
  mean = {r: float(np.mean(t)) for r, t in tpr.items()}
  return {"mean_tpr": mean, "n_settings": len(tpr[rules[0]]), "rule": max(mean, key=mean.get)}


def fpr_resplits(val_NxM: np.ndarray, clean_NxM: np.ndarray, rules=combine.RULES,
                 fpr: float = 0.05, n_splits: int = 200, seed: int = 0) -> dict:
  """Per rule: the clean FPR (%) at the ``fpr`` validation point over
  ``n_splits`` random re-splits of the pooled clean scores into a part the
  size of ``val_NxM`` (thresholds) and the rest (measured): mean, standard
  deviation and 90th percentile."""
  pool = np.concatenate([val_NxM, clean_NxM])
  n = len(val_NxM)
  if not 10 <= n < len(pool):
    raise ValueError(f"need >= 10 validation and >= 1 clean scores, got {n} and "
                     f"{len(clean_NxM)}")
  rng = np.random.default_rng([seed, 23])
  out = {}
  for r in rules:
    f = []
    for _ in range(n_splits):
      p = rng.permutation(len(pool))
      f.append(100 * float(combine.fit(pool[p[:n]], r, fpr, p_values=P_VALUES).flags(pool[p[n:]]).mean()))
    out[r] = {"mean": float(np.mean(f)), "sd": float(np.std(f)),
              "q90": float(np.quantile(f, 0.9)), "n_splits": n_splits, "n_val": n,
              "n_clean": len(pool) - n}
  return out
