"""Iso-loss speed-up: how many fewer training steps one initialisation needs
than another to reach the same final loss, read off (budget, final loss)
curves -- each point a full run with its own warmup+cosine schedule of that
length -- rather than off the middle of one run's schedule.

Between two measured budgets the final loss is interpolated linearly in
log(budget) (training curves are close to straight there). A level reached
already at the smallest budget is *censored*: the run needs at most that
budget, so a speed-up against it is a lower or upper bound, and says which.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Reach:
  budget: float | None     # interpolated steps to reach the level; None: never reached
  at_most: bool = False    # reached at the smallest budget run: the true budget is <= this


def _check(budgets: Sequence[float], losses: Sequence[float]) -> None:
  if len(budgets) != len(losses) or not budgets:
    raise ValueError(f"need one final loss per budget, got {len(budgets)} budgets and "
                     f"{len(losses)} losses")
  if any(b <= 0 for b in budgets) or list(budgets) != sorted(set(budgets)):
    raise ValueError(f"budgets must be positive and strictly increasing, got {list(budgets)}")
  if not all(math.isfinite(l) for l in losses):
    raise ValueError(f"final losses must be finite, got {list(losses)}")


def budget_to_reach(budgets: Sequence[float], losses: Sequence[float], level: float) -> Reach:
  """The smallest budget at which the curve's final loss reaches ``level`` (its
  first crossing in budget order, so a noisy non-monotone curve is read
  conservatively), interpolated in log-budget."""
  _check(budgets, losses)
  if losses[0] <= level:
    return Reach(float(budgets[0]), at_most=True)
  for (b0, l0), (b1, l1) in zip(zip(budgets, losses), zip(budgets[1:], losses[1:])):
    if l1 <= level:
      if l1 == level:   # exactly at a measured budget: no round trip through log/exp
        return Reach(float(b1))
      t = (l0 - level) / (l0 - l1)
      return Reach(math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))))
  return Reach(None)


def speedup_at(reference: tuple[Sequence[float], Sequence[float]],
               run: tuple[Sequence[float], Sequence[float]], level: float) -> dict:
  """Budget the reference needs for ``level`` / budget ``run`` needs. ``bound``
  says what a censored side makes of the ratio: 'lower' (run censored: the
  speed-up is at least this), 'upper' (reference censored), None (exact) or
  'unknown' (both censored); ``speedup`` is None when either never reaches it."""
  ref, new = budget_to_reach(*reference, level), budget_to_reach(*run, level)
  if ref.budget is None or new.budget is None:
    return {"level": level, "reference": ref.budget, "run": new.budget, "speedup": None,
            "bound": None}
  bound = {(False, False): None, (False, True): "lower", (True, False): "upper",
           (True, True): "unknown"}[(ref.at_most, new.at_most)]
  return {"level": level, "reference": ref.budget, "run": new.budget,
          "speedup": ref.budget / new.budget, "bound": bound}


def speedup_curve(reference, run, levels: Sequence[float]) -> list[dict]:
  """``speedup_at`` over loss levels (e.g. the reference's final losses)."""
  return [speedup_at(reference, run, level) for level in levels]
