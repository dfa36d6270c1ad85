"""The SPD accuracy study on a trained byte LM: sensitivity per TP size, the
three strategies, and perplexity / cloze accuracy against syncs dropped.

All SPD evaluations use the single-device emulation (``emulate``), which a
test pins to the shard_map model, with the plan as a traced input so one
compilation serves every plan and strategy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from core import cloze, data, evaluation, report
from core.models import lm
from core.recipes import train_lm
from core.train import TrainConfig
from spd_jax import emulate, sensitivity, strategies
from spd_jax.tp import SyncPlan

STRATEGIES = ("ZS", "ZS+B2B", "ZS+B2B+HG")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  model: lm.LMConfig
  train_steps: int
  tp_sizes: tuple[int, ...] = (2, 4, 8)
  seq_len: int = 128
  train_batch: int = 16
  eval_windows: int = 64
  cloze_items: int = 400
  cloze_context: int = 48
  calib_seqs: int = 64
  b2b: strategies.B2BConfig = strategies.B2BConfig(steps=200)
  hg_rounds: int = 2
  t_isb: float = sensitivity.T_ISB
  t_esb: float = sensitivity.T_ESB
  budget: float = 0.01  # relative cloze-accuracy regression allowed


QUICK = StudyConfig(lm.LMConfig(d_model=128, n_layers=4, n_heads=8, d_ff=256, max_seq_len=128),
                    train_steps=300, cloze_items=200, eval_windows=32, calib_seqs=48,
                    b2b=strategies.B2BConfig(steps=100), hg_rounds=1)
FULL = StudyConfig(lm.LMConfig(d_model=192, n_layers=8, n_heads=8, d_ff=512, max_seq_len=128),
                   train_steps=800)


class Evaluator:
  """Perplexity on held-out windows and cloze accuracy, for any (params, drop mask)."""

  def __init__(self, cfg: StudyConfig, n_devices: int, windows, cloze_set, residual="sum"):
    self.windows, self.cloze_set = windows, cloze_set
    apply = functools.partial(emulate.apply_masked, cfg=cfg.model, n_devices=n_devices,
                              residual=residual)
    self._apply = jax.jit(lambda pd, t: apply(pd[0], t, drop_L=pd[1]))

  def __call__(self, params, drop) -> dict:
    pd = (params, jnp.asarray(drop, bool))
    ppl = evaluation.lm_metrics(self._apply, pd, self.windows)["perplexity"]
    acc = cloze.accuracy(self._apply, pd, self.cloze_set)
    return {"ppl": ppl, "cloze": acc}


def _swap_blocks(base: dict, donor: dict, drop) -> dict:
  out = dict(base)
  for i, d in enumerate(drop):
    if d:
      out[lm.block_key(i)] = donor[lm.block_key(i)]
  return out


def study_tp(params, cfg: StudyConfig, n: int, windows, cloze_set, calib) -> dict:
  """Sensitivity, strategy params and the k-scan for TP size ``n``."""
  L = cfg.model.n_layers
  ev = Evaluator(cfg, n, windows, cloze_set)
  sens = sensitivity.analyse(lambda plan: ev(params, plan.drop_attn)["ppl"], L)
  classes = sensitivity.classify(sens.progressive, cfg.t_isb, cfg.t_esb)
  order = sensitivity.drop_order(sens.isolated)
  all_dropped = SyncPlan((True,) * L)
  b2b_params, _ = strategies.b2b(params, all_dropped, calib, cfg=cfg.model, n_devices=n,
                                 config=cfg.b2b)
  hg_params, _ = strategies.head_grouping(params, all_dropped, calib, cfg=cfg.model,
                                          n_devices=n, rounds=cfg.hg_rounds)
  full_params, _ = strategies.b2b(hg_params, all_dropped, calib, cfg=cfg.model, n_devices=n,
                                  config=cfg.b2b)
  donors = {"ZS": params, "ZS+B2B": b2b_params, "ZS+B2B+HG": full_params}
  scan = {s: [] for s in STRATEGIES}
  for k in range(L + 1):
    drop = tuple(i in set(order[:k]) for i in range(L))
    for s in STRATEGIES:
      scan[s].append(ev(_swap_blocks(params, donors[s], drop), drop))
  base_acc = scan["ZS"][0]["cloze"]
  droppable = {s: max(k for k in range(L + 1)
                      if scan[s][k]["cloze"] >= (1 - cfg.budget) * base_acc) / L
               for s in STRATEGIES}
  return {"sensitivity": dataclasses.asdict(sens), "classes": classes, "order": order,
          "scan": scan, "droppable": droppable}


def residual_ablation(params, cfg: StudyConfig, n: int, windows, cloze_set, order) -> dict:
  L = cfg.model.n_layers
  drop = tuple(i in set(order[:L // 2]) for i in range(L))
  return {r: Evaluator(cfg, n, windows, cloze_set, residual=r)(params, drop)
          for r in ("sum", "mean")}


def run_study(cfg: StudyConfig, outdir: str, model_dir: str | None = None,
              progress: bool = True) -> report.Section:
  """Trains (or resumes) the model in ``model_dir``, runs the study, returns the section."""
  ds = data.load("kjv")
  tcfg = TrainConfig(steps=cfg.train_steps, batch_size=cfg.train_batch, lr=3e-3,
                     warmup_steps=max(1, cfg.train_steps // 10), ckpt_every=100,
                     log_every=max(1, cfg.train_steps // 40))
  trained = train_lm(cfg.model, tcfg, seq_len=cfg.seq_len, eval_windows=cfg.eval_windows,
                     workdir=model_dir, progress=progress)
  params = trained.params
  windows = data.text_eval_windows(ds.x_test, cfg.seq_len, cfg.eval_windows)
  cloze_set = cloze.build(ds.x_test, cfg.cloze_items, cfg.cloze_context, seed=0)
  calib = data.text_batch(ds.x_train, cfg.calib_seqs, cfg.seq_len, seed=1234, step=0)["tokens"][:, :-1]

  results = {n: study_tp(params, cfg, n, windows, cloze_set, calib) for n in cfg.tp_sizes}
  mid = cfg.tp_sizes[len(cfg.tp_sizes) // 2]
  ablation = residual_ablation(params, cfg, mid, windows, cloze_set, results[mid]["order"])
  fig_dir = os.path.join(outdir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  with open(os.path.join(outdir, "spd_accuracy.json"), "w") as f:
    json.dump({"metrics": trained.metrics, "results": {str(k): v for k, v in results.items()},
               "ablation": ablation}, f, indent=1, default=float)
  return _section(cfg, trained.metrics, results, ablation, mid, cloze_set, outdir)


def _section(cfg, metrics, results, ablation, mid, cloze_set, outdir) -> report.Section:
  L = cfg.model.n_layers
  fracs = [k / L for k in range(L + 1)]
  rows, series = [], {}
  for n, r in results.items():
    for s in STRATEGIES:
      rows.append([f"TP={n}", s] + [f"{e['ppl']:.3f} / {100 * e['cloze']:.1f}" for e in r["scan"][s]]
                  + [f"{100 * r['droppable'][s]:.0f}%"])
      series[f"TP={n} {s}"] = ([100 * f for f in fracs], [100 * e["cloze"] for e in r["scan"][s]])
  fig = report.line_plot(os.path.join(outdir, "figures", "spd_accuracy.png"), series,
                         xlabel="attention syncs dropped (%)", ylabel="cloze accuracy (%)",
                         title="SPD accuracy (cloze) vs syncs dropped")
  sens_rows = []
  for n, r in results.items():
    s = r["sensitivity"]
    sens_rows.append([f"TP={n}", "progressive"] + [f"{100 * v:+.2f}" for v in s["progressive"]])
    sens_rows.append([f"TP={n}", "isolated"] + [f"{100 * v:+.2f}" for v in s["isolated"]])
    sens_rows.append([f"TP={n}", "class"] + r["classes"])
  c = cfg.model
  body = "\n\n".join([
      f"Model: byte LM d={c.d_model}, L={c.n_layers}, H={c.n_heads}, F={c.d_ff}, context "
      f"{cfg.seq_len}, {cfg.train_steps} steps on KJV: validation ppl {metrics['perplexity']:.3f} "
      f"(loss {metrics['loss']:.3f} nats/byte vs unigram {metrics['unigram_loss']:.3f}), "
      f"{metrics['tokens_per_sec']:,.0f} train tokens/s. Cloze: {len(cloze_set)} held-out items, "
      f"4 same-length choices (chance {100 * cloze_set.chance:.0f}%).",
      "Sensitivity (relative perplexity change, %, per block) and classes from the progressive "
      f"analysis (ISB < {100 * cfg.t_isb:g}% <= SB < {100 * cfg.t_esb:g}% <= ESB):",
      report.markdown_table(["TP", "kind"] + [f"b{i}" for i in range(L)], sens_rows),
      "Perplexity / cloze accuracy (%) against syncs dropped (blocks dropped from least to most "
      "sensitive in isolation); last column: largest fraction dropped within "
      f"{100 * cfg.budget:g}% relative cloze regression:",
      report.markdown_table(["TP", "strategy"] + [f"{100 * f:.0f}%" for f in fracs] + ["within budget"], rows),
      f"![accuracy]({os.path.relpath(fig, outdir)})",
      f"Residual ablation (TP={mid}, half the syncs dropped, zero-shot): summed "
      f"ppl {ablation['sum']['ppl']:.3f} / cloze {100 * ablation['sum']['cloze']:.1f}%, averaged "
      f"ppl {ablation['mean']['ppl']:.3f} / cloze {100 * ablation['mean']['cloze']:.1f}%."])
  return report.Section("SPD: accuracy against syncs dropped (sensitivity and strategies)", body)


def section(quick: bool, outdir: str) -> report.Section:
  if quick:
    return run_study(QUICK, outdir)
  return run_study(FULL, outdir, model_dir="runs/spd_study_lm")
