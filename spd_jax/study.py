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
from tqdm.auto import tqdm

from core import cloze, data, evaluation, report
from core.cache import RunCache, params_fingerprint
from core.models import lm
from core.recipes import train_lm
from core.train import TrainConfig
from spd_jax import emulate, plan_study, sensitivity, strategies
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
  cloze_items: int = 300   # each evaluation scores items x 4 x (context + word) bytes
  cloze_context: int = 32
  calib_seqs: int = 64
  b2b: strategies.B2BConfig = strategies.B2BConfig(steps=100, batch=8)
  hg_rounds: int = 2
  t_isb: float = sensitivity.T_ISB
  t_esb: float = sensitivity.T_ESB
  budget: float = 0.01  # relative cloze-accuracy regression allowed
  cloze_tp_sizes: tuple[int, ...] | None = None    # None: every TP size
  cloze_strategies: tuple[str, ...] = STRATEGIES   # scored on the cloze test
  cloze_every: int = 1         # score the cloze test at every k-th number of blocks dropped
  planner_tp: int | None = 8   # run the sync planner at this TP size (None: not at all)
  planner_settings: tuple[plan_study.Setting, ...] = plan_study.SETTINGS
  planner_windows: int = 32    # calibration windows the planner's budget is checked on


# Quick mode smoke-checks TP 2 and 8 (the full study adds 4): the main job has to fit
# every method's section in 20 minutes on two cores.
QUICK = StudyConfig(lm.LMConfig(d_model=128, n_layers=4, n_heads=8, d_ff=256, max_seq_len=128),
                    # Quick mode smoke-checks the pipeline (docs/RESULTS.md has the full study):
                    # 100 cloze items (+-5 points) and 40 B2B steps keep the 20-minute job.
                    train_steps=300, tp_sizes=(2, 8), cloze_items=100, eval_windows=32, calib_seqs=48,
                    b2b=strategies.B2BConfig(steps=40, batch=8), hg_rounds=1,
                    planner_settings=(plan_study.Setting("70b", "a100-nvlink", "prefill"),))
FULL = StudyConfig(lm.LMConfig(d_model=192, n_layers=8, n_heads=8, d_ff=512, max_seq_len=128),
                   train_steps=800)
# The deeper study model (issue 14): 16 blocks, narrowed from d=192/F=512 to d=128/F=384 so
# the parameter count (3.48M vs 3.64M) and the training FLOPs stay close to FULL's; the same
# recipe and steps. Each block is 6.25% of the attention syncs instead of 12.5%. Its cloze set
# has 3,000 items (SE ~0.9 points); scoring one costs ~2 min here, so the cloze scan runs
# where the target is (TP=8), for zero-shot and the full stack, at every second k (12.5%
# steps); perplexity, the primary budget, is scanned at every k and TP size.
DEEP = StudyConfig(lm.LMConfig(d_model=128, n_layers=16, n_heads=8, d_ff=384, max_seq_len=128),
                   train_steps=800, cloze_items=3000, cloze_tp_sizes=(8,),
                   cloze_strategies=("ZS", "ZS+B2B+HG"), cloze_every=2)
CONFIGS = {"quick": QUICK, "full8": FULL, "deep": DEEP}


class Evaluator:
  """Perplexity on held-out windows and cloze accuracy, for any (params, drop mask)."""

  def __init__(self, cfg: StudyConfig, n_devices: int, windows, cloze_set, residual="sum"):
    self.windows, self.cloze_set = windows, cloze_set
    apply = functools.partial(emulate.apply_masked, cfg=cfg.model, n_devices=n_devices,
                              residual=residual)
    self._apply = jax.jit(lambda pd, t: apply(pd[0], t, drop_L=pd[1]))

  def ppl(self, params, drop, windows=None) -> float:
    pd = (params, jnp.asarray(drop, bool))
    return evaluation.lm_metrics(self._apply, pd, self.windows if windows is None else windows
                                 )["perplexity"]

  def cloze_correct(self, params, drop) -> np.ndarray:
    """Per item: did the model rank the true word first?"""
    lp = cloze.candidate_logprobs(self._apply, (params, jnp.asarray(drop, bool)), self.cloze_set)
    return np.argmax(lp, -1) == self.cloze_set.answers

  def __call__(self, params, drop) -> dict:
    return {"ppl": self.ppl(params, drop), **cloze_record(self.cloze_correct(params, drop))}


