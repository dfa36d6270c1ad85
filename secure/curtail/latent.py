"""CuRTAIL's latent defender (Rouhani, Samragh, Javidi, Koushanfar): the victim
truncated at a hidden layer, fine-tuned so each class's features gather round
a centre (cross-entropy through a fresh linear head plus gamma x a centre
loss), reduced by PCA to the directions holding ``variance`` of the training
features, with one Gaussian per class. An input is flagged when its
log-density under the Gaussian of the class *the victim predicts* is below
the ``security`` percentile of the training images' log-densities (under
their true classes): adversarial points land where their claimed class has
little mass. No adversarial example is used to build it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.models import layers
from secure.classifier import Classifier


@dataclasses.dataclass(frozen=True)
class LatentConfig:
  layer: Any = -1           # hidden layer of the victim (one of its Classifier's layers)
  gamma: float = 0.01       # centre-loss weight
  steps: int = 300
  batch: int = 64
  lr: float = 1e-3
  variance: float = 0.99    # PCA keeps this share of the feature variance
  security: float = 0.01    # fraction of training log-densities below the threshold
  ridge: float = 1e-3       # added to each class covariance's diagonal (relative)
  seed: int = 0

  def __post_init__(self):
    if not (0 < self.variance <= 1 and 0 < self.security < 1 and self.gamma >= 0):
      raise ValueError(f"need 0 < variance <= 1, 0 < security < 1, gamma >= 0, got {self}")


@dataclasses.dataclass(frozen=True)
class LatentDefender:
  params: Any                   # fine-tuned copy of the victim's parameters
  classifier: Classifier
  layer: Any
  mean: np.ndarray              # PCA centre (F,)
  components: np.ndarray        # (F, R) orthonormal columns
  class_means: np.ndarray       # (C, R)
  class_prec: np.ndarray        # (C, R, R) precision matrices
  class_logdet: np.ndarray      # (C,) log-determinants of the covariances
  threshold: float              # log-density threshold (flag below)
  train_logdens: np.ndarray     # training log-densities (for a security sweep)

  def features(self, x) -> np.ndarray:
    f = features_fn(self.classifier, self.layer)(self.params, jnp.asarray(x))
    return np.asarray(f)

  def log_density(self, x, labels) -> np.ndarray:
    """Log-density (up to a shared constant) of each input's reduced features
    under the Gaussian of ``labels`` (the victim's predicted classes)."""
    labels = np.asarray(labels)
    z = (self.features(x) - self.mean) @ self.components
    d = z - self.class_means[labels]
    maha = np.empty(len(d))
    for c in np.unique(labels):   # per class: gathering (N, R, R) precisions would not fit
      i = labels == c
      maha[i] = np.einsum("nr,rs,ns->n", d[i], self.class_prec[c], d[i])
    return -0.5 * (maha + self.class_logdet[labels])

  def score(self, x, labels) -> np.ndarray:
    """Higher = more suspicious (minus the log-density)."""
    return -self.log_density(x, labels)

  def flags(self, x, labels) -> np.ndarray:
    return self.log_density(x, labels) < self.threshold


@functools.lru_cache(maxsize=64)
def features_fn(clf: Classifier, layer) -> Callable:
  """``clf``'s features at ``layer`` as one jitted (params, x) function, cached."""
  return jax.jit(lambda p, x: clf.features(p, x, layer))


def _finetune(clf: Classifier, params, x, y, cfg: LatentConfig, n_classes: int):
  feats = features_fn(clf, cfg.layer)
  f_dim = int(feats(params, jnp.asarray(x[:1])).shape[-1])
  key = jax.random.key(cfg.seed)
  state = {"net": params,
           "head": {"kernel": layers.normal_init(key, (f_dim, n_classes), f_dim),
                    "bias": jnp.zeros(n_classes)},
           "centres": jnp.zeros((n_classes, f_dim))}
  opt = optax.adam(cfg.lr)

  def loss(s, xb, yb):
    f = feats(s["net"], xb)
    logits = f @ s["head"]["kernel"] + s["head"]["bias"]
    centre = jnp.mean(jnp.sum((f - s["centres"][yb]) ** 2, -1))
    return layers.cross_entropy(logits, yb) + cfg.gamma * centre

  @jax.jit
  def step(s, o, xb, yb):
    g = jax.grad(loss)(s, xb, yb)
    u, o = opt.update(g, o, s)
    return optax.apply_updates(s, u), o

  o = opt.init(state)
  rng = np.random.default_rng(cfg.seed)
  for _ in range(cfg.steps):
    i = rng.choice(len(x), min(cfg.batch, len(x)), replace=False)
    state, o = step(state, o, jnp.asarray(x[i]), jnp.asarray(y[i]))
  return state["net"]


def fit(clf: Classifier, params, x_train, y_train, cfg: LatentConfig = LatentConfig()
        ) -> LatentDefender:
  """Fine-tunes, reduces and models the training features at ``cfg.layer``
  (one of ``clf.layers``; clean, labelled training images only)."""
  x = np.asarray(x_train, np.float32)
  y = np.asarray(y_train)
  if len(x) == 0:
    raise ValueError("the latent defender needs training images")
  n_classes = clf.num_classes
  clf.check_layer(cfg.layer)
  missing = sorted(set(range(n_classes)) - set(np.unique(y).tolist()))
  if missing:
    raise ValueError(f"classes {missing} have no training images; every class needs a Gaussian")
  # Resolve the layer index (and check it) before any training.
  features_fn(clf, cfg.layer)(params, jnp.asarray(x[:1]))
  net = _finetune(clf, params, x, y, cfg, n_classes) if cfg.steps else params
  f = np.concatenate([np.asarray(features_fn(clf, cfg.layer)(net, jnp.asarray(
      x[i:i + 1000]))) for i in range(0, len(x), 1000)]).astype(np.float64)
  mean = f.mean(0)
  _, s, vt = np.linalg.svd(f - mean, full_matrices=False)
  share = np.cumsum(s ** 2) / max(np.sum(s ** 2), 1e-12)
  r = int(np.searchsorted(share, cfg.variance - 1e-12) + 1)
  comps = vt[:r].T
  z = (f - mean) @ comps
  means = np.stack([z[y == c].mean(0) for c in range(n_classes)])
  prec, logdet = [], []
  for c in range(n_classes):
    zc = z[y == c] - means[c]
    cov = zc.T @ zc / max(len(zc) - 1, 1)
    cov += cfg.ridge * np.trace(cov) / r * np.eye(r) + 1e-9 * np.eye(r)
    prec.append(np.linalg.inv(cov))
    logdet.append(np.linalg.slogdet(cov)[1])
  d = LatentDefender(net, clf, cfg.layer, mean, comps, means, np.stack(prec),
                     np.asarray(logdet), 0.0, np.zeros(0))
  ld = d.log_density(x, y)
  return dataclasses.replace(d, threshold=float(np.quantile(ld, cfg.security)),
                             train_logdens=ld)
