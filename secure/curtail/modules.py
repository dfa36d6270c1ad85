"""The MRR defender as one pure JAX function over arrays: the victim's label,
then every module's score (higher = more suspicious), jitted, so it can be
differentiated (the adaptive attacker), sharded over devices with
``jax.shard_map`` and shipped to other processes (``parallel``).

Modules, in ``Spec.names`` order:

* ``latent<l>``: one per entry of ``Spec.latent_layers`` (a layer may repeat:
  a randomised pool fits several): minus the log-density of the reduced
  features under the Gaussian of the class *the victim predicts*.
* ``input``: minus the victim's log-probability of its label after OMP
  denoising with that class's patch dictionary (one per ``Spec.n_input``).
* ``residual``, ``energy``: the label-free module (``residual``): how badly
  one class-agnostic patch dictionary explains the image, per pixel relative
  to clean images and in raw squared energy (two scores per
  ``Spec.n_residual``).

``LatentDefender`` and ``InputDefender`` compute the first two one module at
a time; a test pins them together.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from core import buckets
from secure import sparse
from secure.classifier import Classifier
from secure.cleann import analyzers
from secure.curtail import residual


@dataclasses.dataclass(frozen=True)
class Spec:
  """What is static about an MRR defender (hashable: a jit static argument)."""
  classifier: Classifier
  latent_layers: tuple[Hashable, ...]
  patch: analyzers.PatchConfig              # the class-conditional input modules'
  n_nonzero: int
  n_input: int = 1
  residual: residual.ResidualConfig | None = None
  n_residual: int = 0

  @property
  def names(self) -> tuple[str, ...]:
    raw = [f"latent{l}" for l in self.latent_layers] + ["input"] * self.n_input + \
        list(residual.NAMES) * self.n_residual
    seen: dict[str, int] = {}
    out = []
    for r in raw:   # repeated modules (a pool's seeds) get a suffix: latent-1, latent-1.1
      seen[r] = seen.get(r, -1) + 1
      out.append(r if seen[r] == 0 else f"{r}.{seen[r]}")
    return tuple(out)


def arrays(victim_params, latents: Sequence, input_defenders: Sequence,
           residuals: Sequence[dict] = ()) -> dict:
  """The defender's arrays (a pytree of float32): the victim, each latent
  module (fine-tuned network, PCA, class Gaussians), the class dictionaries of
  each input module, each residual module's dictionary and pixel scales."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"victim": victim_params,
          "latent": [{"net": d.params, "mean": f32(d.mean), "comps": f32(d.components),
                      "means": f32(d.class_means), "prec": f32(d.class_prec),
                      "logdet": f32(d.class_logdet)} for d in latents],
          "dicts": [f32(d.dictionaries) for d in input_defenders],
          "residual": [jax.tree.map(f32, r) for r in residuals]}


def spec_of(clf: Classifier, latents: Sequence, input_defenders: Sequence,
            residual_cfg: residual.ResidualConfig | None = None, n_residual: int = 0) -> Spec:
  inp = input_defenders[0]
  if any((d.patch, d.n_nonzero) != (inp.patch, inp.n_nonzero) for d in input_defenders):
    raise ValueError("the input modules must share one patch size and sparsity")
  return Spec(clf, tuple(d.layer for d in latents), inp.patch, inp.n_nonzero,
              len(input_defenders), residual_cfg if n_residual else None, n_residual)


def denoise(dicts_CxKxS, x_NxHxWx1, labels_N, patch: analyzers.PatchConfig, n_nonzero: int
            ) -> jax.Array:
  """Each image rebuilt from its patches' OMP codes in the dictionary of its
  label, clipped to [0, 1] (traceable)."""
  p = analyzers.patches(x_NxHxWx1, patch)                                # (N, P, S)
  d = dicts_CxKxS[labels_N]                                              # (N, K, S)
  codes = jax.vmap(lambda pi, di: sparse.omp_traced(pi, di, n_nonzero))(p, d)
  rec = jnp.einsum("npk,nks->nps", codes, d)
  return jnp.clip(analyzers.assemble(rec, x_NxHxWx1.shape[1:3], patch), 0.0, 1.0)


