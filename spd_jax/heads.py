"""Head-to-device assignment for the tensor-parallel LM.

A ``HeadPerm`` gives, per block, an order of the KV-head groups (for plain
multi-head attention a group is one head; with grouped KV heads it is one KV
head plus its H/K query heads, which must stay together). After permuting,
device d of N holds the groups at positions [d*K/N, (d+1)*K/N) of that order.
The dense model is invariant to the permutation; an SPD block is not, since
each device's MLP only sees its own heads' outputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from core.models import lm

HeadPerm = Sequence[Sequence[int]]  # one order of the KV groups per block


def check(head_perm: HeadPerm, cfg: lm.LMConfig) -> None:
  """A clear error unless ``head_perm`` holds one permutation of the KV groups per block."""
  if len(head_perm) and np.ndim(head_perm[0]) == 0:
    raise ValueError(f"head_perm must hold one order of the {cfg.kv_heads} KV groups per "
                     f"block ({cfg.n_layers} sequences), got a flat list {list(head_perm)}; "
                     f"for the same order in every block use [perm] * {cfg.n_layers}")
  if len(head_perm) != cfg.n_layers:
    raise ValueError(f"head permutation covers {len(head_perm)} blocks, model has "
                     f"{cfg.n_layers}")
  for i, perm in enumerate(head_perm):
    if sorted(np.asarray(perm).tolist()) != list(range(cfg.kv_heads)):
      raise ValueError(f"block {i}: {list(perm)} is not a permutation of the "
                       f"{cfg.kv_heads} KV-head groups")


def permute_block(p: dict, cfg: lm.LMConfig, group_perm) -> dict:
  """One block's params with its KV groups reordered (works inside jit too)."""
  g = cfg.n_heads // cfg.kv_heads
  kv_idx = jnp.asarray(group_perm)
  q_idx = (kv_idx[:, None] * g + jnp.arange(g)[None]).reshape(-1)
  a = dict(p["attn"])
  a["wq"], a["wk"], a["wv"] = a["wq"][:, q_idx], a["wk"][:, kv_idx], a["wv"][:, kv_idx]
  a["wo"] = a["wo"][q_idx]
  if "bq" in a:
    a["bq"], a["bk"], a["bv"] = a["bq"][q_idx], a["bk"][kv_idx], a["bv"][kv_idx]
  return dict(p, attn=a)


def permute_heads(params: Any, cfg: lm.LMConfig, head_perm: HeadPerm) -> Any:
  """Returns params with each block's heads reordered (a new pytree)."""
  check(head_perm, cfg)
  out = dict(params)
  for i, perm in enumerate(head_perm):
    out[lm.block_key(i)] = permute_block(params[lm.block_key(i)], cfg, np.asarray(perm))
  return out
