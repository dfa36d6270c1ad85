"""The published peers subcloning is compared with, on the same surgery code.

* Weight selection (Xu et al., ICLR'24): no data; evenly spaced neurons, heads
  and units, the first N' layers, no rescaling.
* Block Influence (ShortGPT): BI_i = 1 - mean cos(x_i, x_{i+1}) between a
  block's input and output on calibration data; keep the N' most influential
  blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from core.models import lm
from subclone.importance import Importance
from subclone.surgery import ChildSpec, subclone_lm


def uniform_importance(cfg: lm.LMConfig) -> Importance:
  """Data-free placeholder: only the shapes matter for 'uniform'/'first' orders."""
  return Importance(np.zeros(cfg.d_model), tuple(np.zeros(cfg.kv_heads) for _ in range(cfg.n_layers)),
                    tuple(np.zeros(cfg.d_ff) for _ in range(cfg.n_layers)))


def weight_selection(params: dict, cfg: lm.LMConfig, spec: ChildSpec) -> tuple[dict, lm.LMConfig]:
  return subclone_lm(params, cfg, uniform_importance(cfg), spec, blocks="last",
                     order="uniform", scale=False)


def block_influence(params: dict, tokens_BxL, cfg: lm.LMConfig) -> np.ndarray:
  """(L,) Block Influence: 1 - mean cosine similarity of each block's input and output."""

  @jax.jit
  def collect(params, tokens):
    x = lm.embed(params, tokens)
    bi = []
    for i in range(cfg.n_layers):
      y = lm.block(params[lm.block_key(i)], x, jnp.asarray(0, jnp.int32), cfg)[0]
      cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1) + 1e-12)
      bi.append(1.0 - jnp.mean(cos))
      x = y
    return jnp.stack(bi)

  return np.asarray(collect(params, jnp.asarray(tokens_BxL)))


def blocks_by_influence(bi: np.ndarray, n_keep: int) -> list[int]:
  """The ``n_keep`` most influential blocks, in model order."""
  return sorted(np.argsort(-np.asarray(bi), kind="stable")[:n_keep].tolist())
