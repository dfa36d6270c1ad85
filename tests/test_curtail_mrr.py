"""The OR combination: never a lower TPR than its best member at the same
thresholds, exactly the union of the members' flags, and its ROC sweep's
false-positive rate follows the security parameter on held-out clean data."""

import numpy as np
import pytest

from secure.curtail import mrr


def _scores(rng, n, shift):
  return {"a": rng.standard_normal(n) + shift[0], "b": rng.standard_normal(n) + shift[1]}


def test_or_is_the_union_and_beats_its_best_member():
  rng = np.random.default_rng(0)
  val, att = _scores(rng, 2000, (0, 0)), _scores(rng, 500, (1.5, 0.8))
  for s in (0.01, 0.05, 0.2):
    thr = mrr.thresholds(val, s)
    both = mrr.flag_or(att, thr)
    members = [att[k] > thr[k] for k in att]
    np.testing.assert_array_equal(both, members[0] | members[1])
    assert both.mean() >= max(m.mean() for m in members)


def test_sweep_fpr_tracks_the_security_parameter_on_held_out_clean_data():
  rng = np.random.default_rng(1)
  val, clean, att = _scores(rng, 5000, (0, 0)), _scores(rng, 5000, (0, 0)), \
      _scores(rng, 1000, (2, 2))
  r = mrr.sweep(val, clean, att, securities=[0.01, 0.05])
  # Two independent modules at s each: union FPR = 1 - (1 - s)^2.
  assert r["fpr"][1:3] == pytest.approx([1 - 0.99 ** 2, 1 - 0.95 ** 2], abs=0.006)
  assert 0.9 < mrr.sweep(val, clean, att)["auc"] <= 1.0
  with pytest.raises(ValueError, match=r"no threshold for modules \['c'\]"):
    mrr.flag_or({"c": np.zeros(2)}, {"a": 0.0})
