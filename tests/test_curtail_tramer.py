"""The Tramer check by hand: the implied robust accuracy at eps/2 is the clean
accuracy times the share of attacked images neither flagged clean nor evaded;
the cited state of the art at eps/2 is the best entry at any epsilon at or
beyond it; a result above it is flagged, one with nothing cited that far is
left undecided."""

import numpy as np
import pytest

from secure.curtail import tramer


def test_implied_accuracy_and_flags_by_hand():
  flagged = np.array([False, True, False, False, False, False, False, False, False, False])
  evaded = np.array([False, False, True, True, False, False, False, False, False, False])
  assert tramer.implied_accuracy(95.0, flagged, evaded) == pytest.approx(95.0 * 7 / 10)
  r = tramer.check("mnist5k", 0.2, 95.0, flagged, evaded)
  # eps/2 = 0.1: the best cited at eps >= 0.1 is TRADES' 96.07 at 0.3
  assert r["eps_half"] == 0.1 and r["sota"] == 96.07 and r["beyond_cited"] is False
  assert r["se"] == pytest.approx(95.0 * np.sqrt(0.7 * 0.3 / 10))
  never = np.zeros(10, bool)
  assert tramer.check("mnist5k", 0.1, 99.0, never, never)["beyond_cited"] is True  # 99 > 96.07
  assert tramer.check("fashion_mnist", 0.6, 90.0, never, never)["beyond_cited"] is None
  assert tramer.sota_lower_bound("fashion_mnist", 0.05)[0] == 65.5
  with pytest.raises(ValueError, match="matching non-empty"):
    tramer.implied_accuracy(90.0, flagged, evaded[:3])
