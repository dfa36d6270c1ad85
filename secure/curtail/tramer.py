"""The Tramer check (Tramer, "Detecting adversarial examples is (nearly) as
hard as classifying them", ICML 2022): a detector that is robust at epsilon
(every input within epsilon of a clean one is either classified correctly or
rejected) gives a computationally inefficient classifier that is robust at
epsilon / 2 with the same robust error. So a detection result implies a
robust accuracy at epsilon / 2:

    1 - P(clean input misclassified or rejected, or some input within epsilon
          of it fools the victim and passes the detector),

estimated from the adaptive attacker's results (an upper bound on the
detector's real robustness, since a stronger attack can only lower it). If
it exceeds the best robust classifier anyone has built at epsilon / 2, the
detection claim implies more than the state of the art: the attack was
probably too weak.
"""

from __future__ import annotations

import numpy as np

from secure import detection

# Published L-inf robust accuracies (%) of the best classifiers we can cite
# offline, per dataset: (epsilon, accuracy, source). Robust accuracy can only
# fall as epsilon grows, so the best entry at any epsilon' >= e is a lower
# bound on the state of the art at e.
SOTA = {
    "mnist": (
        (0.1, 94.2, "Wong & Kolter, ICML 2018 (abstract): a CNN provably below 5.8% test error "
                    "at eps 0.1 (certified)"),
        (0.3, 89.3, "Madry et al., ICLR 2018, Table 1: adversarially trained CNN against their "
                    "strongest white-box PGD (recalled from the paper, not verifiable offline)"),
        (0.3, 96.07, "Zhang et al. (TRADES), ICML 2019, Table 5: MNIST at eps 0.3 against a "
                     "40-step PGD (recalled from the paper, not verifiable offline)"),
    ),
    "fashion_mnist": (
        (0.1, 65.5, "Wong & Kolter, ICML 2018, Table 2: Fashion-MNIST at eps 0.1, certified "
                    "(robust error bound 34.5%; recalled from the paper, not verifiable "
                    "offline)"),
    ),
}
DATASET_FAMILY = {"mnist5k": "mnist", "mnist": "mnist", "fashion_mnist": "fashion_mnist"}


def implied_accuracy(clean_acc: float, clean_flagged, evaded) -> float:
  """Implied robust accuracy (%) at eps / 2 from a detector at eps: the
  victim's clean accuracy (%, over the whole test split) times the share of
  correctly classified attacked images that are neither flagged when clean
  nor evaded by the adaptive attacker at eps."""
  f, e = np.asarray(clean_flagged, bool), np.asarray(evaded, bool)
  if f.shape != e.shape or not len(f):
    raise ValueError(f"need matching non-empty flags, got {f.shape} and {e.shape}")
  return float(clean_acc * np.mean(~f & ~e))


def sota_lower_bound(dataset: str, eps: float) -> tuple[float, str] | None:
  """(accuracy %, source): the best cited robust accuracy at any epsilon >=
  ``eps`` (a lower bound on the state of the art at ``eps``), or None."""
  rows = [r for r in SOTA.get(DATASET_FAMILY.get(dataset, dataset), ()) if r[0] >= eps - 1e-12]
  if not rows:
    return None
  best = max(rows, key=lambda r: r[1])
  return best[1], f"{best[2]} (eps {best[0]:g})"


def check(dataset: str, eps: float, clean_acc: float, clean_flagged, evaded) -> dict:
  """The record for one detector at one epsilon: implied robust accuracy at
  eps / 2 (with its binomial SE), the best cited robust accuracy at eps / 2 or
  beyond, and ``beyond_cited``: True when the implied accuracy is above it
  (the claim implies a classifier better than any cited one: scrutinise the
  attack), False when not, None when nothing is cited that far."""
  acc = implied_accuracy(clean_acc, clean_flagged, evaded)
  n = len(np.asarray(evaded))
  ref = sota_lower_bound(dataset, eps / 2)
  se = clean_acc * detection.binomial_se(acc / max(clean_acc, 1e-12), n)
  rec = {"eps": eps, "eps_half": eps / 2, "implied": acc, "se": se, "n": n}
  if ref is None:
    return rec | {"sota": None, "source": None, "beyond_cited": None}
  return rec | {"sota": ref[0], "source": ref[1], "beyond_cited": bool(acc > ref[0])}
