"""Weight-subcloning surgery on LM, ViT and BERT param pytrees.

Every parameter is indexed with the same index sets: residual-stream neurons
(global), KV-head groups and MLP units (per kept block), blocks (middle ones
removed by default). Weights that read the residual stream (Q/K/V, gate/up,
the unembedding) are multiplied by sqrt(d / d'), so their outputs keep the
parent's scale although they sum over fewer inputs; norm parameters and
biases are only subsampled, never scaled. The child is a valid model of its
own ``LMConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from core.models import bert, lm, vit
from subclone.importance import Importance, ranking

ORDERS = ("importance", "first", "random", "uniform")


@dataclasses.dataclass(frozen=True)
class ChildSpec:
  d_model: int
  n_heads: int
  d_ff: int
  n_layers: int


def _check_spec(cfg, spec: ChildSpec) -> None:
  """Shared by LM and ViT configs (both have these four fields and head_dim)."""
  for name in ("d_model", "n_heads", "d_ff", "n_layers"):
    child, parent = getattr(spec, name), getattr(cfg, name)
    if not 1 <= child <= parent:
      raise ValueError(f"child {name}={child} must lie in [1, parent's {parent}]")
  if spec.d_model % spec.n_heads or spec.d_model // spec.n_heads != cfg.head_dim:
    raise ValueError(f"whole heads keep their width: d_model/n_heads must equal the parent's "
                     f"head_dim {cfg.head_dim}, got {spec.d_model}/{spec.n_heads}")


def child_config(cfg: lm.LMConfig, spec: ChildSpec) -> lm.LMConfig:
  """The child's config; raises a clear error for an invalid target."""
  _check_spec(cfg, spec)
  group = cfg.n_heads // cfg.kv_heads
  if spec.n_heads % group:
    raise ValueError(f"n_heads={spec.n_heads} must be a multiple of the parent's KV group "
                     f"size {group}, since KV groups are kept whole")
  kv = spec.n_heads // group if cfg.n_kv_heads else None
  return dataclasses.replace(cfg, d_model=spec.d_model, n_heads=spec.n_heads, n_kv_heads=kv,
                             d_ff=spec.d_ff, n_layers=spec.n_layers)


def kept_blocks(n_layers: int, n_keep: int, remove: str = "middle",
                keep: Sequence[int] | None = None) -> list[int]:
  """The parent blocks that survive, ascending. ``remove`` names the blocks
  taken out: 'middle', 'last' (the child keeps the first ``n_keep``) or
  'first' (it keeps the last ``n_keep``); ``keep`` lists the survivors instead."""
  if keep is not None:
    kept = sorted(int(i) for i in keep)
    if len(kept) != n_keep or len(set(kept)) != n_keep or not all(0 <= i < n_layers for i in kept):
      raise ValueError(f"kept blocks {list(keep)} must be {n_keep} distinct indices < {n_layers}")
    return kept
  if remove == "middle":
    head = (n_keep + 1) // 2
    return list(range(head)) + list(range(n_layers - (n_keep - head), n_layers))
  if remove == "last":
    return list(range(n_keep))
  if remove == "first":
    return list(range(n_layers - n_keep, n_layers))
  raise ValueError(f"unknown remove={remove!r}; use 'middle', 'last', 'first', or keep=indices")


def _kept(n_layers: int, n_keep: int, blocks: str | Sequence[int]) -> list[int]:
  """``blocks`` as the surgery functions take it: which blocks to remove by name,
  or the indices to keep."""
  if isinstance(blocks, str):
    return kept_blocks(n_layers, n_keep, remove=blocks)
  return kept_blocks(n_layers, n_keep, keep=blocks)


def _select(scores: np.ndarray, k: int, order: str, rng: np.random.Generator) -> np.ndarray:
  if order == "importance":
    return ranking(scores)[:k]
  if order == "first":
    return np.arange(k)
  if order == "random":
    return rng.permutation(len(scores))[:k]
  if order == "uniform":  # evenly spaced, as weight selection does
    return (np.arange(k) * len(scores)) // k
  raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")


