"""Local Intrinsic Dimensionality (Ma et al., ICLR 2018) as a CuRTAIL peer.

Per layer (every hidden layer of the victim, then its logits) the published
minibatch maximum-likelihood estimator

    LID(x) = -( (1/k) sum_{i<=k} log(r_i(x) / r_k(x)) )^(-1),

r_i the distance from x's activations to its i-th nearest neighbour among a
minibatch of ``batch`` benign images' activations. Deployed, an input arrives
without the clean minibatch Ma et al. compute it in, so the minibatch is a
fixed one drawn from the clean training images (not otherwise used here).
The detector is Ma et al.'s: a logistic regression on the standardised
per-layer LIDs, trained on clean, noisy (label 0) and adversarial (label 1)
images. **LID is the one detector in the study that sees adversarial
examples**: those of one training attack on training images (``train_attack``,
as in the paper, which trains per attack); ``k`` is chosen on validation
images attacked the same way. Scoring is one traced function (distances,
``top_k``, the estimator, the regression), so the adaptive attacker
differentiates it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from secure import attacks, detection
from secure.classifier import Classifier
from secure.curtail import modules


@dataclasses.dataclass(frozen=True)
class LIDConfig:
  ks: tuple[int, ...] = (10, 20, 30)      # neighbourhood sizes tried on validation
  batch: int = 100                        # the benign minibatch (Ma et al.: 100)
  n_train: int = 1000                     # training images the regression sees (x3 kinds)
  train_attack: tuple = ("pgd", {"eps": 0.1, "steps": 40})
  noise: float = 0.1                      # std of the Gaussian "noisy" negatives
  seed: int = 0

  def __post_init__(self):
    if not self.ks or min(self.ks) < 1 or max(self.ks) >= self.batch:
      raise ValueError(f"need 1 <= k < batch for every k, got {self}")


def lid_mle(d_NxB, k: int):
  """The estimator from distances to a benign minibatch (traceable): the k
  smallest distances per row (self-distances must be excluded by the caller)."""
  r = -jax.lax.top_k(-d_NxB, k)[0]                                      # ascending
  lr = jnp.log(jnp.maximum(r, 1e-12) / jnp.maximum(r[:, -1:], 1e-12))
  return 1.0 / jnp.maximum(-jnp.mean(lr, axis=1), 1e-6)


def _dist(f_NxF, ref_BxF):
  d2 = jnp.sum(f_NxF ** 2, 1)[:, None] + jnp.sum(ref_BxF ** 2, 1)[None] - 2 * f_NxF @ ref_BxF.T
  return jnp.sqrt(jnp.maximum(d2, 0.0))


def activations(clf: Classifier, params, x) -> list:
  """Every hidden layer's activations (flattened), then the logits."""
  return [clf.features(params, x, l).reshape(x.shape[0], -1) for l in clf.layers] + \
      [clf.apply(params, x)]


def lids(clf: Classifier, k: int, p: dict, x):
  """(N, L) per-layer LIDs against the reference minibatch (traceable)."""
  acts = activations(clf, p["victim"], x)
  return jnp.stack([lid_mle(_dist(a, r), k) for a, r in zip(acts, p["ref"])], axis=1)


def score(clf: Classifier, k: int, p: dict, x):
  """(N,) the logistic regression's logit (higher = more suspicious)."""
  z = (lids(clf, k, p, x) - p["mu"]) / p["sd"]
  return z @ p["w"] + p["b"]


def fit(clf: Classifier, params, logits_fn: Callable, x_train, y_train, x_val, y_val,
        cfg: LIDConfig = LIDConfig()) -> tuple[int, dict, dict]:
  """(k, arrays, record of the choice): the regression trained on training
  images (clean, noisy, attacked by ``cfg.train_attack``), k picked by AUC on
  validation images attacked the same way."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  x_train, x_val = np.asarray(x_train, np.float32), np.asarray(x_val, np.float32)
  rng = np.random.default_rng([cfg.seed, 13])
  order = rng.permutation(len(x_train))
  if len(order) < cfg.batch + 10:
    raise ValueError(f"LID needs more than {cfg.batch + 10} training images, got {len(order)}")
  ref_x = x_train[order[:cfg.batch]]
  tr = order[cfg.batch:cfg.batch + cfg.n_train]
  name, kw = cfg.train_attack

  def kinds(x, y):
    adv = attacks.get(name)(logits_fn, x, np.asarray(y), **kw)
    noisy = np.clip(x + cfg.noise * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    return x, noisy, adv.x_adv[adv.success]

  xtr = kinds(x_train[tr], np.asarray(y_train)[tr])
  xva = kinds(x_val, y_val)
  ref = [np.asarray(a) for a in jax.jit(lambda x: activations(clf, params, x))(ref_x)]
  base = {"victim": params, "ref": [jnp.asarray(r) for r in ref]}
  best, tried = None, {}
  for k in cfg.ks:
    fn = jax.jit(lambda x, k=k: lids(clf, k, base, x))
    f_tr = [modules.batched(fn, a) for a in xtr]
    xs = np.concatenate(f_tr)
    ys = np.r_[np.zeros(len(f_tr[0]) + len(f_tr[1])), np.ones(len(f_tr[2]))]
    sc = StandardScaler().fit(xs)
    lr = LogisticRegression(max_iter=1000).fit(sc.transform(xs), ys)
    p = dict(base, mu=jnp.asarray(sc.mean_, jnp.float32), sd=jnp.asarray(sc.scale_, jnp.float32),
             w=jnp.asarray(lr.coef_[0], jnp.float32), b=jnp.asarray(lr.intercept_[0], jnp.float32))
    sfn = jax.jit(lambda x, k=k, p=p: score(clf, k, p, x))
    s_clean, s_adv = (np.asarray(sfn(jnp.asarray(a))) for a in (xva[0], xva[2]))
    tried[k] = detection.roc(s_clean, s_adv)["auc"]
    if best is None or tried[k] > tried[best[0]]:
      best = (k, p)
  return best[0], best[1], {"val_auc_by_k": tried, "k": best[0],
                            "n_adversarial_train": int(len(xtr[2]))}
