"""The MRR defender as one pure JAX function over arrays: the victim's label,
then every module's score (higher = more suspicious), jitted, so it can be
differentiated (the adaptive attacker), sharded over devices with
``jax.shard_map`` and shipped to other processes (``parallel``).

Modules: one latent defender per entry of ``Spec.latent_layers`` (minus the
log-density of the reduced features under the predicted class's Gaussian)
and the input defender (minus the victim's log-probability of its label after
OMP denoising with that class's patch dictionary). ``LatentDefender`` and
``InputDefender`` compute the same scores one module at a time; a test pins
them together.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core.models import CLASSIFIERS
from secure import sparse
from secure.cleann import analyzers


@dataclasses.dataclass(frozen=True)
class Spec:
  """What is static about an MRR defender (hashable: a jit static argument)."""
  model: str
  model_config: Any
  latent_layers: tuple[int, ...]
  patch: analyzers.PatchConfig
  n_nonzero: int

  @property
  def names(self) -> tuple[str, ...]:
    return (*(f"latent{l}" for l in self.latent_layers), "input")


def arrays(victim_params, latents: Sequence, input_defender) -> dict:
  """The defender's arrays (a pytree of float32): the victim, each latent
  module (fine-tuned network, PCA, class Gaussians), the class dictionaries."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"victim": victim_params,
          "latent": [{"net": d.params, "mean": f32(d.mean), "comps": f32(d.components),
                      "means": f32(d.class_means), "prec": f32(d.class_prec),
                      "logdet": f32(d.class_logdet)} for d in latents],
          "dicts": f32(input_defender.dictionaries)}


def spec_of(model: str, model_config, latents: Sequence, input_defender) -> Spec:
  return Spec(model, model_config, tuple(d.layer for d in latents), input_defender.patch,
              input_defender.n_nonzero)


def denoise(dicts_CxKxS, x_NxHxWx1, labels_N, patch: analyzers.PatchConfig, n_nonzero: int
            ) -> jax.Array:
  """Each image rebuilt from its patches' OMP codes in the dictionary of its
  label, clipped to [0, 1] (traceable)."""
  p = analyzers.patches(x_NxHxWx1, patch)                                # (N, P, S)
  d = dicts_CxKxS[labels_N]                                              # (N, K, S)
  codes = jax.vmap(lambda pi, di: sparse.omp_traced(pi, di, n_nonzero))(p, d)
  rec = jnp.einsum("npk,nks->nps", codes, d)
  return jnp.clip(analyzers.assemble(rec, x_NxHxWx1.shape[1:3], patch), 0.0, 1.0)


def latent_score(spec: Spec, lat: dict, layer: int, x, labels) -> jax.Array:
  """Minus the log-density (up to a constant) under the Gaussian of ``labels``."""
  f = CLASSIFIERS[spec.model].features(lat["net"], x, spec.model_config, layer=layer)
  z = (f - lat["mean"]) @ lat["comps"]                                   # (N, R)
  dz = z[:, None] - lat["means"][None]                                   # (N, C, R)
  maha = jnp.einsum("ncr,crs,ncs->nc", dz, lat["prec"], dz)
  nll = 0.5 * (maha + lat["logdet"][None])
  return jnp.take_along_axis(nll, labels[:, None], 1)[:, 0]


def input_score(spec: Spec, arr: dict, x, labels, bpda: bool = False) -> jax.Array:
  """Minus the victim's log-probability of ``labels`` on the denoised images;
  ``bpda``: the backward pass treats denoising as the identity (Athalye et al.)."""
  xd = denoise(arr["dicts"], x, labels, spec.patch, spec.n_nonzero)
  if bpda:
    xd = x + jax.lax.stop_gradient(xd - x)
  z = jax.nn.log_softmax(_logits(spec, arr["victim"], xd), -1)
  return -jnp.take_along_axis(z, labels[:, None], 1)[:, 0]


def _logits(spec: Spec, params, x):
  return CLASSIFIERS[spec.model].apply(params, x, spec.model_config)


def scores_traced(spec: Spec, arr: dict, x, bpda: bool = False) -> jax.Array:
  """(N, modules) scores in ``spec.names`` order; labels are the victim's."""
  labels = jax.lax.stop_gradient(_logits(spec, arr["victim"], x).argmax(-1))
  cols = [latent_score(spec, lat, l, x, labels) for lat, l in zip(arr["latent"],
                                                                  spec.latent_layers)]
  cols.append(input_score(spec, arr, x, labels, bpda))
  return jnp.stack(cols, axis=1)


scores = jax.jit(scores_traced, static_argnums=(0, 3))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_module(spec: Spec, m: int, arr: dict, x) -> jax.Array:
  labels = _logits(spec, arr["victim"], x).argmax(-1)
  if m < len(spec.latent_layers):
    return latent_score(spec, arr["latent"][m], spec.latent_layers[m], x, labels)
  return input_score(spec, arr, x, labels)


def scores_in_turn(spec: Spec, arr: dict, x) -> jax.Array:
  """The same scores with each module its own call, one after another (the
  sequential baseline the sharded run is measured against)."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.stack([_one_module(spec, m, arr, x) for m in range(len(spec.names))], axis=1)


def batched(fn, x, batch: int = 500) -> np.ndarray:
  """``fn`` over ``x`` in pieces of ``batch`` (bounded memory), as NumPy."""
  x = np.asarray(x, np.float32)
  return np.concatenate([np.asarray(fn(jnp.asarray(x[i:i + batch])))
                         for i in range(0, len(x), batch)])