def cloze_record(correct: np.ndarray, dense: np.ndarray | None = None) -> dict:
  """Accuracy, its binomial standard error and, against the dense model's answers on the
  same items, the paired standard error of the change (items are shared, so the change
  is measured more sharply than either accuracy)."""
  n = len(correct)
  acc = float(np.mean(correct))
  rec = {"cloze": acc, "cloze_se": (acc * (1 - acc) / n) ** 0.5}
  if dense is not None:
    diff = correct.astype(float) - dense.astype(float)
    rec["cloze_paired_se"] = float(np.std(diff, ddof=1) / n ** 0.5) if n > 1 else float("nan")
  return rec


def _stage(progress: bool, msg: str) -> None:
  if progress:
    tqdm.write(f"[spd study] {msg}")


def strategy_params(params, cfg: StudyConfig, n: int, calib) -> dict:
  """Each strategy's params with every block prepared for SPD at TP size ``n`` (a scan
  swaps in the dropped blocks). Deterministic: seeded B2B, greedy HG."""
  all_dropped = SyncPlan((True,) * cfg.model.n_layers)
  b2b_params, _ = strategies.b2b(params, all_dropped, calib, cfg=cfg.model, n_devices=n,
                                 config=cfg.b2b)
  hg_params, _ = strategies.head_grouping(params, all_dropped, calib, cfg=cfg.model,
                                          n_devices=n, rounds=cfg.hg_rounds)
  full_params, _ = strategies.b2b(hg_params, all_dropped, calib, cfg=cfg.model, n_devices=n,
                                  config=cfg.b2b)
  return {"ZS": params, "ZS+B2B": b2b_params, "ZS+B2B+HG": full_params}


def study_tp(params, cfg: StudyConfig, n: int, windows, cloze_set, calib, calib_windows,
             progress: bool = True, runs: RunCache | None = None) -> dict:
  """Sensitivity (on calibration windows), strategy params and the k-scan (held-out
  windows and cloze) for TP size ``n``; with ``runs``, every finished evaluation is
  kept, so an interrupted study resumes."""
  runs = runs or RunCache(None)
  L = cfg.model.n_layers
  ev = Evaluator(cfg, n, windows, cloze_set)
  _stage(progress, f"TP={n}: sensitivity ({2 * L + 1} calibration perplexity evaluations)")
  sens = runs.get(f"tp{n}/sensitivity", lambda: dataclasses.asdict(sensitivity.analyse(
      lambda plan: ev.ppl(params, plan.drop_attn, calib_windows), L)))
  classes = sensitivity.classify(sens["progressive"], cfg.t_isb, cfg.t_esb)
  order = sensitivity.drop_order(sens["isolated"])

  @functools.cache  # only when an evaluation is not cached yet (a resumed study skips it)
  def donors():
    _stage(progress, f"TP={n}: B2B distillation of {L} blocks, head grouping, B2B again")
    return strategy_params(params, cfg, n, calib)

  with_cloze = cfg.cloze_tp_sizes is None or n in cfg.cloze_tp_sizes
  dense_correct = None
  if with_cloze:
    dense_correct = np.array([c == "1" for c in runs.get("cloze_dense", lambda: {"correct": "".join(
        "1" if c else "0" for c in ev.cloze_correct(params, (False,) * L))})["correct"]])
  scan = {s: [] for s in STRATEGIES}
  for k in tqdm(range(L + 1), desc=f"TP={n} scan", disable=not progress):
    drop = tuple(i in set(order[:k]) for i in range(L))
    for s in STRATEGIES:
      def evaluate(s=s, drop=drop, k=k):
        p = plan_study.swap_dropped(params, donors()[s], drop) if k else params
        rec = {"ppl": ev.ppl(p, drop)}
        if with_cloze and s in cfg.cloze_strategies and k % cfg.cloze_every == 0:
          correct = dense_correct if k == 0 else ev.cloze_correct(p, drop)
          rec |= cloze_record(correct, dense_correct)
        return rec
      scan[s].append(runs.get(f"tp{n}/scan/{s}/{k}", evaluate))
  out = {"sensitivity": sens, "classes": classes, "order": order, "scan": scan}
  if n == cfg.planner_tp:
    _stage(progress, f"TP={n}: sync planner ({len(cfg.planner_settings)} settings)")
    out["planner"] = runs.get(f"tp{n}/planner", lambda: plan_study.run(
        params, donors()["ZS+B2B+HG"], cfg.model, n, calib_windows[:cfg.planner_windows],
        windows,
        cfg.planner_settings, progress=lambda m: _stage(progress, m)))
  return out


