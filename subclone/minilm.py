"""Subcloning a real pretrained checkpoint: all-MiniLM-L6-v2 (BERT, 6 layers,
d=384, 12 heads) -> a child of half width and two-thirds depth (d=192, 6 heads,
F=768, 4 layers), trained from the subcloned and from a random init to
reproduce the parent's sentence embeddings on KJV verses.

* Distillation: the child's mean-pooled embedding goes through a linear map
  to the parent's 384 dimensions, so its embeddings live in the parent's space
  (a parent-built index stays usable); loss = 1 - cos(child, parent) on
  training-book verses, validated on held-out-book verses. The subcloned
  child's map starts as the selection of its kept neurons (each child
  dimension is a parent dimension); the random child's is random.
* Protocol: the sweep seed picks each init's learning rate (lowest validation
  loss at ``plan.budgets[1]``); the report seeds train each init to every
  budget with its own schedule (iso-loss curve, ``subclone.isoloss``) and score
  nearest-neighbour retrieval among other held-out verses against the parent's.
Teacher embeddings are computed once and cached; every finished run is cached.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core import data, pretrained
from core.cache import params_fingerprint
from core.models import bert
from subclone import study
from subclone.importance import bert_importance, ranking
from subclone.speedup import Budget, Recipe
from subclone.surgery import ChildSpec, subclone_bert

CODE_VERSION = "minilm-1"


@dataclasses.dataclass(frozen=True)
class MiniLMPlan:
  budgets: tuple[int, ...] = (50, 100, 200, 400)
  seeds: tuple[int, ...] = (1, 2)
  sweep_seed: int = 0
  random_lrs: tuple[float, ...] = (1e-3, 3e-3)
  sub_lrs: tuple[float, ...] = (3e-4, 1e-3)
  wd: float = 0.01
  batch: int = 32
  max_len: int = 64          # word pieces per verse (95% of verses fit)
  n_train: int = 6144        # training-book verses, teacher embeddings computed once
  n_val: int = 400           # held-out-book verses: validation (distillation) loss
  n_retrieval: int = 800     # other held-out-book verses: the retrieval check
  calib: int = 64            # verses for the importance scores
  spec: ChildSpec = ChildSpec(d_model=192, n_heads=6, d_ff=768, n_layers=4)

  def __post_init__(self):
    if len(self.budgets) < 2 or list(self.budgets) != sorted(set(self.budgets)):
      raise ValueError(f"budgets must be >= 2 increasing step counts, got {self.budgets}")


@dataclasses.dataclass(frozen=True)
class Verses:
  ids: np.ndarray        # (N, max_len) int32
  mask: np.ndarray       # (N, max_len) int32
  target: np.ndarray     # (N, 384) the parent's normalised embeddings


def embed_fn(cfg: bert.BertConfig):
  return jax.jit(lambda p, ids, mask: bert.sentence_embedding(p, ids, mask, cfg))


def embed_all(fn, params, ids: np.ndarray, mask: np.ndarray, chunk: int = 256) -> np.ndarray:
  """Embeddings in fixed-size chunks (the last one padded), so one compile serves all."""
  out = []
  for i in range(0, len(ids), chunk):
    a, m = ids[i:i + chunk], mask[i:i + chunk]
    pad = chunk - len(a)
    e = fn(params, np.pad(a, ((0, pad), (0, 0))), np.pad(m, ((0, pad), (0, 0)), constant_values=1))
    out.append(np.asarray(e)[:len(a)])
  return np.concatenate(out)


def _verses(texts: list[str], tok, teacher, params, cache_dir: str | None, tag: str) -> Verses:
  ids, mask = tok(texts)
  key = hashlib.sha256(ids.tobytes() + params_fingerprint(params).encode()).hexdigest()[:16]
  path = cache_dir and os.path.join(cache_dir, f"minilm_teacher_{tag}_{key}.npy")
  if path and os.path.exists(path):
    target = np.load(path)
  else:
    target = embed_all(teacher, params, ids, mask)
    if path:
      os.makedirs(cache_dir, exist_ok=True)
      np.save(path + ".tmp.npy", target)
      os.replace(path + ".tmp.npy", path)   # atomic: never a half-written cache
  return Verses(ids, mask, target)


def retrieval(child_emb: np.ndarray, parent_emb: np.ndarray, k: int = 10) -> dict:
  """Each verse queries the others: the fraction whose nearest neighbour (cosine)
  under the child is the parent's, and the mean overlap of the top-k lists."""
  def top(e):
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]
  c, p = top(child_emb), top(parent_emb)
  top1 = float(np.mean(c[:, 0] == p[:, 0]))
  overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(c, p)]))
  n = len(child_emb)
  return {"top1": top1, "top1_se": float(np.sqrt(top1 * (1 - top1) / n)),
          f"top{k}_overlap": overlap, "n": n}


def _selection(kept: np.ndarray, d_parent: int) -> np.ndarray:
  """The (d', D) map sending child dimension i to parent dimension kept[i]."""
  sel = np.zeros((len(kept), d_parent), np.float32)
  sel[np.arange(len(kept)), kept] = 1.0
  return sel


def child_forward(ccfg: bert.BertConfig):
  """The child's embedding in the parent's space: normalise(pool(child) @ proj)."""
  def fwd(p, ids, mask):
    e = bert.sentence_embedding(p["encoder"], ids, mask, ccfg, normalize=False) @ p["proj"]
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return fwd


