"""The adaptive white-box attacker (Carlini & Wagner 2017; Tramer et al. 2020):
it knows the victim, every module of the defence and its thresholds, and runs
PGD (L-infinity) on

    max(z_y - max_{j != y} z_j, -kappa) + c * sum_m relu((s_m(x) - t_m) / sigma_m + margin)

where s_m are the module scores, t_m the deployed thresholds and sigma_m the
spread of clean validation scores. Non-differentiable modules are crossed by
BPDA (the input defender's OMP denoising and feature squeezing's rounding
pass gradients straight through). Each example keeps the first iterate that
fools the victim and passes every module, over a few penalty weights c.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from secure.curtail.defences import Defence


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  eps: float = 0.1
  steps: int = 100
  step_size: float = 0.01
  penalties: tuple[float, ...] = (1.0, 10.0)
  kappa: float = 2.0          # how confidently the victim should be fooled
  margin: float = 0.1         # how far below each threshold (in sigma) to aim

  def __post_init__(self):
    if not (self.eps >= 0 and self.steps >= 1 and self.penalties):
      raise ValueError(f"bad AdaptiveConfig {self}")


def attack(defence: Defence, logits_fn, thr_M, sigma_M, x, y, cfg: AdaptiveConfig = AdaptiveConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
  """(adversarial images, evaded: fooled the victim and passed every module)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  thr, sig = jnp.asarray(thr_M, jnp.float32), jnp.maximum(jnp.asarray(sigma_M, jnp.float32), 1e-6)

  def loss(xa, c):
    z = logits_fn(xa)
    zy = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z), -1)
    s = defence.traced(xa, bpda=True)
    pen = jnp.sum(jax.nn.relu((s - thr) / sig + cfg.margin), -1)
    ok = (zy < other) & jnp.all(s <= thr, -1)
    return jnp.sum(jnp.maximum(zy - other, -cfg.kappa) + c * pen), ok

  @jax.jit
  def run(c):
    def step(carry, _):
      xa, best, found = carry
      g, ok = jax.grad(loss, has_aux=True)(xa, c)
      new = ok & ~found
      best = jnp.where(_b(new, x), xa, best)
      found = found | ok
      xa = jnp.clip(jnp.clip(xa - cfg.step_size * jnp.sign(g), x - cfg.eps, x + cfg.eps), 0, 1)
      return (xa, best, found), None
    (xa, best, found), _ = jax.lax.scan(step, (x, x, jnp.zeros(len(x), bool)), None,
                                        length=cfg.steps)
    _, ok = loss(xa, c)
    return jnp.where(_b(found, x), best, xa), found | ok

  out, evaded = np.asarray(x).copy(), np.zeros(len(x), bool)
  for c in cfg.penalties:
    xa, ok = (np.asarray(a) for a in run(jnp.float32(c)))
    new = ok & ~evaded
    out[new] = xa[new]
    # examples no weight has evaded keep the last weight's attempt (fooled but caught, say)
    out[~evaded & ~ok] = xa[~evaded & ~ok]
    evaded |= ok
  return out, evaded


def _b(v, like):
  return v.reshape((-1,) + (1,) * (like.ndim - 1))
