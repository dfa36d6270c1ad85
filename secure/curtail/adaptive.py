"""The adaptive white-box attacker (Carlini & Wagner 2017; Tramer et al. 2020):
it knows the victim, every module of the defence, how they are combined and
the threshold, and minimises per image

    max(z_y - max_{j != y} z_j, -kappa) + c * penalty(x)

where ``penalty`` is the combiner's distance from passing in -log p units
(``combine.Combiner.penalty``: all modules attacked jointly through the
combination actually deployed). A randomised defence is attacked by EOT: the
penalty averaged over the draws the attacker cannot tell apart (``Target``).

The optimiser is APGD (Croce & Hein 2020, L-infinity): sign steps of size
starting at 2 eps with momentum 0.75, the step halved at checkpoints
(``checkpoints``: 22%, 41%, ... of the budget) where fewer than rho = 75% of
the steps since the last one improved the objective, or where the best
objective did not move since the last checkpoint without a halving there,
then restarting from the best point. Restarts: the first from the clean image, the rest from uniform
points in the ball. Gradients go through everything the defence computes
("exact": through OMP, which for its selected support is a least-squares
projection, i.e. BPDA through the support selection) and, where a step is not
usefully differentiable, by BPDA as the identity ("bpda"). An image is kept
at the first iterate that fools the victim and passes (every draw, under
EOT); otherwise at its best objective.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from secure import combine
from secure.curtail.defences import Defence


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  eps: float = 0.1
  steps: int = 100
  restarts: int = 2
  penalties: tuple[float, ...] = (1.0, 10.0)
  # "exact": gradients through everything (through OMP, the fixed support's
  # least-squares projection); "bpda": non-differentiable steps as identity.
  gradients: tuple[str, ...] = ("exact", "bpda")
  kappa: float = 2.0          # how confidently the victim should be fooled
  margin: float = 0.5         # how far below the threshold to aim, in -log p units
  rho: float = 0.75
  momentum: float = 0.75
  seed: int = 0

  def __post_init__(self):
    if not (self.eps >= 0 and self.steps >= 1 and self.restarts >= 1 and self.penalties
            and self.gradients and set(self.gradients) <= {"exact", "bpda"}
            and 0 < self.rho <= 1 and 0 <= self.momentum <= 1):
      raise ValueError(f"bad AdaptiveConfig {self}")


@dataclasses.dataclass(frozen=True)
class Target:
  """What the attacker must pass: the defence's scores, and per draw the
  columns it reads and its fitted combiner (one draw: a deployed detector;
  several: EOT over draws the attacker cannot tell apart, equally likely).
  ``defence=None``: the undefended victim (only fooling it counts)."""
  defence: Defence | None
  draws: tuple[tuple[tuple[int, ...], combine.Combiner], ...] = ()

  @classmethod
  def of(cls, defence: Defence, combiner: combine.Combiner) -> "Target":
    return cls(defence, ((tuple(range(len(defence.modules))), combiner),))

  @property
  def columns(self) -> tuple[tuple[int, ...], ...]:
    return tuple(cols for cols, _ in self.draws)

  @property
  def combiners(self) -> tuple[combine.Combiner, ...]:
    return tuple(c for _, c in self.draws)

  def penalty(self, s_NxM, margin: float) -> jax.Array:
    """(N,) the attacker's penalty on the defence's scores (``_penalty``)."""
    return _penalty(self.columns, self.combiners, s_NxM, margin)


def _penalty(columns, combiners, s_NxM, margin):
  """EOT: the draws' penalties averaged (zero without a defence)."""
  if not combiners:
    return jnp.zeros(s_NxM.shape[0])
  return sum(c.penalty(s_NxM[:, list(cols)], margin)
             for cols, c in zip(columns, combiners)) / len(combiners)


def _passes(columns, combiners, s_NxM):
  """Passes every draw."""
  ok = jnp.ones(s_NxM.shape[0], bool)
  for cols, c in zip(columns, combiners):
    ok = ok & (c.statistic(s_NxM[:, list(cols)]) <= c.threshold)
  return ok


def checkpoints(steps: int) -> np.ndarray:
  """APGD's checkpoints as a 0/1 mask over iterations 0..steps, in integer
  steps as AutoAttack's code counts them: the first after int(0.22 N), each
  interval then 0.03 N shorter, never below 0.06 N (N = 100: 22, 41, 57, 70,
  80, 87, 93, 99; the paper's p_j = 0, 0.22, 0.41, ...)."""
  first, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), \
      max(int(0.06 * steps), 1)
  mask = np.zeros(steps + 1, bool)
  k, at = first, first
  while at <= steps:
    mask[at] = True
    k = max(k - shrink, least)
    at += k
  return mask


@functools.partial(jax.jit, static_argnames=("fn", "logits_fn", "columns", "steps", "bpda",
                                           "kappa", "momentum", "rho"))
