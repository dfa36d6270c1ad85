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
(``checkpoints``: 22%, 41%, ... of the budget) where fewer than rho = 75% of the steps since
the last one improved the objective, or where the best objective did not move
since the last checkpoint without a halving there, then restarting from the
best point. Restarts: the first from the clean image, the rest from uniform
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

from secure.curtail import combine
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

  def penalty(self, s_NxM, margin: float):
    if self.defence is None:
      return jnp.zeros(s_NxM.shape[0])
    return sum(c.penalty(s_NxM[:, list(cols)], margin)
               for cols, c in self.draws) / len(self.draws)

  def passes(self, s_NxM):
    if self.defence is None:
      return jnp.ones(s_NxM.shape[0], bool)
    return functools.reduce(jnp.logical_and, [
        c.statistic(s_NxM[:, list(cols)]) <= c.threshold for cols, c in self.draws])


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


def attack(target: Target, logits_fn, x, y, cfg: AdaptiveConfig = AdaptiveConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
  """(adversarial images, evaded: fooled the victim and passed) for every
  restart, penalty weight and gradient kind, each image keeping the first
  evasion found (else the last attempt's best point)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  d = target.defence
  params = d.params if d is not None else None
  ckpt = jnp.asarray(checkpoints(cfg.steps))
  n = x.shape[0]

  def objective(xa, c, p, bpda):
    """(sum, (per-image objective, ok)), ok = fooled and passes (exact scores)."""
    z = logits_fn(xa)
    zy = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z), -1)
    if d is None:
      f, ok = jnp.maximum(zy - other, -cfg.kappa), zy < other
      return jnp.sum(f), (f, ok)
    s = d.fn(p, xa, bpda)
    s_exact = d.fn(p, xa, False) if bpda else s
    f = jnp.maximum(zy - other, -cfg.kappa) + c * target.penalty(s, cfg.margin)
    ok = (zy < other) & target.passes(jax.lax.stop_gradient(s_exact))
    return jnp.sum(f), (f, ok)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  proj = lambda xa: jnp.clip(jnp.clip(xa, x - cfg.eps, x + cfg.eps), 0, 1)
  b = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))

  @functools.partial(jax.jit, static_argnums=3)
  def run(x0, c, p, bpda):
    (_, (f0, ok0)), g0 = grad_fn(x0, c, p, bpda)
    eta0 = jnp.full(n, 2 * cfg.eps)
    state = dict(x=x0, x_prev=x0, f=f0, g=g0, x_best=x0, f_best=f0, g_best=g0, eta=eta0,
                 count=jnp.zeros(n), eta_ckpt=eta0, f_best_ckpt=f0,
                 reduced=jnp.zeros(n, bool), found=ok0, x_found=x0, last_ckpt=jnp.zeros(n))

    def step(s, k):
      z = proj(s["x"] - b(s["eta"]) * jnp.sign(s["g"]))
      a = jnp.where(k == 0, 1.0, cfg.momentum)
      xn = proj(s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["x_prev"]))
      (_, (fn, okn)), gn = grad_fn(xn, c, p, bpda)
      new = okn & ~s["found"]
      better = fn < s["f_best"]
      s2 = dict(s, x_prev=s["x"], x=xn, f=fn, g=gn,
                count=s["count"] + (fn < s["f"]),
                x_best=jnp.where(b(better), xn, s["x_best"]), f_best=jnp.minimum(fn, s["f_best"]),
                g_best=jnp.where(b(better), gn, s["g_best"]),
                found=s["found"] | okn, x_found=jnp.where(b(new), xn, s["x_found"]))
      # checkpoint after step k + 1: halve the step and restart from the best point
      at = ckpt[k + 1]
      interval = k + 1 - s["last_ckpt"]
      cond1 = s2["count"] < cfg.rho * interval
      cond2 = ~s["reduced"] & (s2["f_best"] >= s["f_best_ckpt"])
      red = at & (cond1 | cond2)
      s2["eta"] = jnp.where(red, s2["eta"] / 2, s2["eta"])
      s2["x"] = jnp.where(b(red), s2["x_best"], s2["x"])
      s2["x_prev"] = jnp.where(b(red), s2["x_best"], s2["x_prev"])
      s2["g"] = jnp.where(b(red), s2["g_best"], s2["g"])
      s2["count"] = jnp.where(at, 0.0, s2["count"])
      s2["reduced"] = jnp.where(at, red, s["reduced"])
      s2["f_best_ckpt"] = jnp.where(at, s2["f_best"], s["f_best_ckpt"])
      s2["last_ckpt"] = jnp.where(at, k + 1.0, s["last_ckpt"])
      return s2, None

    s, _ = jax.lax.scan(step, state, jnp.arange(cfg.steps))
    return jnp.where(b(s["found"]), s["x_found"], s["x_best"]), s["found"]

  out, evaded = np.asarray(x).copy(), np.zeros(n, bool)
  kinds = [g == "bpda" for g in cfg.gradients
           if g == "exact" or (d is not None and d.has_bpda)]
  key = jax.random.key(cfg.seed)
  for r in range(cfg.restarts):
    x0 = x if r == 0 else proj(x + cfg.eps * jax.random.uniform(
        jax.random.fold_in(key, r), x.shape, minval=-1.0, maxval=1.0))
    for bpda in kinds:
      for c in (cfg.penalties if d is not None else (0.0,)):
        xa, ok = (np.asarray(a) for a in run(x0, jnp.float32(c), params, bpda))
        new = ok & ~evaded
        out[new] = xa[new]
        out[~evaded & ~ok] = xa[~evaded & ~ok]   # not evaded yet: the latest attempt's best
        evaded |= ok
  return out, evaded


def residual_success(target: Target, logits_fn, x_adv, y, draws: Sequence[int] | None = None
                     ) -> np.ndarray:
  """(N,) fooled and passing, recomputed from scratch on ``target``'s draws
  (each draw separately: (D, N)) with the defence's exact scores."""
  fooled = np.asarray(logits_fn(jnp.asarray(x_adv)).argmax(-1)) != np.asarray(y)
  if target.defence is None:
    return fooled[None]
  s = target.defence.scores(x_adv)
  idx = range(len(target.draws)) if draws is None else draws
  return np.stack([fooled & ~target.draws[i][1].flags(s[:, list(target.draws[i][0])])
                   for i in idx])
