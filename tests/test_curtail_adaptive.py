"""A classifier the user writes (not from core.models: its own apply and
features functions) defended end to end by CuRTAIL and every peer; the
adaptive attacker on it passes the usual sanity checks (Carlini et al.,
"On evaluating adversarial robustness"): its reported evasions are real, more
steps never help the defender, an unbounded attack always succeeds, and
against the undefended victim it is at least as strong as foolbox's PGD; its
step-size checkpoints are APGD's; randomised redundancy's EOT target averages
the draws' penalties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import data
from secure import attacks
from secure.classifier import Classifier
from secure import combine
from secure.curtail import adaptive, defences, pool, study, victims
from tests import curtail_tiny


# --- the user's model: a 64-32-24-10 tanh network written by hand --------------------------
def user_features(p, x, layer):
  h = x.reshape(x.shape[0], -1)
  for i in range(layer + 1):
    h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
  return h


def user_apply(p, x):
  return user_features(p, x, 1) @ p["w2"] + p["b2"]


def _train_user_model():
  ds = data.load("digits")
  rest, x_val, y_val = data.holdout(ds, 300, seed=0)
  keys = jax.random.split(jax.random.key(0), 3)
  sizes = [(64, 32), (32, 24), (24, 10)]
  p = {}
  for i, (k, (a, b)) in enumerate(zip(keys, sizes)):
    p[f"w{i}"] = jax.random.normal(k, (a, b)) / np.sqrt(a)
    p[f"b{i}"] = jnp.zeros(b)
  opt = optax.adam(3e-3)
  loss = lambda q, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      user_apply(q, xb), yb).mean()

  @jax.jit
  def step(q, o, xb, yb):
    u, o = opt.update(jax.grad(loss)(q, xb, yb), o)
    return optax.apply_updates(q, u), o

  o = opt.init(p)
  rng = np.random.default_rng(0)
  for _ in range(600):
    i = rng.choice(len(rest.x_train), 64, replace=False)
    p, o = step(p, o, jnp.asarray(rest.x_train[i]), jnp.asarray(rest.y_train[i]))
  clf = Classifier(user_apply, user_features, (0, 1), 10, "user_tanh_mlp")
  return victims.Victim.of(clf, p, rest.x_train, rest.y_train, x_val, y_val, ds.x_test,
                           ds.y_test)


CFG = curtail_tiny.CONFIG


@functools.lru_cache(maxsize=1)
def setup():
  v = _train_user_model()
  ds = defences.fit(v, CFG)
  x, y = study.attack_set(v, 40)
  return v, ds, x, y


def test_a_user_classifier_is_defended_end_to_end():
  v, ds, x, y = setup()
  assert np.mean(v.predict(v.x_test) == v.y_test) > 0.85
  assert ds["curtail"].modules == ("latent0", "latent1", "input", "residual", "energy")
  assert ds["mahalanobis"].modules == ("mahalanobis",) and ds["lid"].info["k"] in (5, 10)
  r = attacks.deepfool(v.logits_fn, x, y)
  for k, d in ds.items():
    val, clean = d.scores(v.x_val), d.scores(v.x_test[:200])
    rec = study.detection_record(d, val, clean, d.scores(r.x_adv), r.success)
    for rule in combine.RULES:
      assert rec[rule]["residual"] <= 100 * r.success.mean() + 1e-9
      assert 0 <= rec[rule]["auc"] <= 1 and rec[rule]["fpr"] < 20
  cur = study.detection_record(ds["curtail"], ds["curtail"].scores(v.x_val),
                               ds["curtail"].scores(v.x_test[:200]),
                               ds["curtail"].scores(r.x_adv), r.success)
  assert cur["fisher"]["auc"] > 0.85          # DeepFool's minimal perturbations are caught
  with pytest.raises(ValueError, match="no hidden layer 7"):
    defences.fit(v, defences.CurtailConfig(latent_layers=(0, 7)), names=("curtail",))
  with pytest.raises(ValueError, match="labels must be integers"):
    victims.Victim.of(v.classifier, v.params, v.x_train, v.y_train + 10, v.x_val, v.y_val,
                      v.x_test, v.y_test)


def _target(name="curtail", rule="fisher"):
  v, ds, x, y = setup()
  d = ds[name]
  return v, adaptive.Target.of(d, combine.fit(d.scores(v.x_val), rule)), x, y


def test_evasions_are_real_and_stay_in_the_ball():
  v, tgt, x, y = _target()
  eps = 0.1
  xa, ev = adaptive.attack(tgt, v.logits_fn, x, y, adaptive.AdaptiveConfig(
      eps=eps, steps=64, restarts=1, penalties=(3.0,), gradients=("exact", "bpda")))
  assert np.abs(xa - x).max() <= eps + 1e-5 and xa.min() >= 0 and xa.max() <= 1
  fooled = v.predict(xa) != y                     # recomputed from scratch
  passed = ~tgt.draws[0][1].flags(tgt.defence.scores(xa))
  np.testing.assert_array_equal(ev, fooled & passed)
  assert ev.any()


def test_more_steps_never_help_the_defender():
  v, tgt, x, y = _target()
  ev = [adaptive.attack(tgt, v.logits_fn, x, y, adaptive.AdaptiveConfig(
      eps=0.05, steps=s, restarts=1, penalties=(3.0,), gradients=("exact",)))[1].sum()
        for s in (8, 64)]
  assert ev[0] < ev[1], ev


def test_an_unbounded_attack_always_succeeds():
  v, tgt, x, y = _target()
  _, ev = adaptive.attack(tgt, v.logits_fn, x, y, adaptive.AdaptiveConfig(
      eps=1.0, steps=64, restarts=1, penalties=(3.0,), gradients=("exact",)))
  assert ev.all(), ev.mean()


def test_undefended_attack_is_as_strong_as_foolbox_pgd():
  fb = pytest.importorskip("foolbox", reason="foolbox (test extra) is not installed")
  v, _, x, y = setup()
  eps, steps = 0.03, 20
  _, ours = adaptive.attack(adaptive.Target(None), v.logits_fn, x, y, adaptive.AdaptiveConfig(
      eps=eps, steps=steps, restarts=1))
  _, _, theirs = fb.attacks.LinfPGD(abs_stepsize=eps / steps * 2.5, steps=steps)(
      fb.JAXModel(v.logits_fn, bounds=(0, 1)), jnp.asarray(x), jnp.asarray(y), epsilons=eps)
  assert 0 < np.mean(np.asarray(theirs)) < 1       # a strength where the comparison means something
  assert ours.mean() >= np.mean(np.asarray(theirs))


def test_apgd_checkpoints_by_hand():
  # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020)
  assert np.flatnonzero(adaptive.checkpoints(100)).tolist() == [22, 41, 57, 70, 80, 87, 93, 99]


def test_eot_target_averages_the_draws_penalties():
  v, ds, x, y = setup()
  pl = pool.fit(v, CFG, pool.PoolConfig(latent_seeds=1, latent_per_draw=1, input_seeds=1,
                                        residual_seeds=2))
  assert len(pl.draws) == 4 and pl.defence.modules == ("latent0", "latent1", "input",
                                                       "residual", "energy", "residual.1",
                                                       "energy.1")
  assert pl.draws[1] == (0, 2, 5, 6)      # latent0, the input module, the second residual pair
  val = pl.defence.scores(v.x_val)
  eot = pl.target(val, "fisher", 0.05)
  s = jnp.asarray(pl.defence.scores(x))
  each = [pl.target(val, "fisher", 0.05, draws=(i,)).penalty(s, 0.5) for i in range(4)]
  np.testing.assert_allclose(np.asarray(eot.penalty(s, 0.5)), np.mean(each, 0), rtol=1e-5)
  per = adaptive.residual_success(eot, v.logits_fn, x, y)
  assert per.shape == (4, len(x)) and not per.any()      # clean images fool nothing
