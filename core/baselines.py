"""The foundation's report section: shared classifiers and the byte LM trained
briefly on the offline datasets, with accuracy/perplexity and loss curves."""

from __future__ import annotations

import dataclasses
import os

from core import data, report
from core.models import lm
from core.recipes import train_classifier, train_lm
from core.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class BaselinePlan:
  classifier_runs: tuple[tuple[str, str, int], ...]  # (dataset, model, steps)
  lm_config: lm.LMConfig
  lm_steps: int
  lm_batch: int = 16
  batch_size: int = 64


QUICK = BaselinePlan(
    # No ViT here in quick mode: the subclone section trains and reports one (its
    # short mnist5k parent), and a second copy cost ~50 s of the 20-minute job.
    classifier_runs=(("digits", "mlp", 400), ("digits", "cnn", 400),
                     ("mnist5k", "mlp", 600), ("mnist5k", "cnn", 600),
                     ("fashion_mnist", "cnn", 600)),
    lm_config=lm.LMConfig(d_model=128, n_layers=2, n_heads=4, d_ff=384, max_seq_len=128),
    lm_steps=400)

FULL = BaselinePlan(
    classifier_runs=tuple((ds, m, 3000) for ds in ("digits", "mnist5k", "fashion_mnist")
                          for m in ("mlp", "cnn", "vit")),
    lm_config=lm.LMConfig(d_model=256, n_layers=4, n_heads=8, d_ff=768, max_seq_len=256),
    lm_steps=3000, lm_batch=32)

_LR = {"mlp": 1e-3, "cnn": 2e-3, "vit": 1e-3}


def _curve(history: list[dict], key: str = "loss"):
  rows = [r for r in history if r["split"] == "train"]
  return [r["step"] for r in rows], [r[key] for r in rows]


def run_baselines(plan: BaselinePlan, outdir: str, progress: bool = True) -> report.Section:
  """Trains every run of ``plan``; returns the report section (tables + plots)."""
  fig_dir = os.path.join(outdir, "figures")
  rows, curves, skipped = [], {}, []
  for ds_name, model, steps in plan.classifier_runs:
    try:
      ds = data.load(ds_name)
    except data.DatasetNotFoundError as e:
      skipped.append(f"- {ds_name}/{model}: skipped, {e}")
      continue
    cfg = TrainConfig(steps=steps, batch_size=plan.batch_size, lr=_LR[model],
                      warmup_steps=max(1, steps // 10), log_every=max(1, steps // 40))
    res = train_classifier(ds, model, cfg, progress=progress)
    rows.append((ds_name, model, res.metrics["params"], steps,
                 res.metrics["accuracy"] * 100, res.metrics["loss"],
                 res.metrics["examples_per_sec"]))
    curves[f"{model}/{ds_name}"] = _curve(res.history)
  cls_fig = report.line_plot(os.path.join(fig_dir, "baselines_classifier_loss.png"), curves,
                             xlabel="step", ylabel="train loss", title="Classifiers", logy=True)

  lm_cfg = TrainConfig(steps=plan.lm_steps, batch_size=plan.lm_batch, lr=3e-3,
                       warmup_steps=max(1, plan.lm_steps // 10),
                       log_every=max(1, plan.lm_steps // 40))
  lm_res = train_lm(plan.lm_config, lm_cfg, progress=progress)
  m = lm_res.metrics
  lm_fig = report.line_plot(os.path.join(fig_dir, "baselines_lm_loss.png"),
                            {"train": _curve(lm_res.history)}, xlabel="step",
                            ylabel="train loss (nats/byte)", title="Byte LM on KJV")
  c = plan.lm_config
  body = "\n\n".join([
      "Classifiers (test split; AdamW, warmup+cosine, batch "
      f"{plan.batch_size}):",
      report.markdown_table(["dataset", "model", "params", "steps", "test acc %",
                             "test loss", "train ex/s"], rows),
      *(["\n".join(skipped)] if skipped else []),
      f"![classifier loss]({os.path.relpath(cls_fig, outdir)})",
      f"Byte LM (LLaMA-style, d={c.d_model}, L={c.n_layers}, H={c.n_heads}, "
      f"F={c.d_ff}, context {c.max_seq_len}) on KJV, validation = held-out books:",
      report.markdown_table(
          ["params", "steps", "val loss (nats)", "val ppl", "bits/byte", "unigram loss",
           "train tokens/s"],
          [(m["params"], plan.lm_steps, m["loss"], m["perplexity"], m["bits_per_byte"],
            m["unigram_loss"], m["tokens_per_sec"])]),
      f"![LM loss]({os.path.relpath(lm_fig, outdir)})"])
  return report.Section("Baselines: shared models on offline data", body)


def section(quick: bool, outdir: str) -> report.Section:
  return run_baselines(QUICK if quick else FULL, outdir)
