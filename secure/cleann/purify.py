"""Recovery from the latent side: the input reconstruction guided by a latent
dictionary.

Where the trigger is woven into the image (a pattern blended over the garment,
a warp), no input-domain reconstruction removes it: the patch dictionary
explains it and the pixel envelope only clears the background. The latent
analyzer still sees it, because the backdoor drives the victim's features
off the benign dictionary's span. So recovery moves the input, within an
L-infinity ball of radius ``epsilon``, down the latent analyzer's residual
(signed gradient steps, the gradient flowing through OMP's least-squares
step with its greedy support held fixed) and returns the victim's label on
the result: the nearest input whose features the benign dictionary explains.

Chosen on the seed-0 development victims (docs/RESULTS.md, issue 24): the
second conv stage's dictionary over the dense layer's (Fashion-MNIST blend:
81% vs 56% recovered at epsilon 0.1), 30 steps of epsilon / 10 over 10 steps
of epsilon / 4, epsilon 0.1 over 0.05 / 0.2 / 0.3 (larger radii cost clean
images their label).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from secure import sparse


@dataclasses.dataclass(frozen=True)
class PurifyConfig:
  epsilon: float = 0.1
  steps: int = 30
  batch: int = 256

  def __post_init__(self):
    if self.epsilon <= 0 or self.steps < 1 or self.batch < 1:
      raise ValueError(f"need epsilon > 0, steps >= 1, batch >= 1, got {self}")


def latent_residual(features: Callable, params, dictionary, n_nonzero: int, x) -> jax.Array:
  """(N,) squared residual of the features' sparse code (traceable)."""
  f = features(params, x).reshape(x.shape[0], -1)
  d = jnp.asarray(dictionary, f.dtype)
  codes = sparse.omp_traced(f, d, n_nonzero)
  return jnp.sum((f - codes @ d) ** 2, axis=-1)


@functools.partial(jax.jit, static_argnames=("features", "n_nonzero", "steps"))
def _descend(features, params, dictionary, n_nonzero: int, x, epsilon, steps: int):
  grad = jax.grad(lambda z: latent_residual(features, params, dictionary, n_nonzero, z).sum())

  def body(_, z):
    z = z - (epsilon / 10) * jnp.sign(grad(z))
    return jnp.clip(jnp.clip(z, x - epsilon, x + epsilon), 0.0, 1.0)

  return jax.lax.fori_loop(0, steps, body, x)


def purify(features: Callable, params, dictionary: np.ndarray, n_nonzero: int, x,
           cfg: PurifyConfig = PurifyConfig()) -> np.ndarray:
  """``x`` moved down the latent residual. ``features(params, x)`` gives the
  analyzed layer's activations; it must be hashable (a module-level function
  or a ``functools.partial`` of one), as it keys the compiled descent, and
  the params are an argument (not constants folded into it)."""
  x = np.asarray(x, np.float32)
  out = []
  for i in range(0, len(x), cfg.batch):
    chunk = x[i:i + cfg.batch]
    # Padded to a power of two (at most ``batch``): a few compiled shapes serve any N.
    n = min(cfg.batch, 1 << max(len(chunk) - 1, 0).bit_length())
    padded = np.concatenate([chunk, np.zeros((n - len(chunk), *x.shape[1:]), np.float32)])
    out.append(np.asarray(_descend(features, params, jnp.asarray(dictionary), n_nonzero,
                                   jnp.asarray(padded), cfg.epsilon, cfg.steps))[:len(chunk)])
  return np.concatenate(out) if out else x