def subclone_lm(params: dict, cfg: lm.LMConfig, importance: Importance, spec: ChildSpec, *,
                blocks: str | Sequence[int] = "middle", scale: bool = True,
                order: str = "importance", seed: int = 0) -> tuple[dict, lm.LMConfig]:
  """Returns (child params, child config)."""
  ccfg = child_config(cfg, spec)
  rng = np.random.default_rng(seed)
  d_idx = _select(importance.residual, spec.d_model, order, rng)
  s = math.sqrt(cfg.d_model / spec.d_model) if scale else 1.0
  group = cfg.n_heads // cfg.kv_heads
  child = {"embed": {"embedding": params["embed"]["embedding"][:, d_idx]},
           "final_norm": {"scale": params["final_norm"]["scale"][d_idx]}}
  if not cfg.tie_embeddings:
    child["unembed"] = {"kernel": params["unembed"]["kernel"][d_idx] * s}
  for new_i, old_i in enumerate(_kept(cfg.n_layers, spec.n_layers, blocks)):
    p = params[lm.block_key(old_i)]
    kv_idx = _select(importance.heads[old_i], ccfg.kv_heads, order, rng)
    q_idx = (kv_idx[:, None] * group + np.arange(group)[None]).reshape(-1)
    f_idx = _select(importance.mlp[old_i], spec.d_ff, order, rng)
    a, m = p["attn"], p["mlp"]
    attn = {"wq": a["wq"][d_idx][:, q_idx] * s, "wk": a["wk"][d_idx][:, kv_idx] * s,
            "wv": a["wv"][d_idx][:, kv_idx] * s, "wo": a["wo"][q_idx][:, :, d_idx]}
    mlp = {"w_gate": m["w_gate"][d_idx][:, f_idx] * s, "w_up": m["w_up"][d_idx][:, f_idx] * s,
           "w_down": m["w_down"][f_idx][:, d_idx]}
    if "bq" in a:
      attn |= {"bq": a["bq"][q_idx], "bk": a["bk"][kv_idx], "bv": a["bv"][kv_idx],
               "bo": a["bo"][d_idx]}
      mlp |= {"b_gate": m["b_gate"][f_idx], "b_up": m["b_up"][f_idx], "b_down": m["b_down"][d_idx]}
    child[lm.block_key(new_i)] = {
        "attn_norm": {"scale": p["attn_norm"]["scale"][d_idx]}, "attn": attn,
        "mlp_norm": {"scale": p["mlp_norm"]["scale"][d_idx]}, "mlp": mlp}
  return child, ccfg


def vit_child_config(cfg: vit.ViTConfig, spec: ChildSpec) -> vit.ViTConfig:
  _check_spec(cfg, spec)
  return dataclasses.replace(cfg, d_model=spec.d_model, n_heads=spec.n_heads, d_ff=spec.d_ff,
                             n_layers=spec.n_layers)


def subclone_vit(params: dict, cfg: vit.ViTConfig, importance: Importance, spec: ChildSpec, *,
                 blocks: str | Sequence[int] = "middle", scale: bool = True,
                 order: str = "importance", seed: int = 0) -> tuple[dict, vit.ViTConfig]:
  """ViT surgery: patch embedding, class token and positions are subsampled on
  the residual axis; Q/K/V, the MLP's first layer and the head are scaled."""
  ccfg = vit_child_config(cfg, spec)
  rng = np.random.default_rng(seed)
  d_idx = _select(importance.residual, spec.d_model, order, rng)
  s = math.sqrt(cfg.d_model / spec.d_model) if scale else 1.0
  ln = lambda p: {"scale": p["scale"][d_idx], "bias": p["bias"][d_idx]}
  child = {"patch_embed": {"kernel": params["patch_embed"]["kernel"][:, d_idx],
                           "bias": params["patch_embed"]["bias"][d_idx]},
           "cls": params["cls"][d_idx], "pos_embed": params["pos_embed"][:, d_idx],
           "final_norm": ln(params["final_norm"]),
           "head": {"kernel": params["head"]["kernel"][d_idx] * s, "bias": params["head"]["bias"]}}
  for new_i, old_i in enumerate(_kept(cfg.n_layers, spec.n_layers, blocks)):
    p = params[f"block_{old_i}"]
    h_idx = _select(importance.heads[old_i], spec.n_heads, order, rng)
    f_idx = _select(importance.mlp[old_i], spec.d_ff, order, rng)
    a, m = p["attn"], p["mlp"]
    child[f"block_{new_i}"] = {
        "ln1": ln(p["ln1"]), "ln2": ln(p["ln2"]),
        "attn": {"wq": a["wq"][d_idx][:, h_idx] * s, "bq": a["bq"][h_idx],
                 "wk": a["wk"][d_idx][:, h_idx] * s, "bk": a["bk"][h_idx],
                 "wv": a["wv"][d_idx][:, h_idx] * s, "bv": a["bv"][h_idx],
                 "wo": a["wo"][h_idx][:, :, d_idx], "bo": a["bo"][d_idx]},
        "mlp": {"w1": m["w1"][d_idx][:, f_idx] * s, "b1": m["b1"][f_idx],
                "w2": m["w2"][f_idx][:, d_idx], "b2": m["b2"][d_idx]}}
  return child, ccfg


