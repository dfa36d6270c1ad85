"""Per-block sensitivity to dropping the attention sync, and ISB/SB/ESB classes.

``progressive``: as in the paper, drop blocks one at a time starting from the
last and charge each step's perplexity change to the block just dropped.
``isolated``: drop only that block. Sensitivities are relative perplexity
increases (ppl / ppl_dense - 1), so thresholds read as percentages.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from spd_jax.tp import SyncPlan

EvalFn = Callable[[SyncPlan], float]  # plan -> perplexity

# Threshold rule (flags in the study binary): a block is in-sensitive when
# dropping it alone costs < 0.5% perplexity -- a handful of such blocks fits
# a ~1% budget -- and extremely sensitive above 5%, ten times that.
T_ISB = 0.005
T_ESB = 0.05


@dataclasses.dataclass(frozen=True)
class Sensitivity:
  base_ppl: float
  progressive: tuple[float, ...]  # per block, relative ppl change when it was dropped
  isolated: tuple[float, ...]     # per block, relative ppl change dropping only it
  progressive_ppl: tuple[float, ...]  # ppl after dropping the last k blocks, k = 0..L


def analyse(eval_fn: EvalFn, n_layers: int) -> Sensitivity:
  base = eval_fn(SyncPlan.dense(n_layers))
  prog_ppl = [base] + [eval_fn(SyncPlan.drop_last(n_layers, k)) for k in range(1, n_layers + 1)]
  progressive = [0.0] * n_layers
  for k in range(1, n_layers + 1):
    progressive[n_layers - k] = (prog_ppl[k] - prog_ppl[k - 1]) / base
  isolated = [eval_fn(SyncPlan.drop_blocks(n_layers, [i])) / base - 1.0 for i in range(n_layers)]
  return Sensitivity(base, tuple(progressive), tuple(isolated), tuple(prog_ppl))


def classify(sens: Sequence[float], t_isb: float = T_ISB, t_esb: float = T_ESB) -> list[str]:
  """'ISB' below ``t_isb``, 'ESB' at or above ``t_esb``, 'SB' between."""
  if not 0 <= t_isb <= t_esb:
    raise ValueError(f"need 0 <= t_isb <= t_esb, got {t_isb}, {t_esb}")
  return ["ISB" if s < t_isb else "ESB" if s >= t_esb else "SB" for s in sens]


def drop_order(sens: Sequence[float]) -> list[int]:
  """Blocks from least to most sensitive (ties: later blocks first, as in the paper)."""
  return sorted(range(len(sens)), key=lambda i: (sens[i], -i))
