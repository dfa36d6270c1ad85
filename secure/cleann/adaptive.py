"""An adaptive attacker against CLEANN: one who knows the shield (its input and
latent dictionaries, scales and thresholds) and designs a trigger the
dictionaries represent well while it still activates a backdoor.

1. Starting from an existing backdoored victim, optimise an additive trigger
   (L-infinity bounded by ``epsilon``) for the victim's target-class loss plus
   ``penalty`` times the shield's scores on the triggered images (the input
   score as a soft maximum over patches, and the latent score; gradients flow
   through OMP's least-squares step with its greedy support held fixed).
2. Poison a fresh victim with that trigger, so the backdoor is built for it.
3. The defender fits its shield on the new victim as usual; the attacker's
   trigger is then measured like any other.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from core.models import layers
from secure import sparse, triggers
from secure.cleann import analyzers, purify, shield
from secure.cleann.shield import Shield
from secure.cleann.victims import Victim


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
  epsilon: float = 0.2       # largest change of any pixel
  steps: int = 150
  lr: float = 0.01
  penalty: float = 1.0       # weight of the shield's normalised scores
  temperature: float = 0.1   # soft maximum over patches
  batch: int = 32
  seed: int = 0


def _shield_score(sh: Shield, x, temperature: float):
  """The shield's combined statistic, traced: the input analyzer's worst
  patch as a soft maximum, the envelope's count as a sum of sigmoids, each
  latent analyzer's residual (OMP's support held fixed), through the
  calibrated p-values of the deployed combination."""
  an = sh.input
  p = analyzers.to_dct(analyzers.patches(x, an.patch), an.patch.size)
  n, np_, s = p.shape
  flat = p.reshape(n * np_, s)
  d_in = jnp.asarray(an.dictionary)
  codes = sparse.omp_traced(flat, d_in, an.n_nonzero)
  r = jnp.sum((flat - codes @ d_in) ** 2, axis=-1).reshape(n, np_)
  r = r / jnp.asarray(an.position_scale)
  cols = [temperature * jax.nn.logsumexp(r / temperature, axis=1)]
  if sh.envelope is not None:
    e = sh.envelope
    out = jnp.maximum(x - e.hi - e.margin, e.lo - e.margin - x).reshape(n, -1)
    cols.append(jax.nn.sigmoid(out / (temperature * 0.01)).mean(axis=1))
  for layer, lat in sh.latents.items():
    cols.append(purify.latent_residual(
        functools.partial(shield.layer_features, sh.model.classifier, layer), sh.model.params,
        lat.dictionary, lat.n_nonzero, x))
  return sh.combiners[min(sh.combiners)].statistic(jnp.stack(cols, axis=1))


def optimise_trigger(victim: Victim, sh: Shield, x: np.ndarray,
                     cfg: AdaptiveConfig = AdaptiveConfig()) -> tuple[np.ndarray, list[dict]]:
  """The additive trigger (H, W, C) and a loss history (every 25 steps)."""
  x = jnp.asarray(x, jnp.float32)
  target = victim.cfg.target

  def loss(raw, xb):
    xt = jnp.clip(xb + cfg.epsilon * jnp.tanh(raw), 0.0, 1.0)
    ce = layers.cross_entropy(victim.classifier.apply(victim.params, xt),
                              jnp.full((xb.shape[0],), target))
    score = _shield_score(sh, xt, cfg.temperature).mean()
    return ce + cfg.penalty * score, (ce, score)

  opt = optax.adam(cfg.lr)
  raw = jnp.zeros(x.shape[1:])
  state = opt.init(raw)
  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  rng = np.random.default_rng(cfg.seed)
  hist = []
  for i in range(cfg.steps):
    xb = x[rng.choice(len(x), min(cfg.batch, len(x)), replace=False)]
    (val, (ce, score)), g = step(raw, xb)
    upd, state = opt.update(g, state, raw)
    raw = optax.apply_updates(raw, upd)
    if i % 25 == 0 or i == cfg.steps - 1:
      hist.append({"step": i, "ce": float(ce), "shield_score": float(score)})
  return np.asarray(cfg.epsilon * jnp.tanh(raw)), hist


def adaptive_trigger(victim: Victim, sh: Shield, cfg: AdaptiveConfig = AdaptiveConfig()
                     ) -> tuple[triggers.Additive, list[dict]]:
  """Step 1 on clean training images the attacker holds (never the
  defender's or a test image)."""
  delta, hist = optimise_trigger(victim, sh, victim.attacker_x, cfg)
  return triggers.Additive(delta), hist