def bert_child_config(cfg: bert.BertConfig, spec: ChildSpec) -> bert.BertConfig:
  _check_spec(cfg, spec)
  return dataclasses.replace(cfg, d_model=spec.d_model, n_heads=spec.n_heads, d_ff=spec.d_ff,
                             n_layers=spec.n_layers)


def subclone_bert(params: dict, cfg: bert.BertConfig, importance: Importance, spec: ChildSpec,
                  *, blocks: str | Sequence[int] = "middle", scale: bool = True,
                  order: str = "importance", seed: int = 0) -> tuple[dict, bert.BertConfig]:
  """Post-LN BERT surgery. Every LayerNorm renormalises over the kept neurons,
  so the residual stream needs no rescaling: LN scales and biases are only
  subsampled, as are the writers into the stream (out projection, MLP output,
  embeddings). The readers of the stream (Q/K/V, the MLP's first layer, the
  pooler) sum over d' instead of d inputs and are multiplied by sqrt(d/d'),
  as in the pre-LN models."""
  ccfg = bert_child_config(cfg, spec)
  rng = np.random.default_rng(seed)
  d_idx = _select(importance.residual, spec.d_model, order, rng)
  s = math.sqrt(cfg.d_model / spec.d_model) if scale else 1.0
  ln = lambda p: {"scale": p["scale"][d_idx], "bias": p["bias"][d_idx]}
  e = params["embed"]
  child = {"embed": {"word": e["word"][:, d_idx], "position": e["position"][:, d_idx],
                     "token_type": e["token_type"][:, d_idx], "norm": ln(e["norm"])}}
  if cfg.pooler:
    child["pooler"] = {"kernel": params["pooler"]["kernel"][d_idx][:, d_idx] * s,
                       "bias": params["pooler"]["bias"][d_idx]}
  for new_i, old_i in enumerate(_kept(cfg.n_layers, spec.n_layers, blocks)):
    p = params[bert.block_key(old_i)]
    h_idx = _select(importance.heads[old_i], spec.n_heads, order, rng)
    f_idx = _select(importance.mlp[old_i], spec.d_ff, order, rng)
    a, m = p["attn"], p["mlp"]
    child[bert.block_key(new_i)] = {
        "attn": {"wq": a["wq"][d_idx][:, h_idx] * s, "bq": a["bq"][h_idx],
                 "wk": a["wk"][d_idx][:, h_idx] * s, "bk": a["bk"][h_idx],
                 "wv": a["wv"][d_idx][:, h_idx] * s, "bv": a["bv"][h_idx],
                 "wo": a["wo"][h_idx][:, :, d_idx], "bo": a["bo"][d_idx]},
        "attn_norm": ln(p["attn_norm"]), "mlp_norm": ln(p["mlp_norm"]),
        "mlp": {"w_in": m["w_in"][d_idx][:, f_idx] * s, "b_in": m["b_in"][f_idx],
                "w_out": m["w_out"][f_idx][:, d_idx], "b_out": m["b_out"][d_idx]}}
  return child, ccfg
