"""The adaptive white-box attacker (Carlini & Wagner 2017; Tramer et al. 2020):
it knows the victim, every module of the defence and its thresholds, and runs
PGD (L-infinity) on

    max(z_y - max_{j != y} z_j, -kappa) + c * sum_m relu((s_m(x) - t_m) / sigma_m + margin)

where s_m are the module scores, t_m the deployed thresholds and sigma_m the
spread of clean validation scores. Gradients go through everything the
defence computes ("exact": through OMP that is the least-squares projection on
the chosen atoms, a locally exact gradient) and, where a step is not usefully
differentiable, also by BPDA ("bpda": OMP denoising and feature squeezing's
rounding as the identity). Each example keeps the first iterate that fools
the victim and passes every module, over the penalty weights c and both
gradient kinds.
"""

from __future__ import annotations

import dataclasses
import functools

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
  # "exact": gradients through everything (through OMP, the fixed support's
  # least-squares projection); "bpda": non-differentiable steps as identity.
  # Each example keeps whichever evades first.
  gradients: tuple[str, ...] = ("exact", "bpda")
  kappa: float = 2.0          # how confidently the victim should be fooled
  margin: float = 0.1         # how far below each threshold (in sigma) to aim

  def __post_init__(self):
    if not (self.eps >= 0 and self.steps >= 1 and self.penalties and self.gradients
            and set(self.gradients) <= {"exact", "bpda"}):
      raise ValueError(f"bad AdaptiveConfig {self}")


def attack(defence: Defence, logits_fn, thr_M, sigma_M, x, y, cfg: AdaptiveConfig = AdaptiveConfig()
           ) -> tuple[np.ndarray, np.ndarray]:
  """(adversarial images, evaded: fooled the victim and passed every module)."""
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.int32)
  thr, sig = jnp.asarray(thr_M, jnp.float32), jnp.maximum(jnp.asarray(sigma_M, jnp.float32), 1e-6)

  def loss(xa, c, params, bpda):
    z = logits_fn(xa)
    zy = jnp.take_along_axis(z, y[:, None], 1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(y, z.shape[-1], dtype=bool), -jnp.inf, z), -1)
    s = defence.fn(params, xa, bpda)
    pen = jnp.sum(jax.nn.relu((s - thr) / sig + cfg.margin), -1)
    ok = (zy < other) & jnp.all(defence.fn(params, xa, False) <= thr, -1)
    return jnp.sum(jnp.maximum(zy - other, -cfg.kappa) + c * pen), ok

  @functools.partial(jax.jit, static_argnums=2)
  def run(c, params, bpda):
    def step(carry, _):
      xa, best, found = carry
      g, ok = jax.grad(loss, has_aux=True)(xa, c, params, bpda)
      new = ok & ~found
      best = jnp.where(_b(new, x), xa, best)
      found = found | ok
      xa = jnp.clip(jnp.clip(xa - cfg.step_size * jnp.sign(g), x - cfg.eps, x + cfg.eps), 0, 1)
      return (xa, best, found), None
    (xa, best, found), _ = jax.lax.scan(step, (x, x, jnp.zeros(len(x), bool)), None,
                                        length=cfg.steps)
    _, ok = loss(xa, c, params, False)
    return jnp.where(_b(found, x), best, xa), found | ok

  out, evaded = np.asarray(x).copy(), np.zeros(len(x), bool)
  kinds = [g == "bpda" for g in cfg.gradients if g == "exact" or defence.has_bpda]
  for bpda in kinds:
    for c in cfg.penalties:
      xa, ok = (np.asarray(a) for a in run(jnp.float32(c), defence.params, bpda))
      new = ok & ~evaded
      out[new] = xa[new]
      # examples nothing has evaded keep the latest attempt (fooled but caught, say)
      out[~evaded & ~ok] = xa[~evaded & ~ok]
      evaded |= ok
  return out, evaded


def _b(v, like):
  return v.reshape((-1,) + (1,) * (like.ndim - 1))
