"""Every detector of the CuRTAIL study behind one interface: a ``Defence`` maps
images to per-module scores (N, M), higher = more suspicious, as a traced JAX
function (so the adaptive attacker can differentiate it, with BPDA where a
module is not differentiable), and flags by OR over its modules at
thresholds set on clean validation images.

* ``curtail``: latent defenders at ``CurtailConfig.latent_layers`` + the input
  defender (``modules``).
* ``mahalanobis``, ``magnet`` (detector), ``feature_squeezing``: the peers
  (``peers``), on the same victim.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from core.models import CLASSIFIERS
from secure import detection
from secure.curtail import input_defender, latent, modules, mrr, peers
from secure.curtail.victims import Victim


@dataclasses.dataclass(frozen=True)
class CurtailConfig:
  latent_layers: tuple[int, ...] = (-2, -1)
  latent: latent.LatentConfig = latent.LatentConfig(steps=1000)
  input: input_defender.InputDefenderConfig = input_defender.InputDefenderConfig()
  magnet: peers.MagNetConfig = peers.MagNetConfig()
  fs_bits: int = 1                  # Xu et al.'s MNIST setting
  mahalanobis_layer: int = -1

  def __post_init__(self):
    if len(set(self.latent_layers)) != len(self.latent_layers) or not self.latent_layers:
      raise ValueError(f"need distinct latent layers, got {self.latent_layers}")


@dataclasses.dataclass(frozen=True)
class Defence:
  name: str
  modules: tuple[str, ...]
  fn: Callable[..., jax.Array]        # (params, x, bpda) -> (N, M), pure and traceable
  params: Any                         # its arrays: arguments, not constants baked into a jit
  fit_s: float = 0.0
  has_bpda: bool = False              # bpda=True swaps a non-differentiable step for identity
  spec: modules.Spec | None = None    # CuRTAIL's, for the sharded runs (params = its arrays)

  def traced(self, x, bpda: bool = False) -> jax.Array:
    return self.fn(self.params, x, bpda)

  def scores(self, x, batch: int = 500) -> np.ndarray:
    fn = _jitted(self.fn)
    return modules.batched(lambda xb: fn(self.params, xb, False), x, batch).reshape(
        len(x), len(self.modules))

  def as_dict(self, s_NxM: np.ndarray) -> dict[str, np.ndarray]:
    return {m: s_NxM[:, i] for i, m in enumerate(self.modules)}


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable) -> Callable:
  return jax.jit(fn, static_argnums=2)


def _curtail(v: Victim, cfg: CurtailConfig) -> Defence:
  t0 = time.perf_counter()
  lats = [latent.fit(v.cfg.model, v.model_config, v.params, v.x_train, v.y_train,
                     dataclasses.replace(cfg.latent, layer=l)) for l in cfg.latent_layers]
  inp = input_defender.fit(v.x_train, v.y_train, v.model_config.num_classes, cfg.input)
  spec = modules.spec_of(v.cfg.model, v.model_config, lats, inp)
  return Defence("curtail", spec.names, _curtail_fn(spec), modules.arrays(v.params, lats, inp),
                 time.perf_counter() - t0, has_bpda=True, spec=spec)


@functools.lru_cache(maxsize=16)
def _curtail_fn(spec: modules.Spec) -> Callable:
  return functools.partial(modules.scores_traced, spec)


def _mahalanobis(v: Victim, cfg: CurtailConfig) -> Defence:
  t0 = time.perf_counter()
  model, mcfg, layer = v.cfg.model, v.model_config, cfg.mahalanobis_layer
  feats = jax.jit(lambda p, x: CLASSIFIERS[model].features(p, x, mcfg, layer=layer))
  m = peers.fit_mahalanobis(lambda x: modules.batched(functools.partial(feats, v.params), x),
                            v.x_train, v.y_train, mcfg.num_classes)

  def fn(p, x, bpda=False):
    d = CLASSIFIERS[model].features(p["victim"], x, mcfg, layer=layer)[:, None] - p["means"][None]
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
  model, mcfg, bits = v.cfg.model, v.model_config, cfg.fs_bits

  def fn(p, x, bpda=False):
    logits = lambda a: CLASSIFIERS[model].apply(p, a, mcfg)
    sq = peers.bit_depth(x, bits)
    if bpda:   # rounding has zero gradient: straight-through
      sq = x + jax.lax.stop_gradient(sq - x)
    prob = jax.nn.softmax(logits(x), -1)
    d = [jnp.abs(prob - jax.nn.softmax(logits(s), -1)).sum(-1)
         for s in (sq, peers.median_2x2(x))]
    return jnp.maximum(*d)[:, None]
  return Defence("feature_squeezing", ("feature_squeezing",), fn, v.params, has_bpda=True)


BUILDERS = {"curtail": _curtail, "mahalanobis": _mahalanobis, "magnet": _magnet,
            "feature_squeezing": _feature_squeezing}


def fit(v: Victim, cfg: CurtailConfig = CurtailConfig(),
        names: tuple[str, ...] = tuple(BUILDERS)) -> dict[str, Defence]:
  """The named defences, fitted on the victim's clean training images only."""
  unknown = set(names) - set(BUILDERS)
  if unknown:
    raise ValueError(f"unknown defences {sorted(unknown)}; have {sorted(BUILDERS)}")
  return {n: BUILDERS[n](v, cfg) for n in names}


def security_for_fpr(val_NxM: np.ndarray, target: float, iters: int = 40) -> float:
  """The per-module security parameter at which the OR of the modules flags
  ``target`` of the clean validation images (bisection; one module: target)."""
  if not 0 < target < 1:
    raise ValueError(f"target FPR must lie in (0, 1), got {target}")
  if val_NxM.shape[1] == 1:
    return target
  cols = {str(i): val_NxM[:, i] for i in range(val_NxM.shape[1])}
  lo, hi = target / val_NxM.shape[1] / 4, target
  for _ in range(iters):
    mid = np.sqrt(lo * hi)
    if mrr.flag_or(cols, mrr.thresholds(cols, mid)).mean() > target:
      hi = mid
    else:
      lo = mid
  return float(lo)


def thresholds_at(val_NxM: np.ndarray, target: float) -> np.ndarray:
  """Per-module thresholds (M,) for an OR false-positive rate of ``target`` on
  the validation images."""
  s = security_for_fpr(val_NxM, target)
  return np.asarray([detection.threshold_for_fpr(val_NxM[:, i], s)
                     for i in range(val_NxM.shape[1])])
