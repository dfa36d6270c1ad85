"""Head-to-device assignment for the tensor-parallel LM.

A ``HeadPerm`` gives, per block, an order of the KV-head groups (for plain
multi-head attention a group is one head; with grouped KV heads it is one KV
head plus its H/K query heads, which must stay together). After permuting,
device d of N holds the groups at positions [d*K/N, (d+1)*K/N) of that order.
The dense model is invariant to the permutation; an SPD block is not, since
each device's MLP only sees its own heads' outputs.

When TP exceeds the KV heads, each KV group is spread over N/K devices (its KV
head replicated), so which of its query heads share a device matters too. A
block's order may then be given over the H query heads instead: the query
heads in positions [j*G, (j+1)*G) must form one KV group (G = H/K), and device
d holds positions [d*H/N, (d+1)*H/N). A length-K order is the special case
that keeps each group's heads in their original order.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from core.models import lm

HeadPerm = Sequence[Sequence[int]]  # one order of the KV groups per block


def check(head_perm: HeadPerm, cfg: lm.LMConfig) -> None:
  """A clear error unless ``head_perm`` holds, per block, a permutation of the KV
  groups or a group-aligned permutation of the query heads (module docstring)."""
  if len(head_perm) and np.ndim(head_perm[0]) == 0:
    raise ValueError(f"head_perm must hold one order of the {cfg.kv_heads} KV groups per "
                     f"block ({cfg.n_layers} sequences), got a flat list {list(head_perm)}; "
                     f"for the same order in every block use [perm] * {cfg.n_layers}")
  if len(head_perm) != cfg.n_layers:
    raise ValueError(f"head permutation covers {len(head_perm)} blocks, model has "
                     f"{cfg.n_layers}")
  for i, perm in enumerate(head_perm):
    query_indices(perm, cfg, block=i)


def query_indices(perm, cfg: lm.LMConfig, block: int | None = None) -> np.ndarray:
  """The query-head order a KV-group order (length K) or a query-head order (length H)
  stands for; raises unless it is a valid, group-aligned permutation."""
  where = "" if block is None else f"block {block}: "
  perm = np.asarray(perm)
  k, h = cfg.kv_heads, cfg.n_heads
  g = h // k
  if len(perm) == k:  # (with K == H both readings agree)
    if sorted(perm.tolist()) != list(range(k)):
      raise ValueError(f"{where}{perm.tolist()} is not a permutation of the {k} KV-head groups")
    return (perm[:, None] * g + np.arange(g)[None]).reshape(-1)
  if len(perm) != h or sorted(perm.tolist()) != list(range(h)):
    raise ValueError(f"{where}{perm.tolist()} is neither a permutation of the {k} KV-head "
                     f"groups nor of the {h} query heads")
  groups = perm.reshape(k, g) // g
  if (groups != groups[:, :1]).any():
    raise ValueError(f"{where}query-head order {perm.tolist()} mixes KV groups within an "
                     f"aligned run of {g} positions")
  return perm


def permute_block(p: dict, cfg: lm.LMConfig, perm) -> dict:
  """One block's params with its heads reordered by a KV-group or query-head order
  (concrete; see ``query_indices``)."""
  return reorder_block(p, cfg, query_indices(perm, cfg))


def reorder_block(p: dict, cfg: lm.LMConfig, q_idx) -> dict:
  """``permute_block`` from a checked query-head order; ``q_idx`` may be traced."""
  g = cfg.n_heads // cfg.kv_heads
  q_idx = jnp.asarray(q_idx)
  kv_idx = q_idx[::g] // g
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
