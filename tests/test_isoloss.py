"""Iso-loss speed-up on constructed (budget, final loss) curves with known answers."""

import math

import pytest

from subclone import isoloss

BUDGETS = [150, 300, 600, 1200, 2400]


def _log_linear(c, budgets=BUDGETS, k=0.2):
  """Final loss c - k ln(budget): interpolation in log-budget is exact on it."""
  return [c - k * math.log(b) for b in budgets]


def test_a_curve_shifted_by_4x_in_budget_gives_4x_at_every_interior_level():
  ref = (BUDGETS, _log_linear(3.0))
  # Reaching any loss with 4x fewer steps: loss(b) = ref_loss(4b).
  run = (BUDGETS, _log_linear(3.0 - 0.2 * math.log(4)))
  levels = [3.0 - 0.2 * math.log(b) for b in (700, 850, 1700, 2300)]   # between measurements
  for row in isoloss.speedup_curve(ref, run, levels):
    assert row["speedup"] == pytest.approx(4.0, rel=1e-9) and row["bound"] is None
  # By hand at the reference's 1200-step loss: the run needs 300 steps.
  r = isoloss.speedup_at(ref, run, ref[1][3])
  assert r["reference"] == pytest.approx(1200) and r["run"] == pytest.approx(300)


def test_levels_never_reached_or_reached_at_once_are_flagged():
  ref = (BUDGETS, _log_linear(3.0))
  run = (BUDGETS, _log_linear(2.5))
  below_all = min(ref[1][-1], run[1][-1]) - 0.1
  r = isoloss.speedup_at(ref, run, below_all)
  assert r["speedup"] is None and r["reference"] is None and r["run"] is None
  # The run is already below the level at its smallest budget: at least this fast.
  level = run[1][0] + 0.01
  r = isoloss.speedup_at(ref, run, level)
  assert r["bound"] == "lower" and r["run"] == 150 and r["speedup"] > 1


def test_a_non_monotone_curve_is_read_at_its_first_crossing():
  reach = isoloss.budget_to_reach([100, 200, 400, 800], [2.0, 1.5, 1.7, 1.2], 1.6)
  # 1.6 is first crossed between 100 (2.0) and 200 (1.5): t = 0.4/0.5 in log budget.
  assert reach.budget == pytest.approx(math.exp(math.log(100) + 0.8 * math.log(2)))
  assert not reach.at_most


@pytest.mark.parametrize("budgets, losses, match", [
    ([100, 50], [1.0, 0.9], "strictly increasing"), ([100, 200], [1.0], "one final loss"),
    ([0, 100], [1.0, 0.9], "positive"), ([100, 200], [1.0, float("nan")], "finite")])
def test_bad_curves_raise(budgets, losses, match):
  with pytest.raises(ValueError, match=match):
    isoloss.budget_to_reach(budgets, losses, 0.5)


def test_iso_curves_trains_each_init_at_each_budget_and_renders_the_speedups(tmp_path):
  """The study's step 4 with a stand-in trainer whose final loss is log-linear in
  the budget: the subcloned init is the random one shifted 4x in budget."""
  from subclone import section, study
  from subclone.speedup import Recipe
  calls = []

  def run(name, init, recipe, seed, steps):
    calls.append((name, init(), recipe.lr, seed, steps))
    shift = {"random init": 1.0, "subcloned": 4.0, "late": 0.5}[name]
    return {"final_loss": 3.0 - 0.2 * math.log(steps * shift) + 0.01 * seed}

  inits = {"random init": (lambda s: f"rand{s}", Recipe(3e-3, 0.1)),
           "subcloned": (lambda s: "child", Recipe(1e-3, 0.0)),
           "late": (lambda s: "other", Recipe(1e-3, 0.0))}
  iso = study.iso_curves(inits, run, (150, 300, 600, 1200), (1, 2))
  assert len(calls) == 3 * 4 * 2 and ("random init", "rand2", 3e-3, 2, 600) in calls
  s1 = iso["speedup"]["subcloned"][1]
  # The random run's 1200-step loss: the subcloned one needs 300 steps (interior: exact).
  assert s1[3]["speedup"] == pytest.approx(4.0) and s1[3]["bound"] is None
  # Its 300- and 600-step losses: reached at the smallest budget run, lower bounds;
  # the 150-step one is censored on both sides.
  assert [r["bound"] for r in s1[:3]] == ["unknown", "lower", "lower"]
  late = iso["speedup"]["late"][1]
  assert late[3]["speedup"] is None and late[2]["speedup"] == pytest.approx(0.5)
  text = "\n".join(section.render_iso(iso, "LM", str(tmp_path), "lm"))
  # Mean random final loss at 1200 steps: 3 - 0.2 ln 1200 + 0.015 = 1.597.
  assert "| 1,200 | 1.597 | 4.00x (4.00-4.00) | never |" in text
  assert "| 600 | 1.736 | >= 4.00x, >= 4.00x | 0.50x (0.50-0.50) |" in text
  assert "| 150 | 2.013 | ~ 1.00x, ~ 1.00x | <= 0.50x, <= 0.50x |" in text
  assert "Budgets where subcloning is >= 4x on every seed: 600, 1200." in text
  with pytest.raises(ValueError, match="random init"):
    study.iso_curves({"subcloned": inits["subcloned"]}, run, (150, 300), (1,))
  with pytest.raises(ValueError, match="at least 2 budgets"):
    study.iso_curves(inits, run, (150,), (1,))


def test_a_level_met_exactly_at_a_budget_returns_that_budget_exactly():
  # Through log/exp, 200 came back as 199.99999999999997 and a 4x speed-up read 3.999...
  losses = [0.5007, 0.502, 0.4445, 0.314]
  assert isoloss.budget_to_reach([50, 100, 200, 400], losses, 0.4445).budget == 200.0
