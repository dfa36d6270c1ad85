"""Every detector of the CuRTAIL study behind one interface: a ``Defence`` maps
images to per-module scores (N, M), higher = more suspicious, as a traced JAX
function (so the adaptive attacker can differentiate it, with BPDA where a
module is not differentiable). A ``combine.Combiner`` fitted on clean
validation scores turns them into one decision.

* ``curtail``: latent defenders at ``CurtailConfig.latent_layers``, the
  class-conditional input defender and the label-free residual module
  (``modules``).
* ``mahalanobis``, ``magnet`` (detector), ``feature_squeezing``, ``lid``: the
  peers (``peers``, ``lid``), on the same victim.

Any classifier can be defended: ``fit`` takes a ``victims.Victim``, which
holds a ``secure.classifier.Classifier`` (apply and per-layer features as
pure functions) and its params.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from secure.curtail import input_defender, latent, lid, modules, peers, residual
from secure.curtail.victims import Victim


@dataclasses.dataclass(frozen=True)
class CurtailConfig:
  # None: the victim's last two hidden layers (``Classifier.layers[-2:]``)
  latent_layers: tuple[Hashable, ...] | None = None
  latent: latent.LatentConfig = latent.LatentConfig(steps=1000)
  input: input_defender.InputDefenderConfig = input_defender.InputDefenderConfig()
  residual: residual.ResidualConfig | None = residual.ResidualConfig()   # None: left out
  magnet: peers.MagNetConfig = peers.MagNetConfig()
  fs_bits: int = 1                  # Xu et al.'s MNIST setting
  mahalanobis_layer: Hashable | None = None      # None: the last hidden layer
  lid: lid.LIDConfig = lid.LIDConfig()

  def __post_init__(self):
    if self.latent_layers is not None and (len(set(self.latent_layers)) !=
                                           len(self.latent_layers) or not self.latent_layers):
      raise ValueError(f"need distinct latent layers, got {self.latent_layers}")

  def layers_for(self, v: Victim) -> tuple:
    layers = self.latent_layers or v.classifier.layers[-2:]
    for l in layers:
      v.classifier.check_layer(l)
    return tuple(layers)


@dataclasses.dataclass(frozen=True)
class Defence:
  name: str
  modules: tuple[str, ...]
  fn: Callable[..., jax.Array]        # (params, x, bpda) -> (N, M), pure and traceable
  params: Any                         # its arrays: arguments, not constants baked into a jit
  fit_s: float = 0.0
  has_bpda: bool = False              # bpda=True swaps a non-differentiable step for identity
  spec: modules.Spec | None = None    # CuRTAIL's, for the sharded runs (params = its arrays)
  info: dict = dataclasses.field(default_factory=dict, compare=False)   # fitting choices

  def traced(self, x, bpda: bool = False) -> jax.Array:
    return self.fn(self.params, x, bpda)

  def scores(self, x, batch: int = 500) -> np.ndarray:
    if not len(x):
      return np.zeros((0, len(self.modules)), np.float32)
    fn = _jitted(self.fn)
    return modules.batched(lambda xb: fn(self.params, xb, False), x, batch).reshape(
        len(x), len(self.modules))

  def as_dict(self, s_NxM: np.ndarray) -> dict[str, np.ndarray]:
    return {m: s_NxM[:, i] for i, m in enumerate(self.modules)}


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable) -> Callable:
  return jax.jit(fn, static_argnums=2)


def curtail_modules(v: Victim, cfg: CurtailConfig, latent_fits: list[tuple[Hashable, int]],
                    input_seeds: tuple[int, ...] = (0,), residual_seeds: tuple[int, ...] = (0,)
                    ) -> tuple[modules.Spec, dict]:
  """CuRTAIL's modules for ``v``: a latent defender per (layer, seed), an input
  defender per dictionary seed, a residual module per seed (none when
  ``cfg.residual`` is None)."""
  lats = [latent.fit(v.classifier, v.params, v.x_train, v.y_train,
                     dataclasses.replace(cfg.latent, layer=l, seed=cfg.latent.seed + s))
          for l, s in latent_fits]
  inps = [input_defender.fit(v.x_train, v.y_train, v.num_classes, dataclasses.replace(
      cfg.input, dictionary=dataclasses.replace(cfg.input.dictionary,
                                                seed=cfg.input.dictionary.seed + 100 * s)))
          for s in input_seeds]
  res = [residual.fit(v.x_train, cfg.residual, seed=s) for s in residual_seeds] \
      if cfg.residual else []
  spec = modules.spec_of(v.classifier, lats, inps, cfg.residual, len(res))
  return spec, modules.arrays(v.params, lats, inps, res)


def _curtail(v: Victim, cfg: CurtailConfig) -> Defence:
  t0 = time.perf_counter()
  spec, arr = curtail_modules(v, cfg, [(l, 0) for l in cfg.layers_for(v)])
  return curtail_defence(spec, arr, time.perf_counter() - t0)


def curtail_defence(spec: modules.Spec, arr: dict, fit_s: float = 0.0,
                    name: str = "curtail") -> Defence:
  return Defence(name, spec.names, _curtail_fn(spec), arr, fit_s, has_bpda=True, spec=spec)


@functools.lru_cache(maxsize=16)
def _curtail_fn(spec: modules.Spec) -> Callable:
  return functools.partial(modules.scores_traced, spec)


def _mahalanobis(v: Victim, cfg: CurtailConfig) -> Defence:
  t0 = time.perf_counter()
  clf = v.classifier
  layer = clf.layers[-1] if cfg.mahalanobis_layer is None else cfg.mahalanobis_layer
  clf.check_layer(layer)
  feats = latent.features_fn(clf, layer)
  m = peers.fit_mahalanobis(lambda x: modules.batched(functools.partial(feats, v.params), x),
                            v.x_train, v.y_train, v.num_classes)

  def fn(p, x, bpda=False):
    d = clf.features(p["victim"], x, layer)[:, None] - p["means"][None]
    return jnp.min(jnp.einsum("ncf,fg,ncg->nc", d, p["prec"], d), axis=1)[:, None]
  params = {"victim": v.params, "means": jnp.asarray(m.class_means, jnp.float32),
            "prec": jnp.asarray(m.precision, jnp.float32)}
  return Defence("mahalanobis", ("mahalanobis",), fn, params, time.perf_counter() - t0)


def _magnet_fn(p, x, bpda=False):
  return peers.magnet_score(p, x)[:, None]


def _magnet(v: Victim, cfg: CurtailConfig) -> Defence:
  t0 = time.perf_counter()
  mg = peers.fit_magnet(v.logits_fn, v.x_train, cfg.magnet)
  return Defence("magnet", ("magnet",), _magnet_fn, mg.params, time.perf_counter() - t0)


def _feature_squeezing(v: Victim, cfg: CurtailConfig) -> Defence:
  apply, bits = v.classifier.apply, cfg.fs_bits

  def fn(p, x, bpda=False):
    sq = peers.bit_depth(x, bits)
    if bpda:   # rounding has zero gradient: straight-through
      sq = x + jax.lax.stop_gradient(sq - x)
    prob = jax.nn.softmax(apply(p, x), -1)
    d = [jnp.abs(prob - jax.nn.softmax(apply(p, s), -1)).sum(-1)
         for s in (sq, peers.median_2x2(x))]
    return jnp.maximum(*d)[:, None]
  return Defence("feature_squeezing", ("feature_squeezing",), fn, v.params, has_bpda=True)


def _lid(v: Victim, cfg: CurtailConfig) -> Defence:
  t0 = time.perf_counter()
  k, arr, info = lid.fit(v.classifier, v.params, v.logits_fn, v.x_train, v.y_train, v.x_val,
                         v.y_val, cfg.lid)
  clf = v.classifier
  fn = lambda p, x, bpda=False: lid.score(clf, k, p, x)[:, None]
  return Defence("lid", ("lid",), fn, arr, time.perf_counter() - t0, info=info)


BUILDERS = {"curtail": _curtail, "mahalanobis": _mahalanobis, "magnet": _magnet,
            "feature_squeezing": _feature_squeezing, "lid": _lid}


def fit(v: Victim, cfg: CurtailConfig = CurtailConfig(),
        names: tuple[str, ...] = tuple(BUILDERS)) -> dict[str, Defence]:
  """The named defences, fitted on the victim's clean training images only
  (LID also on attacked training images and, for its k, validation images)."""
  unknown = set(names) - set(BUILDERS)
  if unknown:
    raise ValueError(f"unknown defences {sorted(unknown)}; have {sorted(BUILDERS)}")
  return {n: BUILDERS[n](v, cfg) for n in names}