def _apgd(params, combiners, x, y, x0, c, eps, margin, *, fn, logits_fn, columns, steps, bpda,
          kappa, momentum, rho):
  """One APGD run from ``x0``: (kept images, evaded). Compiled once per
  defence function, victim, columns, step count and gradient kind: epsilon,
  the penalty weight and every combiner (a pytree) are arguments."""
  ckpt = jnp.asarray(checkpoints(steps))
  n = x.shape[0]
  proj = lambda xa: jnp.clip(jnp.clip(xa, x - eps, x + eps), 0, 1)
  b = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))

  def objective(xa):
    """(sum, (per-image objective, ok)), ok = fooled and passes (exact scores)."""
    z = logits_fn(xa)
    zy = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z), -1)
    f = jnp.maximum(zy - other, -kappa)
    if fn is None:
      return jnp.sum(f), (f, zy < other)
    s = fn(params, xa, bpda)
    s_exact = jax.lax.stop_gradient(fn(params, xa, False) if bpda else s)
    f = f + c * _penalty(columns, combiners, s, margin)
    return jnp.sum(f), (f, (zy < other) & _passes(columns, combiners, s_exact))

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  (_, (f0, ok0)), g0 = grad_fn(x0)
  eta0 = jnp.full(n, 2 * eps)
  state = dict(x=x0, x_prev=x0, f=f0, g=g0, x_best=x0, f_best=f0, g_best=g0, eta=eta0,
               count=jnp.zeros(n), f_best_ckpt=f0, reduced=jnp.zeros(n, bool), found=ok0,
               x_found=x0, last_ckpt=jnp.zeros(n))

  def step(s, k):
    z = proj(s["x"] - b(s["eta"]) * jnp.sign(s["g"]))
    a = jnp.where(k == 0, 1.0, momentum)
    xn = proj(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_prev"]))
    (_, (fn_, okn)), gn = grad_fn(xn)
    new = okn & ~s["found"]
    better = fn_ < s["f_best"]
    s2 = dict(s, x_prev=s["x"], x=xn, f=fn_, g=gn, count=s["count"] + (fn_ < s["f"]),
              x_best=jnp.where(b(better), xn, s["x_best"]), f_best=jnp.minimum(fn_, s["f_best"]),
              g_best=jnp.where(b(better), gn, s["g_best"]),
              found=s["found"] | okn, x_found=jnp.where(b(new), xn, s["x_found"]))
    # checkpoint after step k + 1: halve the step and restart from the best point
    at = ckpt[k + 1]
    cond1 = s2["count"] < rho * (k + 1 - s["last_ckpt"])
    cond2 = ~s["reduced"] & (s2["f_best"] >= s["f_best_ckpt"])
    red = at & (cond1 | cond2)
    s2["eta"] = jnp.where(red, s2["eta"] / 2, s2["eta"])
    for key, src in (("x", "x_best"), ("x_prev", "x_best"), ("g", "g_best")):
      s2[key] = jnp.where(b(red), s2[src], s2[key])
    s2["count"] = jnp.where(at, 0.0, s2["count"])
    s2["reduced"] = jnp.where(at, red, s["reduced"])
    s2["f_best_ckpt"] = jnp.where(at, s2["f_best"], s["f_best_ckpt"])
    s2["last_ckpt"] = jnp.where(at, k + 1.0, s["last_ckpt"])
    return s2, None

  s, _ = jax.lax.scan(step, state, jnp.arange(steps))
  return jnp.where(b(s["found"]), s["x_found"], s["x_best"]), s["found"]


def attack(target: Target, logits_fn, x, y, cfg: AdaptiveConfig = AdaptiveConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
  """(adversarial images, evaded: fooled the victim and passed) for every
  restart, penalty weight and gradient kind, each image keeping the first
  evasion found (else the last attempt's best point)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  d = target.defence
  n = x.shape[0]
  proj = lambda xa: jnp.clip(jnp.clip(xa, x - cfg.eps, x + cfg.eps), 0, 1)
  static = dict(fn=d.fn if d is not None else None, logits_fn=logits_fn,
                columns=target.columns if d is not None else (), steps=cfg.steps,
                kappa=cfg.kappa, momentum=cfg.momentum, rho=cfg.rho)
  args = (d.params if d is not None else None, target.combiners if d is not None else ())
  out, evaded = np.asarray(x).copy(), np.zeros(n, bool)
  kinds = [g == "bpda" for g in cfg.gradients
           if g == "exact" or (d is not None and d.has_bpda)]
  key = jax.random.key(cfg.seed)
  for r in range(cfg.restarts):
    x0 = x if r == 0 else proj(x + cfg.eps * jax.random.uniform(
        jax.random.fold_in(key, r), x.shape, minval=-1.0, maxval=1.0))
    for bpda in kinds:
      for c in (cfg.penalties if d is not None else (0.0,)):
        xa, ok = (np.asarray(a) for a in _apgd(*args, x, y, x0, jnp.float32(c),
                                               jnp.float32(cfg.eps), jnp.float32(cfg.margin),
                                               bpda=bpda, **static))
        new = ok & ~evaded
        out[new] = xa[new]
        out[~evaded & ~ok] = xa[~evaded & ~ok]   # not evaded yet: the latest attempt's best
        evaded |= ok
  return out, evaded


def residual_success(target: Target, logits_fn, x_adv, y, draws: Sequence[int] | None = None
                     ) -> np.ndarray:
  """(D, N): fooled and passing draw d (all of ``target``'s draws, or
  ``draws``), recomputed from scratch with the defence's exact scores; one row
  without a defence."""
  fooled = np.asarray(logits_fn(jnp.asarray(x_adv)).argmax(-1)) != np.asarray(y)
  if target.defence is None:
    return fooled[None]
  s = target.defence.scores(x_adv)
  idx = range(len(target.draws)) if draws is None else draws
  return np.stack([fooled & ~target.draws[i][1].flags(s[:, list(target.draws[i][0])])
                   for i in idx])
