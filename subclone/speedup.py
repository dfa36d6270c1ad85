"""Measuring how much faster a child trains from one init than from another.

A *run* is a child trained for a fixed budget with its validation loss logged
every few steps: ``{"initial_loss", "final_loss", "curve": [(step, loss)]}``
with step 0 (the init's own loss) at the head of the curve. The speed-up of a
run over the random-init reference is (steps the reference needs to reach its
own final loss) / (steps the run needs to reach it), both read off the curves
by linear interpolation between evaluations.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from core.train import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Optimiser settings that differ between random and subcloned inits."""
  lr: float
  wd: float

  @property
  def tag(self) -> str:
    return f"lr{self.lr:g}_wd{self.wd:g}"


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int
  batch: int
  eval_every: int
  warmup_frac: float = 0.1


def crossing_step(curve: list[tuple[float, float]], target: float) -> float | None:
  """First (interpolated) step at which the loss curve reaches ``target``; None if never."""
  prev = None
  for step, loss in curve:
    if loss <= target:
      if prev is None:
        return float(step)
      (s0, l0) = prev
      return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    prev = (step, loss)
  return None


def speedup(reference: dict, run: dict) -> dict:
  """Steps for ``reference`` to reach its final loss / steps for ``run`` to reach it."""
  target = reference["final_loss"]
  n_ref = crossing_step(reference["curve"], target)
  n_run = crossing_step(run["curve"], target)
  return {"target": target, "steps_reference": n_ref, "steps": n_run,
          "speedup": n_ref / n_run if n_run else float("nan")}


def train_run(init: Any, loss_fn: Callable, batch_fn: Callable[[int], dict],
              eval_fn: Callable[[Any], float], recipe: Recipe, budget: Budget, seed: int, *,
              desc: str = "child", progress: bool = True,
              final_fn: Callable[[Any], dict] | None = None) -> dict:
  """Trains ``init`` with ``recipe`` for ``budget``; returns the run record
  (with ``final_fn``'s metrics of the init and of the trained params)."""
  tcfg = TrainConfig(steps=budget.steps, batch_size=budget.batch, lr=recipe.lr,
                     weight_decay=recipe.wd, seed=seed,
                     warmup_steps=max(1, int(budget.steps * budget.warmup_frac)),
                     eval_every=budget.eval_every, log_every=budget.eval_every)
  initial = float(eval_fn(init))
  res = train(loss_fn, init, batch_fn, tcfg, eval_fn=lambda p: {"loss": eval_fn(p)},
              progress=progress, desc=desc)
  curve = [(0, initial)] + [(r["step"], r["loss"]) for r in res.history if r["split"] == "eval"]
  record = {"initial_loss": initial, "final_loss": curve[-1][1], "curve": curve}
  if final_fn is not None:
    record |= {"initial_metrics": final_fn(init), "final_metrics": final_fn(res.params)}
  return record