def largest_passing_prefix(passes: list[bool]) -> int:
  """The largest k such that ``passes[0..k]`` all hold (-1 if ``passes[0]`` fails):
  a budget holds at a setting only if every smaller setting passes too."""
  k = -1
  while k + 1 < len(passes) and passes[k + 1]:
    k += 1
  return k


def within_budget(scan: list[dict], budget: float) -> dict:
  """Largest fraction of syncs dropped such that it and every smaller fraction
  keep cloze accuracy within ``budget`` relative regression; likewise for
  perplexity. Cloze is judged on the fractions where the scan scored it (None if not
  at 0%)."""
  if budget < 0:
    raise ValueError(f"budget must be >= 0, got {budget}")
  L = len(scan) - 1
  ppl0 = scan[0]["ppl"]
  ok_ppl = [e["ppl"] <= (1 + budget) * ppl0 for e in scan]
  out = {"ppl": largest_passing_prefix(ok_ppl) / L, "cloze": None}
  scored = [(k, e["cloze"]) for k, e in enumerate(scan) if e.get("cloze") is not None]
  if scored and scored[0][0] == 0:
    acc0 = scored[0][1]
    last = largest_passing_prefix([a >= (1 - budget) * acc0 for _, a in scored])
    out["cloze"] = scored[last][0] / L if last >= 0 else -1 / L
  return out


