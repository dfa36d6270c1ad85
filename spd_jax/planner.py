"""A latency-aware sync planner: per block, keep, drop (SPD) or compress each sync.

Drop-only SPD has one knob per block. The planner also lets a kept sync carry a
compressed payload (``compress``): per block the attention sync is kept, dropped
or compressed, the MLP sync kept or compressed (never dropped). It minimises a
latency model's cost of the plan subject to a perplexity budget on calibration
data, every accepted plan measured, never predicted:

1. **Sensitivity** (prunes the search): each single move -- one block's
   attention sync dropped or compressed, or its MLP sync compressed -- is
   measured alone. A move that alone breaks the budget is never tried.
2. **Greedy descent**: the remaining moves, ordered by modelled latency saved
   per unit of sensitivity, are tried one at a time on the current plan; a move
   is kept only if it lowers the modelled latency and the measured perplexity
   of the whole plan stays within budget.
3. The descent runs twice, from the dense plan and from drop-only SPD's plan at
   the same budget (``drop_only``, itself within budget), and the cheaper result
   is returned: the planner is never slower, by the model, than drop-only SPD.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from spd_jax import sensitivity
from spd_jax.tp import ATTN_ACTIONS, MLP_ACTIONS, SyncPlan

EvalFn = Callable[[SyncPlan], float]   # plan -> calibration perplexity
CostFn = Callable[[SyncPlan], float]   # plan -> modelled seconds


@dataclasses.dataclass(frozen=True)
class Move:
  block: int
  sync: str     # "attn" or "mlp"
  action: str   # e.g. "drop", "int8"


@dataclasses.dataclass(frozen=True)
class PlanResult:
  plan: SyncPlan
  ppl: float        # calibration perplexity of ``plan``
  cost: float       # modelled seconds
  base_ppl: float
  start: str        # which descent won: "dense" or "drop-only"


class Memo:
  """Caches an evaluation function by plan, counting distinct evaluations."""

  def __init__(self, fn: EvalFn):
    self.fn, self.values = fn, {}

  def __call__(self, plan: SyncPlan) -> float:
    if plan not in self.values:
      self.values[plan] = float(self.fn(plan))
    return self.values[plan]


def apply_move(plan: SyncPlan, move: Move) -> SyncPlan:
  attn, mlp = list(plan.attn_actions), list(plan.mlp_actions)
  (attn if move.sync == "attn" else mlp)[move.block] = move.action
  return SyncPlan.from_actions(attn, mlp)


def _check(budget: float, attn_choices: Sequence[str], mlp_choices: Sequence[str]) -> None:
  if not budget >= 0:
    raise ValueError(f"perplexity budget must be >= 0, got {budget}")
  bad = [a for a in attn_choices if a not in ATTN_ACTIONS or a == "keep"]
  bad += [a for a in mlp_choices if a not in MLP_ACTIONS or a == "keep"]
  if bad:
    raise ValueError(f"unknown or no-op planner choices {bad}: attention moves come from "
                     f"{ATTN_ACTIONS[1:]}, MLP moves from {MLP_ACTIONS[1:]} (never 'drop')")


def move_sensitivity(evaluate: EvalFn, n_layers: int, attn_choices: Sequence[str] = ("drop",),
                     mlp_choices: Sequence[str] = ()) -> dict[Move, float]:
  """Relative perplexity change of each single move from the dense plan."""
  dense = SyncPlan.dense(n_layers)
  base = evaluate(dense)
  moves = [Move(i, "attn", a) for i in range(n_layers) for a in attn_choices]
  moves += [Move(i, "mlp", a) for i in range(n_layers) for a in mlp_choices]
  return {mv: evaluate(apply_move(dense, mv)) / base - 1.0 for mv in moves}


def drop_only(evaluate: EvalFn, cost: CostFn, n_layers: int, budget: float,
              order: Sequence[int] | None = None) -> PlanResult:
  """Drop-only SPD at ``budget``: drop blocks in ``order`` (default: least sensitive
  alone first) while the plan and every shorter prefix stay within budget."""
  _check(budget, (), ())
  dense = SyncPlan.dense(n_layers)
  base = evaluate(dense)
  if order is None:
    sens = move_sensitivity(evaluate, n_layers)
    order = sensitivity.drop_order([sens[Move(i, "attn", "drop")] for i in range(n_layers)])
  best = dense
  for k in range(1, n_layers + 1):
    plan = SyncPlan.drop_blocks(n_layers, order[:k])
    if evaluate(plan) > (1 + budget) * base:
      break
    best = plan
  return PlanResult(best, evaluate(best), cost(best), base, "drop-only")


def plan_syncs(evaluate: EvalFn, cost: CostFn, n_layers: int, budget: float, *,
               attn_choices: Sequence[str] = ("drop", "int8"),
               mlp_choices: Sequence[str] = ("int8",)) -> PlanResult:
  """The cheapest plan (by ``cost``) found within ``budget`` relative perplexity
  regression on ``evaluate``'s calibration data (module docstring)."""
  _check(budget, attn_choices, mlp_choices)
  dense = SyncPlan.dense(n_layers)
  base = evaluate(dense)
  limit = (1 + budget) * base
  sens = move_sensitivity(evaluate, n_layers, attn_choices, mlp_choices)
  base_cost = cost(dense)
  saving = {mv: base_cost - cost(apply_move(dense, mv)) for mv in sens}
  ranked = sorted((mv for mv in sens if sens[mv] <= budget and saving[mv] > 0),
                  key=lambda mv: (-saving[mv] / max(sens[mv], 1e-6), mv.block, mv.sync))
  starts = {"dense": dense}
  if "drop" in attn_choices:
    order = sensitivity.drop_order([sens[Move(i, "attn", "drop")] for i in range(n_layers)])
    starts["drop-only"] = drop_only(evaluate, cost, n_layers, budget, order).plan
  best = None
  for name, plan in starts.items():
    for mv in ranked:
      cand = apply_move(plan, mv)
      if cost(cand) < cost(plan) and evaluate(cand) <= limit:
        plan = cand
    if best is None or cost(plan) < best.cost:
      best = PlanResult(plan, evaluate(plan), cost(plan), base, name)
  return best

