"""End-to-end training recipes callable from binaries and notebooks alike:
a classifier on an image dataset, and the byte LM on a text corpus."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax

from core import data, evaluation
from core.cache import params_fingerprint
from core.models import CLASSIFIERS, classifier_config, ladder, layers, lm, num_params
from core.train import TrainConfig, train

ARCHITECTURES = {"standard": lm.apply, "ladder": ladder.apply}  # train_lm's wirings


@dataclasses.dataclass
class RecipeResult:
  params: Any
  model_config: Any
  metrics: dict        # final test/validation metrics plus throughput
  history: list[dict]


def _carry_throughput(workdir: str | None, metrics: dict, key: str) -> None:
  """A run resumed after its last step trains nothing here; report the
  throughput its earlier process measured instead of NaN."""
  path = os.path.join(workdir, "summary.json") if workdir else None
  if math.isnan(metrics[key]) and path and os.path.exists(path):
    with open(path) as f:
      metrics[key] = json.load(f)["metrics"].get(key, metrics[key])


def _dump(workdir: str | None, metrics: dict, model_config: Any) -> None:
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump({"metrics": metrics, "model_config": dataclasses.asdict(model_config)}, f,
                indent=2, default=str)


def classifier_loss(apply_fn: Callable[[Any, jax.Array], jax.Array]) -> Callable:
  """``(params, batch) -> (cross-entropy, {'loss', 'accuracy'})`` for an image batch."""

  def loss_fn(params, batch):
    logits = apply_fn(params, batch["x"])
    ce = layers.cross_entropy(logits, batch["y"])
    return ce, {"loss": ce, "accuracy": (logits.argmax(-1) == batch["y"]).mean()}

  return loss_fn


def train_classifier(dataset: str | data.Dataset, model: str, train_cfg: TrainConfig, *,
                     workdir: str | None = None, progress: bool = True, restart: bool = False,
                     **model_overrides: Any) -> RecipeResult:
  """Trains classifier ``model`` ('mlp', 'cnn', 'vit') on an image dataset.
  A ``workdir`` made with another config or data is refused unless ``restart``."""
  ds = data.load(dataset) if isinstance(dataset, str) else dataset
  if ds.is_text:
    raise ValueError(f"{ds.name} is a text dataset; classifiers need images")
  mcfg = classifier_config(model, ds.input_shape, ds.num_classes, **model_overrides)
  module = CLASSIFIERS[model]
  apply_fn = functools.partial(module.apply, cfg=mcfg)

  loss_fn = classifier_loss(apply_fn)
  params = module.init(jax.random.key(train_cfg.seed), mcfg)
  res = train(loss_fn, params,
              lambda step: data.image_batch(ds, train_cfg.batch_size, train_cfg.seed, step),
              train_cfg, workdir=workdir, progress=progress, desc=f"{model}/{ds.name}",
              eval_fn=lambda p: evaluation.classifier_metrics(apply_fn, p, ds.x_test, ds.y_test),
              run_meta={"model": model, "model_config": dataclasses.asdict(mcfg),
                        "dataset": ds.name,
                        # so a workdir is not resumed on other data (e.g. a split with
                        # validation images carved out of it)
                        "train_data": params_fingerprint((ds.x_train, ds.y_train))[:16]},
              restart=restart)
  metrics = dict(res.final_eval, params=num_params(res.params),
                 examples_per_sec=res.steps_per_sec * train_cfg.batch_size)
  _carry_throughput(workdir, metrics, "examples_per_sec")
  _dump(workdir, metrics, mcfg)
  return RecipeResult(res.params, mcfg, metrics, res.history)


def train_lm(lm_cfg: lm.LMConfig, train_cfg: TrainConfig, *, seq_len: int | None = None,
             corpus: str = "kjv", eval_windows: int | None = 64,
             workdir: str | None = None, progress: bool = True,
             restart: bool = False, architecture: str = "standard") -> RecipeResult:
  """Trains the byte LM on ``corpus``; evaluates on its held-out books.
  A ``workdir`` made with another config is refused unless ``restart``.
  ``architecture``: ``standard`` (``lm.apply``) or ``ladder`` (``core.models.ladder``,
  the same params wired as Ladder Residual)."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {architecture!r}")
  seq_len = seq_len or lm_cfg.max_seq_len
  if seq_len > lm_cfg.max_seq_len:
    raise ValueError(f"seq_len={seq_len} exceeds max_seq_len={lm_cfg.max_seq_len}")
  ds = data.load(corpus)
  if not ds.is_text:
    raise ValueError(f"{corpus} is not a text dataset")
  windows = data.text_eval_windows(ds.x_test, seq_len, eval_windows)
  model_apply = ARCHITECTURES[architecture]
  apply_fn = functools.partial(model_apply, cfg=lm_cfg)
  # A ladder run's meta names its architecture (a standard run's stays as before, so
  # existing checkpoints still resume); either refuses the other's workdir.
  arch_meta = {} if architecture == "standard" else {"architecture": architecture}
  res = train(functools.partial(lm.loss, cfg=lm_cfg, apply_fn=model_apply),
              lm.init(jax.random.key(train_cfg.seed), lm_cfg),
              lambda step: data.text_batch(ds.x_train, train_cfg.batch_size, seq_len,
                                           train_cfg.seed, step),
              train_cfg, workdir=workdir, progress=progress, desc=f"lm/{corpus}",
              eval_fn=lambda p: evaluation.lm_metrics(apply_fn, p, windows),
              run_meta={"model_config": dataclasses.asdict(lm_cfg), "corpus": corpus,
                        "seq_len": seq_len, **arch_meta}, restart=restart)
  metrics = dict(res.final_eval, params=num_params(res.params),
                 unigram_loss=evaluation.unigram_loss(ds.x_train, ds.x_test),
                 tokens_per_sec=res.steps_per_sec * train_cfg.batch_size * seq_len)
  _carry_throughput(workdir, metrics, "tokens_per_sec")
  _dump(workdir, metrics, lm_cfg)
  return RecipeResult(res.params, lm_cfg, metrics, res.history)
