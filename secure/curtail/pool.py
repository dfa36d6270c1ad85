"""Randomised redundancy: CuRTAIL's modules drawn at fit time from a larger
pool, the draw kept secret from the attacker.

The pool holds a latent defender per (hidden layer, fine-tuning seed), an
input defender per dictionary seed and a residual module per dictionary
seed. A draw is ``latent_per_draw`` distinct latent defenders, one input and
one residual module: its columns of the pool's scores, with its own combiner
fitted on clean validation images. The attacker who knows the draw attacks
it (``adaptive.Target`` with that draw); the one who does not attacks the
expectation over all draws (EOT), and is judged on the draw deployed.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from secure import combine
from secure.curtail import adaptive, calibration, defences, residual
from secure.curtail.victims import Victim


@dataclasses.dataclass(frozen=True)
class PoolConfig:
  latent_seeds: int = 2            # fine-tunings per hidden layer
  layers: tuple | None = None      # None: every hidden layer of the victim
  latent_per_draw: int = 2
  input_seeds: int = 2
  residual_seeds: int = 2

  def __post_init__(self):
    if min(self.latent_seeds, self.latent_per_draw, self.input_seeds, self.residual_seeds) < 1:
      raise ValueError(f"every pool count must be >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class Pool:
  defence: defences.Defence                  # every pool module's scores
  draws: tuple[tuple[int, ...], ...]         # the columns of each possible draw

  def target(self, val_NxM: np.ndarray, rule: str, fpr: float,
             draws: tuple[int, ...] | None = None) -> adaptive.Target:
    """The attacker's target: the given draws (default: all, i.e. EOT over
    draws it cannot tell apart), each with its combiner from validation."""
    idx = range(len(self.draws)) if draws is None else draws
    return adaptive.Target(self.defence, tuple(
        (self.draws[i], combine.fit(val_NxM[:, list(self.draws[i])], rule, fpr,
                                   p_values=calibration.P_VALUES)) for i in idx))


def fit(v: Victim, cfg: defences.CurtailConfig, pool: PoolConfig = PoolConfig()) -> Pool:
  """Fits every pool module on the victim's clean training images."""
  t0 = time.perf_counter()
  layers = tuple(pool.layers or v.classifier.layers)
  lat = [(l, s) for l in layers for s in range(pool.latent_seeds)]
  if pool.latent_per_draw > len(lat):
    raise ValueError(f"a draw of {pool.latent_per_draw} latent modules from a pool of {len(lat)}")
  spec, arr = defences.curtail_modules(v, cfg, lat, tuple(range(pool.input_seeds)),
                                       tuple(range(pool.residual_seeds)))
  n_lat, n_inp = len(lat), pool.input_seeds
  n_res = pool.residual_seeds if cfg.residual else 0
  w = len(residual.NAMES)                    # scores per residual module
  draws = tuple(tuple(ls) + (n_lat + i,) +
                (tuple(range(n_lat + n_inp + w * r, n_lat + n_inp + w * (r + 1))) if n_res
                 else ())
                for ls in itertools.combinations(range(n_lat), pool.latent_per_draw)
                for i in range(n_inp) for r in range(max(n_res, 1)))
  d = defences.curtail_defence(spec, arr, time.perf_counter() - t0, name="curtail_pool")
  return Pool(d, draws)
