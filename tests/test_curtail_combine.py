"""Combining modules through calibrated p-values: the p-values are the
hand-computed shares of validation scores (with ties, between order
statistics and in the exponential tail), the OR is exactly the union of the
per-module flags at one common level, Fisher's statistic is 2 sum -log p,
the validation FPR holds by construction and on held-out clean data, each
rule wins where it should, and the attacker's penalty is zero exactly where
an input passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secure import combine
from secure.curtail import calibration


def test_p_values_by_hand():
  val = np.array([[1.0], [2.0], [2.0], [3.0], [5.0], [6.0], [7.0], [8.0], [9.0], [10.0],
                  [11.0], [12.0]])
  n = len(val)
  c = combine.fit(val, "or", 0.25, tail=3, p_values="in_sample")
  p = lambda s: float(np.exp(-np.asarray(c.neg_log_p(np.array([[s]])))[0, 0]))
  assert p(1.0) == pytest.approx(12 / 13)           # every score is >= the smallest
  assert p(2.0) == pytest.approx(11 / 13)           # ties take the share of their first
  assert p(3.0) == pytest.approx(9 / 13)
  assert np.log(p(4.0)) == pytest.approx((np.log(9 / 13) + np.log(8 / 13)) / 2)  # log-linear
  assert p(12.0) == pytest.approx(1 / 13)
  # past the largest: exponential tail, scale = mean excess of the top 3 over the 4th largest
  scale = np.mean([12 - 9, 11 - 9, 10 - 9])
  assert np.log(p(15.0)) == pytest.approx(np.log(1 / 13) - 3 / scale, rel=1e-5)
  assert p(0.0) == pytest.approx(12 / 13)
  assert n == 12
  # split conformal: a new input counts itself, (1 + #{val >= s}) / 13 at the order
  # statistics; the threshold lets floor(0.25 * 13) = 3 validation images exceed it
  k = combine.fit(val, "or", 0.25, tail=3)
  p = lambda s: float(np.exp(-np.asarray(k.neg_log_p(np.array([[s]])))[0, 0]))
  assert p(1.0) == pytest.approx(1.0) and p(2.0) == pytest.approx(12 / 13)
  assert p(12.0) == pytest.approx(2 / 13) and p(9.0) == pytest.approx(5 / 13)
  assert np.log(p(12.5)) == pytest.approx(np.log(2 / 13) - 0.5 / scale, rel=1e-5)
  assert k.threshold == pytest.approx(-np.log(4 / 13))   # 9.0's in-sample p: 3 lie above
  assert not k.flags(np.array([[10.0]]))[0] and k.flags(np.array([[10.01]]))[0]


@pytest.mark.parametrize("p_values, low, high", [("conformal", 0.8, 1.05),
                                                 ("in_sample", 1.3, 2.2)])
def test_or_of_five_modules_keeps_a_one_percent_fpr_over_validation_draws(p_values, low, high):
  """300 validation images, five independent modules, 1% target: averaged over
  60 draws of the validation images, the conformal threshold's clean FPR is at
  most the target; the in-sample one overshoots by about a rank per module."""
  rng = np.random.default_rng(5)
  fpr = [combine.fit(rng.standard_normal((300, 5)), "or", 0.01, p_values=p_values)
         .flags(rng.standard_normal((5000, 5))).mean() for _ in range(60)]
  assert low < 100 * np.mean(fpr) < high     # SE of the mean ~0.07 points


def test_or_is_the_union_at_one_level_and_fisher_by_hand():
  rng = np.random.default_rng(0)
  val = rng.standard_normal((400, 3))
  att = rng.standard_normal((300, 3)) + [1.5, 0.5, 0.0]
  c = combine.fit(val, "or", 0.05)
  q = np.asarray(c.neg_log_p(att))
  # OR: flagged iff some module's p-value is below one level shared by all
  np.testing.assert_array_equal(c.flags(att), (q > c.threshold).any(1))
  f = combine.fit(val, "fisher", 0.05)
  np.testing.assert_allclose(np.asarray(f.statistic(att)), 2 * q.sum(1), rtol=1e-5)


@pytest.mark.parametrize("rule", combine.RULES)
def test_validation_fpr_by_construction_and_on_held_out_clean_data(rule):
  rng = np.random.default_rng(1)
  val, clean = rng.standard_normal((1000, 4)), rng.standard_normal((20000, 4))
  c = combine.fit(val, rule, 0.05)
  # at most the target; below it by ties (the OR's max over modules ties images
  # whose most extreme module sits at the same rank) and because a validation
  # image read as a new input counts itself twice (one rank per module)
  assert 0.04 <= c.flags(val).mean() <= 0.05
  assert c.flags(clean).mean() == pytest.approx(0.05, abs=4 * np.sqrt(0.05 * 0.95 / 1000))


def test_fpr_over_resplits_is_centred_on_the_target_with_a_binomial_like_spread():
  rng = np.random.default_rng(4)
  val, clean = rng.standard_normal((500, 3)), rng.standard_normal((1000, 3))
  r = calibration.fpr_resplits(val, clean, ("or",), 0.05, n_splits=100)["or"]
  assert r["mean"] == pytest.approx(5.0, abs=0.6)
  # threshold and measurement both sampled: at least the measurement's binomial SE
  assert 100 * np.sqrt(0.05 * 0.95 / 1000) < r["sd"] < 3.0 and r["q90"] > r["mean"]
  c = calibration.choose(val, [rng.standard_normal((100, 3)) + [0, 0, 3.0],
                               rng.standard_normal((100, 3)) + [0, 0, 4.0]])
  assert c["rule"] == "or" and c["n_settings"] == 2   # one strong module: the OR's case


def test_fisher_adds_moderate_evidence_and_keeps_an_extreme_one():
  rng = np.random.default_rng(2)
  val = rng.standard_normal((2000, 4))
  rules = {r: combine.fit(val, r, 0.05) for r in combine.RULES}
  spread = rng.standard_normal((2000, 4)) + 1.0                  # every module a little
  lone = rng.standard_normal((2000, 4)) + [6.0, 0, 0, 0]         # one module, far out
  assert rules["fisher"].flags(spread).mean() > rules["or"].flags(spread).mean() + 0.2
  assert rules["fisher"].flags(lone).mean() > 0.97 and rules["or"].flags(lone).mean() > 0.97


@pytest.mark.parametrize("rule", combine.RULES)
def test_penalty_is_zero_exactly_where_inputs_pass_with_margin(rule):
  rng = np.random.default_rng(3)
  val = rng.standard_normal((500, 3))
  c = combine.fit(val, rule, 0.05)
  s = rng.standard_normal((400, 3)) * 2
  pen = np.asarray(c.penalty(s, margin=0.0))
  np.testing.assert_array_equal(pen > 0, c.flags(s))
  assert (np.asarray(c.penalty(s, margin=1.0)) >= pen).all()
  g = jax.grad(lambda a: c.penalty(a, 0.0).sum())(jnp.asarray(s, jnp.float32))
  assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[c.flags(s)] >= 0).all()


def test_bad_inputs_raise_clear_errors():
  val = np.zeros((50, 2))
  with pytest.raises(ValueError, match="unknown rule"):
    combine.fit(val, "max")
  with pytest.raises(ValueError, match="fpr must lie"):
    combine.fit(val, "or", 0.0)
  with pytest.raises(ValueError, match="unknown p_values"):
    combine.fit(val, "or", 0.05, p_values="bootstrap")
  with pytest.raises(ValueError, match="NaN or inf"):
    combine.fit(np.full((50, 2), np.nan))
  with pytest.raises(ValueError, match="validation scores"):
    combine.fit(np.zeros((5, 2)))
