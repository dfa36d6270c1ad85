"""Attacks on a linear model, where the answers are known in closed form: FGSM
is one hand-computed signed-gradient step, FGSM/PGD stay in their balls and in
[0, 1], DeepFool and CW find (about) the exact minimal L2 perturbation to the
nearest boundary, JSMA equals a NumPy implementation of the same saliency
rule and stays within its pixel budget; bad inputs raise clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from secure import attacks

D, C = 16, 3
_RNG = np.random.default_rng(0)
W = _RNG.standard_normal((D, C)).astype(np.float32)
B = _RNG.standard_normal(C).astype(np.float32)


@jax.jit
def logits(x):
  return x.reshape(x.shape[0], -1) @ W + B


def _data(n=12, spread=0.05):
  x = (0.5 + spread * _RNG.standard_normal((n, 4, 4, 1))).astype(np.float32)
  return x, np.asarray(logits(x).argmax(-1)).astype(np.int32)


def _exact_min_l2(x, y):
  """Distance to the nearest decision boundary of the affine model."""
  z = np.asarray(logits(x))
  out = []
  for zi, yi in zip(z, y):
    d = [abs(zi[k] - zi[yi]) / np.linalg.norm(W[:, k] - W[:, yi]) for k in range(C) if k != yi]
    out.append(min(d))
  return np.array(out)


def test_fgsm_is_one_hand_computed_signed_gradient_step():
  x, y = _data()
  eps = 0.03
  z = np.asarray(logits(x))
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  grad = (p - np.eye(C)[y]) @ W.T                     # dCE/dx of an affine model
  ref = np.clip(x.reshape(len(x), -1) + eps * np.sign(grad), 0, 1).reshape(x.shape)
  np.testing.assert_allclose(attacks.fgsm(logits, x, y, eps).x_adv, ref, atol=1e-6)


@pytest.mark.parametrize("name,kw", [("fgsm", {}), ("bim", {"steps": 5}),
                                     ("pgd", {"steps": 5}), ("pgd", {"steps": 5, "norm": "l2"})])
def test_gradient_attacks_stay_in_their_ball_and_in_range(name, kw):
  x, y = _data(spread=0.4)
  x = np.clip(x, 0, 1)
  eps = 0.1
  r = attacks.get(name)(logits, x, y, eps, **kw)
  assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
  norm = r.l2 if kw.get("norm") == "l2" else r.linf
  assert (norm <= eps + 1e-5).all(), norm.max()
  assert r.success.mean() > 0  # a small affine model is easy to move


@pytest.mark.parametrize("attack,kw,slack", [(attacks.deepfool, {}, 1.03),
                                             (attacks.cw_l2, {"steps": 300}, 1.10)])
def test_minimal_attacks_find_the_linear_models_exact_minimum(attack, kw, slack):
  x, y = _data()
  exact = _exact_min_l2(x, y)
  assert exact.max() < 0.2   # the boundary is near, so the [0, 1] box does not bind
  r = attack(logits, x, y, **kw)
  assert r.success.all()
  assert (r.l2 <= slack * exact + 1e-3).all(), (r.l2 / exact)
  assert (r.l2 >= 0.98 * exact).all()   # nothing beats the exact minimum


def _jsma_numpy(x, t, gamma, theta=1.0):
  """The saliency-map rule for an affine model (constant Jacobian W^T)."""
  out = []
  a = W.T                                          # (C, D)
  for xi, ti in zip(x.reshape(len(x), -1).copy(), t):
    search = xi < 1.0
    alpha_p = a[ti]
    beta_p = a.sum(0) - a[ti]
    for _ in range(max(1, int(np.floor(gamma * D / 2)))):
      if (xi.reshape(1, -1) @ W + B).argmax() == ti or search.sum() < 2:
        break
      al = alpha_p[:, None] + alpha_p[None]
      be = beta_p[:, None] + beta_p[None]
      ok = (al > 0) & (be < 0) & search[:, None] & search[None] & ~np.eye(D, dtype=bool)
      sal = np.where(ok, al * np.abs(be), -np.inf).ravel()
      k = int(sal.argmax())
      if not np.isfinite(sal[k]):
        break
      p, q = divmod(k, D)
      xi[p] = min(1.0, xi[p] + theta)
      xi[q] = min(1.0, xi[q] + theta)
      search[p] = search[q] = False
    out.append(xi)
  return np.stack(out).reshape(x.shape)


def test_jsma_equals_a_numpy_reference_and_keeps_its_budget():
  x, y = _data(n=8, spread=0.2)
  x = np.clip(x, 0, 1)
  t = (y + 1) % C
  r = attacks.jsma(logits, x, t, gamma=0.5)
  np.testing.assert_allclose(r.x_adv, _jsma_numpy(x, t, 0.5), atol=1e-6)
  assert (r.l0 <= 2 * int(0.5 * D / 2)).all()
  assert r.success.any()


def test_bad_inputs_raise_clear_errors():
  x, y = _data(n=2)
  with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
    attacks.fgsm(logits, x, y, -0.1)
  with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
    attacks.pgd(logits, x + 2, y, 0.1)
  with pytest.raises(ValueError, match="unknown attack 'foo'"):
    attacks.get("foo")
  with pytest.raises(ValueError, match="norm must be"):
    attacks.pgd(logits, x, y, 0.1, norm="l1")
  with pytest.raises(ValueError, match="labels"):
    attacks.fgsm(logits, x, y[:1], 0.1)


def _mlp():
  rng = np.random.default_rng(3)
  w1 = jnp.asarray(rng.standard_normal((D, 32)).astype(np.float32))
  w2 = jnp.asarray(rng.standard_normal((32, C)).astype(np.float32) / 4)

  @jax.jit
  def f(x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2
  return f


def _foolbox_setup():
  fb = pytest.importorskip("foolbox", reason="foolbox (test extra) is not installed")
  f = _mlp()
  x = np.clip(0.5 + 0.25 * _RNG.standard_normal((64, 4, 4, 1)), 0, 1).astype(np.float32)
  y = np.asarray(f(x).argmax(-1)).astype(np.int32)
  return fb, f, x, y, fb.JAXModel(f, bounds=(0, 1)), jnp.asarray(x), jnp.asarray(y)


def _agree(fb_attack, m, xj, yj, mine, tol):
  _, adv, ok = fb_attack(m, xj, yj, epsilons=None)
  ok = np.asarray(ok)
  theirs = np.linalg.norm(np.asarray(adv - xj).reshape(len(xj), -1), axis=1)
  assert abs(mine.success.mean() - ok.mean()) <= 0.05
  both = mine.success & ok
  assert np.median(mine.l2[both]) == pytest.approx(np.median(theirs[both]), rel=tol)


def test_fgsm_bim_deepfool_agree_with_foolbox():
  fb, f, x, y, m, xj, yj = _foolbox_setup()
  eps = 0.1
  _, adv, ok = fb.attacks.FGSM()(m, xj, yj, epsilons=eps)
  np.testing.assert_allclose(attacks.fgsm(f, x, y, eps).x_adv, np.asarray(adv), atol=1e-6)
  _, adv, ok = fb.attacks.LinfBasicIterativeAttack(abs_stepsize=0.02, steps=10)(
      m, xj, yj, epsilons=eps)
  ours = attacks.bim(f, x, y, eps, steps=10, step_size=0.02)
  np.testing.assert_allclose(ours.x_adv, np.asarray(adv), atol=1e-5)
  np.testing.assert_array_equal(ours.success, np.asarray(ok))
  _agree(fb.attacks.L2DeepFoolAttack(steps=50, overshoot=0.02), m, xj, yj,
         attacks.deepfool(f, x, y), 0.1)


@pytest.mark.slow  # foolbox's CW runs eagerly: ~70 s here
def test_cw_agrees_with_foolbox():
  fb, f, x, y, m, xj, yj = _foolbox_setup()
  _agree(fb.attacks.L2CarliniWagnerAttack(binary_search_steps=6, steps=200, stepsize=0.01,
                                          initial_const=1.0), m, xj, yj, attacks.cw_l2(f, x, y),
         0.15)


def test_gradient_sign_is_exact_on_a_confidently_classified_input():
  # logits scaled so p_y = 1 to float32 precision: the textbook CE gradient
  # p - onehot loses the -grad z_y term there; the float64 reference keeps it.
  scale = 40.0
  big = jax.jit(lambda x: scale * logits(x))
  x = (0.5 + 0.1 * _RNG.standard_normal((400, 4, 4, 1))).astype(np.float32)
  z = scale * (x.reshape(len(x), -1).astype(np.float64) @ W + B)
  margin = np.sort(z, 1)[:, -1] - np.sort(z, 1)[:, -2]
  # saturated in float32 (1 - p_y < eps) yet with gradients that do not underflow
  x, z = x[(margin > 20) & (margin < 80)][:16], z[(margin > 20) & (margin < 80)][:16]
  assert len(x) == 16
  y = z.argmax(1).astype(np.int32)
  lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
  p = np.exp(z - lse[:, None])
  others = p.copy()
  others[np.arange(16), y] = 0
  dz = others - others.sum(1, keepdims=True) * np.eye(C)[y]       # p - onehot, exactly
  g = scale * dz @ W.T.astype(np.float64)
  step = attacks.fgsm(big, x, y, 0.05).x_adv - x
  np.testing.assert_array_equal(np.sign(step.reshape(16, -1)), np.sign(g))


def test_pgd_agrees_with_foolbox():
  fb, f, x, y, m, xj, yj = _foolbox_setup()
  eps = 0.1
  _, adv, ok = fb.attacks.LinfPGD(abs_stepsize=eps / 40 * 2.5, steps=40, random_start=True)(
      m, xj, yj, epsilons=eps)
  ours = attacks.pgd(f, x, y, eps, steps=40)
  ok = np.asarray(ok)
  assert abs(ours.success.mean() - ok.mean()) <= 0.06
  theirs = np.abs(np.asarray(adv) - x).reshape(len(x), -1).max(1)
  both = ours.success & ok
  assert np.median(ours.linf[both]) == pytest.approx(np.median(theirs[both]), rel=0.02)


def _margins(f, x, y):
  z = np.array(f(jnp.asarray(x)))
  zy = z[np.arange(len(y)), y]
  z[np.arange(len(y)), y] = -np.inf
  return zy - z.max(1)


def test_cw_keeps_only_perturbations_with_the_asked_confidence_and_agrees_with_foolbox():
  # kappa = 20: every kept adversarial must beat the label's logit by 20 (the
  # margin it was asked for), not merely cross the boundary; foolbox's CW at
  # the same confidence and schedule finds perturbations of the same size.
  fb, f, x, y, _, xj, yj = _foolbox_setup()
  big = jax.jit(lambda a: 25 * f(a))       # logits large enough for margins of 20
  kw = dict(binary_steps=4, steps=100, c_init=1.0)
  r0 = attacks.cw_l2(big, x[:32], y[:32], confidence=0.0, **kw)
  r20 = attacks.cw_l2(big, x[:32], y[:32], confidence=20.0, **kw)
  assert r20.success.mean() > 0.8
  assert (_margins(big, r20.x_adv, y[:32])[r20.success] <= -20 + 1e-3).all()
  both = r0.success & r20.success
  assert np.median(r20.l2[both]) > 1.3 * np.median(r0.l2[both])   # confidence costs distance
  m = fb.JAXModel(big, bounds=(0, 1))
  _agree(fb.attacks.L2CarliniWagnerAttack(binary_search_steps=4, steps=100, stepsize=0.01,
                                          initial_const=1.0, confidence=20.0, abort_early=False),
         m, xj[:32], yj[:32], r20, 0.1)
  with pytest.raises(ValueError, match="confidence"):
    attacks.cw_l2(big, x[:2], y[:2], confidence=-1.0)