def run(plan: MiniLMPlan, cache_dir: str | None, progress: bool = True) -> dict:
  """The study; returns JSON-ready records."""
  parent, cfg = pretrained.load_minilm()
  tok = pretrained.WordPiece(pretrained.minilm_dir(), plan.max_len, fixed=True)
  train_v, held = data.kjv_verses(False), data.kjv_verses(True)
  rng = np.random.default_rng(0)
  train_v = [train_v[i] for i in np.sort(rng.permutation(len(train_v))[:plan.n_train])]
  held = [held[i] for i in rng.permutation(len(held))]
  if len(held) < plan.n_val + plan.n_retrieval:
    raise ValueError(f"{len(held)} held-out verses < n_val + n_retrieval")
  teacher = embed_fn(cfg)
  tr = _verses(train_v, tok, teacher, parent, cache_dir, "train")
  va = _verses(held[:plan.n_val], tok, teacher, parent, cache_dir, "val")
  te = _verses(held[plan.n_val:plan.n_val + plan.n_retrieval], tok, teacher, parent, cache_dir,
               "retrieval")

  imp = bert_importance(parent, tr.ids[:plan.calib], tr.mask[:plan.calib], cfg)
  enc, ccfg = subclone_bert(parent, cfg, imp, plan.spec)
  d_idx = ranking(imp.residual)[:plan.spec.d_model]
  select = _selection(d_idx, cfg.d_model)
  fwd = child_forward(ccfg)

  def loss_fn(p, batch):
    cos = jnp.sum(fwd(p, batch["ids"], batch["mask"]) * batch["target"], -1)
    return jnp.mean(1 - cos), {"loss": jnp.mean(1 - cos)}

  def batch_fn(seed: int, step: int) -> dict:
    idx = np.random.default_rng([seed, step]).choice(len(tr.ids), plan.batch, replace=False)
    return {"ids": tr.ids[idx], "mask": tr.mask[idx], "target": tr.target[idx]}

  val_loss = jax.jit(lambda p: jnp.mean(1 - jnp.sum(fwd(p, va.ids, va.mask) * va.target, -1)))
  child_emb = jax.jit(fwd)
  final_fn = lambda p: retrieval(embed_all(child_emb, p, te.ids, te.mask), te.target)

  def random_init(seed: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"encoder": bert.init(k1, ccfg),
            "proj": jax.random.normal(k2, (plan.spec.d_model, cfg.d_model)) / np.sqrt(
                plan.spec.d_model)}

  inits = {"random init": random_init, "subcloned": lambda s: {"encoder": enc, "proj": select}}
  # Step-0 ablations of the surgery (no training): validation loss of the child
  # without the sqrt(d/d') scaling, and with the first d' neurons/heads/units.
  at_init = {}
  for name, kw in (("subcloned", {}), ("no scaling", {"scale": False}),
                   ("first d' (no reordering)", {"order": "first"})):
    e, _ = subclone_bert(parent, cfg, imp, plan.spec, **kw)
    kept = np.arange(plan.spec.d_model) if kw.get("order") == "first" else d_idx
    at_init[name] = float(val_loss({"encoder": e, "proj": _selection(kept, cfg.d_model)}))
  meta = {"study": {"plan": dataclasses.asdict(plan)}, "parent_weights": params_fingerprint(parent),
          "code": CODE_VERSION}
  budget = Budget(steps=plan.budgets[-1], batch=plan.batch, eval_every=10)
  runner = study.iso_runner(cache_dir and os.path.join(cache_dir, "minilm_runs.json"), meta,
                            loss_fn, batch_fn, lambda p: float(val_loss(p)), budget, progress,
                            final_fn=final_fn)
  b_sel = plan.budgets[1]
  sweep = {name: {lr: runner(name, functools.partial(init, plan.sweep_seed), Recipe(lr, plan.wd),
                             plan.sweep_seed, b_sel)["final_loss"] for lr in lrs}
           for name, init, lrs in (("random init", random_init, plan.random_lrs),
                                   ("subcloned", inits["subcloned"], plan.sub_lrs))}
  chosen = {n: min(s, key=s.get) for n, s in sweep.items()}
  iso = study.iso_curves({n: (inits[n], Recipe(chosen[n], plan.wd)) for n in inits}, runner,
                         plan.budgets, plan.seeds)
  runs = {n: {s: [runner(n, functools.partial(inits[n], s), Recipe(chosen[n], plan.wd), s, b)
                  for b in plan.budgets] for s in plan.seeds} for n in inits}
  return {"parent_config": dataclasses.asdict(cfg), "child_config": dataclasses.asdict(ccfg),
          "plan": dataclasses.asdict(plan), "n_train": len(tr.ids), "n_val": len(va.ids),
          "n_retrieval": len(te.ids), "sweep": {n: {str(k): v for k, v in s.items()}
                                               for n, s in sweep.items()},
          "chosen_lr": chosen, "iso": iso,
          "retrieval": {n: {str(s): [{"budget": b, **r["final_metrics"]}
                                     for b, r in zip(plan.budgets, per[s])] for s in plan.seeds}
                        for n, per in runs.items()},
          "initial_retrieval": {n: per[plan.seeds[0]][0]["initial_metrics"]
                                for n, per in runs.items()},
          "initial_loss": {n: per[plan.seeds[0]][0]["initial_loss"] for n, per in runs.items()},
          "surgery_at_init": at_init}