def latent_score(spec: Spec, lat: dict, layer, x, labels) -> jax.Array:
  """Minus the log-density (up to a constant) under the Gaussian of ``labels``."""
  f = spec.classifier.features(lat["net"], x, layer)
  z = (f - lat["mean"]) @ lat["comps"]                                   # (N, R)
  dz = z[:, None] - lat["means"][None]                                   # (N, C, R)
  maha = jnp.einsum("ncr,crs,ncs->nc", dz, lat["prec"], dz)
  nll = 0.5 * (maha + lat["logdet"][None])
  return jnp.take_along_axis(nll, labels[:, None], 1)[:, 0]


def input_score(spec: Spec, victim, dicts, x, labels, bpda: bool = False) -> jax.Array:
  """Minus the victim's log-probability of ``labels`` on the denoised images;
  ``bpda``: the backward pass treats denoising as the identity (Athalye et al.)."""
  xd = denoise(dicts, x, labels, spec.patch, spec.n_nonzero)
  if bpda:
    xd = x + jax.lax.stop_gradient(xd - x)
  z = jax.nn.log_softmax(spec.classifier.apply(victim, xd), -1)
  return -jnp.take_along_axis(z, labels[:, None], 1)[:, 0]


def residual_scores(spec: Spec, res: dict, x, bpda: bool = False) -> jax.Array:
  """The label-free module's two scores (N, 2) (``residual.scores``)."""
  return residual.scores(res, x, spec.residual.patch, spec.residual.dictionary.n_nonzero, bpda)


def _columns(spec: Spec, arr: dict, x, labels, bpda: bool) -> list:
  cols = [latent_score(spec, lat, l, x, labels) for lat, l in zip(arr["latent"],
                                                                  spec.latent_layers)]
  cols += [input_score(spec, arr["victim"], d, x, labels, bpda) for d in arr["dicts"]]
  for r in arr["residual"]:
    cols += list(residual_scores(spec, r, x, bpda).T)
  return cols


def scores_traced(spec: Spec, arr: dict, x, bpda: bool = False) -> jax.Array:
  """(N, modules) scores in ``spec.names`` order; labels are the victim's."""
  labels = jax.lax.stop_gradient(spec.classifier.apply(arr["victim"], x).argmax(-1))
  return jnp.stack(_columns(spec, arr, x, labels, bpda), axis=1)


scores = jax.jit(scores_traced, static_argnums=(0, 3))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_module(spec: Spec, m: int, arr: dict, x) -> jax.Array:
  labels = spec.classifier.apply(arr["victim"], x).argmax(-1)
  n_lat, n_inp = len(spec.latent_layers), spec.n_input
  if m < n_lat:
    return latent_score(spec, arr["latent"][m], spec.latent_layers[m], x, labels)
  if m < n_lat + n_inp:
    return input_score(spec, arr["victim"], arr["dicts"][m - n_lat], x, labels)
  j, col = divmod(m - n_lat - n_inp, len(residual.NAMES))
  return residual_scores(spec, arr["residual"][j], x)[:, col]


def scores_in_turn(spec: Spec, arr: dict, x) -> jax.Array:
  """The same scores with each module its own call, one after another (the
  sequential baseline the sharded run is measured against)."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.stack([_one_module(spec, m, arr, x) for m in range(len(spec.names))], axis=1)


def batched(fn, x, batch: int = 500) -> np.ndarray:
  """``fn`` (row-wise: a row's output depends on that row alone) over ``x`` in
  pieces of ``batch`` (bounded memory), the last piece zero-padded to its
  ``core.buckets`` size (every distinct N compiled the fused defender again,
  and each compile costs about as much as scoring thousands of images); as NumPy."""
  x = np.asarray(x, np.float32)
  out = []
  for i in range(0, len(x), batch):
    piece = x[i:i + batch]
    padded = buckets.pad_rows(piece, buckets.bucket(len(piece), batch))
    out.append(np.asarray(fn(jnp.asarray(padded)))[:len(piece)])
  return np.concatenate(out)
