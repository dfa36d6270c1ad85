"""Centroid-preserving fine-tuning after clustering (RAPIDNN's retraining).

Trainable: each layer's weight centroids ``w_c`` and bias. Every kernel entry
stays tied to its cluster (kernel = w_c[w_idx]), so the gradient a centroid
receives is the sum over the weights that share it (the transpose of the
gather). Inputs and activation levels are rounded straight-through; their
centroids and the cluster assignment stay fixed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from accel.program import Op
from accel.rapidnn import Codebook, float_forward
from core import data
from core.recipes import classifier_loss
from core.train import TrainConfig, train

TRAINABLE = ("w_c", "bias")


def split(cb: Codebook) -> tuple[dict, dict]:
  """(trainable, fixed) halves of a codebook."""
  train_part = {n: {k: v for k, v in p.items() if k in TRAINABLE} for n, p in cb.items()}
  fixed = {n: {k: v for k, v in p.items() if k not in TRAINABLE} for n, p in cb.items()}
  return train_part, fixed


def merge(trainable: dict, fixed: dict) -> Codebook:
  return {n: {**fixed[n], **trainable[n]} for n in fixed}


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
  steps: int = 300
  batch: int = 64
  lr: float = 1e-3
  seed: int = 0


def retrain(cb: Codebook, ops: tuple[Op, ...], ds: data.Dataset, cfg: RetrainConfig,
            progress: bool = False) -> Codebook:
  """Fine-tunes the centroids and biases on ``ds``'s training split."""
  trainable, fixed = split(cb)

  loss_fn = classifier_loss(lambda params, x: float_forward(merge(params, fixed), ops, x,
                                                            ste=True))
  return merge(fine_tune(loss_fn, trainable, ds, cfg, salt=7, desc="retrain",
                         progress=progress), fixed)


def fine_tune(loss_fn, params, ds: data.Dataset, cfg: RetrainConfig, *, salt: int, desc: str,
              progress: bool = False):
  """``cfg.steps`` of AdamW (warmup+cosine, no weight decay) on ``ds``'s training
  images, batches drawn from seed ``cfg.seed + salt``; the shared recipe of
  RAPIDNN's retraining and CodeX's quantization-aware baseline."""
  tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch, lr=cfg.lr,
                     warmup_steps=max(1, cfg.steps // 10), weight_decay=0.0, seed=cfg.seed,
                     log_every=max(1, cfg.steps // 5))
  res = train(loss_fn, params,
              functools.partial(lambda s, step: data.image_batch(ds, cfg.batch, s, step),
                                cfg.seed + salt),
              tcfg, progress=progress, desc=desc)
  return jax.device_get(res.params)