def residual_ablation(params, cfg: StudyConfig, n: int, windows, cloze_set, order) -> dict:
  """Summed vs averaged residual at TP size ``n``, half the syncs dropped zero-shot (cloze
  only where the config scores it at this TP size)."""
  L = cfg.model.n_layers
  drop = tuple(i in set(order[:L // 2]) for i in range(L))
  with_cloze = cfg.cloze_tp_sizes is None or n in cfg.cloze_tp_sizes
  out = {}
  for r in ("sum", "mean"):
    ev = Evaluator(cfg, n, windows, cloze_set, residual=r)
    out[r] = ev(params, drop) if with_cloze else {"ppl": ev.ppl(params, drop)}
  return out


def train_model(cfg: StudyConfig, model_dir: str | None = None, progress: bool = True,
                architecture: str = "standard"):
  """Trains (or resumes, or just loads) the study's LM in ``model_dir``; also the
  parent the subcloning study reuses. ``architecture="ladder"``: the same recipe for
  the Ladder Residual wiring (``core.models.ladder``)."""
  tcfg = TrainConfig(steps=cfg.train_steps, batch_size=cfg.train_batch, lr=3e-3,
                     warmup_steps=max(1, cfg.train_steps // 10), ckpt_every=100,
                     log_every=max(1, cfg.train_steps // 40))
  return train_lm(cfg.model, tcfg, seq_len=cfg.seq_len, eval_windows=cfg.eval_windows,
                  workdir=model_dir, progress=progress, architecture=architecture)


def default_model_dir(config: str, outdir: str) -> str:
  """Where the report's study LM lives (quick: under ``outdir``; others: ``runs/``)."""
  return {"quick": os.path.join(outdir, "models", "spd_quick_lm"),
          "full8": "runs/spd_study_lm", "deep": "runs/spd_deep_lm"}[config]


def calibration_windows(ds, cfg: StudyConfig) -> np.ndarray:
  """Windows from the end of the training books: sensitivity, drop orders and the
  planner's budget are measured here, never on the held-out windows they are reported on."""
  n = cfg.eval_windows
  return data.text_eval_windows(ds.x_train[-(n * cfg.seq_len + 1):], cfg.seq_len, n)


def run_study(cfg: StudyConfig, outdir: str, model_dir: str | None = None,
              progress: bool = True) -> report.Section:
  """Trains (or resumes) the model in ``model_dir``, runs the study (resuming from
  ``outdir/spd_study_cache.json``, which a changed config or model sets aside), and
  returns the section."""
  ds = data.load("kjv")
  trained = train_model(cfg, model_dir, progress)
  params = trained.params
  windows = data.text_eval_windows(ds.x_test, cfg.seq_len, cfg.eval_windows)
  cloze_set = cloze.build(ds.x_test, cfg.cloze_items, cfg.cloze_context, seed=0)
  calib = data.text_batch(ds.x_train, cfg.calib_seqs, cfg.seq_len, seed=1234, step=0)["tokens"][:, :-1]
  calib_windows = calibration_windows(ds, cfg)
  runs = RunCache(os.path.join(outdir, "spd_study_cache.json"),
                  {"config": dataclasses.asdict(cfg), "params": params_fingerprint(params),
                   "version": 2})
  results = {n: study_tp(params, cfg, n, windows, cloze_set, calib, calib_windows, progress,
                         runs) for n in cfg.tp_sizes}
  mid = cfg.tp_sizes[len(cfg.tp_sizes) // 2]
  ablation = runs.get(f"ablation/tp{mid}", lambda: residual_ablation(
      params, cfg, mid, windows, cloze_set, results[mid]["order"]))
  fig_dir = os.path.join(outdir, "figures")
  os.makedirs(fig_dir, exist_ok=True)
  with open(os.path.join(outdir, "spd_accuracy.json"), "w") as f:
    json.dump({"config": dataclasses.asdict(cfg), "metrics": trained.metrics,
               "results": {str(k): v for k, v in results.items()}, "ablation": ablation},
              f, indent=1, default=float)
  return render_section(cfg, trained.metrics, results, ablation, outdir)


def _ablation_text(e: dict) -> str:
  cloze = f" / cloze {100 * e['cloze']:.1f}%" if e.get("cloze") is not None else ""
  return f"ppl {e['ppl']:.3f}{cloze}"


def _cloze_cell(e: dict) -> str:
  if e.get("cloze") is None:
    return "-"
  cell = f"{100 * e['cloze']:.1f}±{100 * e['cloze_se']:.1f}"
  if e.get("cloze_paired_se") is not None and "delta" in e:
    cell += f" ({100 * e['delta']:+.1f}±{100 * e['cloze_paired_se']:.1f})"
  return cell


def render_section(cfg: StudyConfig, metrics: dict, results: dict, ablation: dict,
                   outdir: str) -> report.Section:
  """The report section from study results (also re-renders a saved JSON)."""
  L = cfg.model.n_layers
  mid = cfg.tp_sizes[len(cfg.tp_sizes) // 2]
  se = 100 * (0.5 * 0.5 / cfg.cloze_items) ** 0.5  # binomial standard error near 50%
  fracs = [k / L for k in range(L + 1)]
  x = [100 * f for f in fracs]
  ppl_rows, cloze_rows, ppl_series, cloze_series, stack_vs_zs = [], [], {}, {}, []
  for n, r in results.items():
    for s in STRATEGIES:
      scan = r["scan"][s]
      ok = within_budget(scan, cfg.budget)
      ppl_rows.append([f"TP={n}", s] + [f"{e['ppl']:.3f}" for e in scan]
                      + [f"{100 * ok['ppl']:.0f}%"])
      ppl_series[f"TP={n} {s}"] = (x, [e["ppl"] for e in scan])
      if scan[0].get("cloze") is not None:
        cells = [dict(e, delta=e["cloze"] - scan[0]["cloze"])
                 if k and e.get("cloze") is not None else e for k, e in enumerate(scan)]
        cloze_rows.append([f"TP={n}", s] + [_cloze_cell(e) for e in cells]
                          + [f"{100 * ok['cloze']:.0f}%"])
        pts = [(v, e) for v, e in zip(x, scan) if e.get("cloze") is not None]
        cloze_series[f"TP={n} {s}"] = ([v for v, _ in pts], [100 * e["cloze"] for _, e in pts],
                                       [100 * e["cloze_se"] for _, e in pts])
    zs, st = r["scan"]["ZS"], r["scan"]["ZS+B2B+HG"]
    half = [k for k in range(L + 1) if 2 * k >= L]
    wins = sum(st[k]["ppl"] < zs[k]["ppl"] for k in half)
    stack_vs_zs.append(f"TP={n}: {wins} of {len(half)}")
  fig = report.line_plot(os.path.join(outdir, "figures", "spd_accuracy.png"), ppl_series,
                         xlabel="attention syncs dropped (%)", ylabel="held-out perplexity",
                         title="SPD: perplexity vs syncs dropped")
  parts_cloze = []
  if cloze_series:
    fig_cloze = report.line_plot(os.path.join(outdir, "figures", "spd_cloze.png"), cloze_series,
                                 xlabel="attention syncs dropped (%)",
                                 ylabel="cloze accuracy (%) ± standard error",
                                 title=f"SPD: cloze accuracy ({cfg.cloze_items} items)")
    parts_cloze = [
        "Cloze accuracy (%) ± binomial standard error; in brackets the change from the dense "
        "model ± its paired standard error (same items, so sharper than either accuracy). "
        "Last column: largest fraction such that it and every smaller fraction stay within "
        f"{100 * cfg.budget:g}% relative regression of accuracy:",
        report.markdown_table(["TP", "strategy"] + [f"{v:.0f}%" for v in x] + ["cloze budget"],
                              cloze_rows),
        f"![cloze]({os.path.relpath(fig_cloze, outdir)})"]
  sens_rows = []
  for n, r in results.items():
    s = r["sensitivity"]
    sens_rows.append([f"TP={n}", "progressive"] + [f"{100 * v:+.2f}" for v in s["progressive"]])
    sens_rows.append([f"TP={n}", "isolated"] + [f"{100 * v:+.2f}" for v in s["isolated"]])
    sens_rows.append([f"TP={n}", "class"] + r["classes"])
  c = cfg.model
  planner_parts = []
  for n, r in results.items():
    if "planner" in r:
      planner_parts += [f"**Sync planner (TP={n})**: per block keep / drop / int8-compress the "
                        "attention sync and keep / int8-compress the MLP sync, minimising "
                        "modelled latency within a perplexity budget; dropped blocks use the "
                        "ZS+B2B+HG params, for drop-only SPD too.",
                        plan_study.render(r["planner"], outdir)]
  body = "\n\n".join([
      f"Model: byte LM d={c.d_model}, L={c.n_layers}, H={c.n_heads}, F={c.d_ff}, context "
      f"{cfg.seq_len}, {cfg.train_steps} steps on KJV: held-out ppl {metrics['perplexity']:.3f} "
      f"(loss {metrics['loss']:.3f} nats/byte vs unigram {metrics['unigram_loss']:.3f}), "
      f"{metrics['tokens_per_sec']:,.0f} train tokens/s. Cloze: {cfg.cloze_items} held-out "
      f"items, 4 same-length choices (chance 25%), standard error about {se:.1f} points; a 1% "
      f"relative budget is {0.5 * cfg.budget * 100:.1f} points at 50% accuracy"
      + (", below one accuracy's standard error; the paired standard error of a change "
         "(in brackets in the cloze table) is the sharper test, and perplexity the primary "
         "budget." if se > 50 * cfg.budget else "."),
      "Sensitivity (relative perplexity change, %, per block, measured on calibration windows "
      "from the training books) and classes from the progressive analysis "
      f"(ISB < {100 * cfg.t_isb:g}% <= SB < {100 * cfg.t_esb:g}% <= ESB):",
      report.markdown_table(["TP", "kind"] + [f"b{i}" for i in range(L)], sens_rows),
      "Held-out perplexity against syncs dropped (blocks dropped from least to most sensitive "
      "in isolation, on calibration data); last column: largest fraction of syncs dropped such "
      f"that it and every smaller fraction stay within {100 * cfg.budget:g}% relative regression:",
      report.markdown_table(["TP", "strategy"] + [f"{v:.0f}%" for v in x] + ["ppl budget"],
                            ppl_rows),
      "ZS+B2B+HG below ZS in perplexity at fractions >= 50%: " + ", ".join(stack_vs_zs) + ".",
      f"![perplexity]({os.path.relpath(fig, outdir)})", *parts_cloze,
      f"Residual ablation (TP={mid}, half the syncs dropped, zero-shot): summed "
      f"{_ablation_text(ablation['sum'])}, averaged {_ablation_text(ablation['mean'])}.",
      *planner_parts])
  return report.Section("SPD: accuracy against syncs dropped (sensitivity and strategies)", body)


def section(quick: bool, outdir: str) -> report.Section:
  """The main job's section: the quick study, or the deep one in full mode."""
  name = "quick" if quick else "deep"
  return run_study(CONFIGS[name], outdir, model_dir=default_model_dir(name, outdir))
