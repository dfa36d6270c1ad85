"""The subcloning report section: plans (quick/full), parents, tables, plots."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from core import data, report
from core.recipes import train_classifier
from core.train import TrainConfig
from spd_jax import study as spd_study
from subclone import minilm, study
from subclone.speedup import Budget, Recipe


@dataclasses.dataclass(frozen=True)
class Plan:
  lm: study.StudyConfig
  vit: study.StudyConfig
  vit_parent_steps: int
  vit_parent_batch: int = 128


# Iso-loss budgets (full mode only; the quick section keeps its one-budget
# crossing-step speed-up and says so). An LM child step costs ~0.3 s here, so the
# largest budget is 1,200 steps; the small ones resolve the levels the subcloned
# child reaches early (else the speed-up there is only a lower bound).
LM_ISO_BUDGETS = (50, 100, 150, 300, 600, 1200)
VIT_ISO_BUDGETS = (25, 50, 100, 150, 300, 600, 1200)

FULL = Plan(
    lm=study.StudyConfig(
        budget=Budget(steps=300, batch=16, eval_every=10),
        random_grid=(Recipe(3e-3, 0.1), Recipe(1e-3, 0.1), Recipe(6e-3, 0.1)),
        sub_grid=(Recipe(5e-4, 1e-3), Recipe(1e-3, 1e-3), Recipe(2e-3, 1e-3),
                  Recipe(3e-3, 1e-3), Recipe(1e-3, 0.1)), ablation_seeds=(1, 2),
        iso_budgets=LM_ISO_BUDGETS),
    vit=study.StudyConfig(
        budget=Budget(steps=300, batch=64, eval_every=10),
        random_grid=(Recipe(1e-3, 0.01), Recipe(3e-3, 0.01)),
        sub_grid=(Recipe(3e-4, 1e-3), Recipe(1e-3, 1e-3), Recipe(3e-3, 1e-3)), depth_frac=1.0,
        calib=256,
        eval_size=20, iso_budgets=VIT_ISO_BUDGETS),
    vit_parent_steps=2000)

QUICK = Plan(
    lm=study.StudyConfig(
        budget=Budget(steps=120, batch=16, eval_every=10), random_grid=(Recipe(3e-3, 0.1),),
        sub_grid=(Recipe(3e-3, 1e-3),), seeds=(1,), ablations=("weight selection (peer)",),
        calib=8, eval_size=8),
    vit=study.StudyConfig(
        budget=Budget(steps=120, batch=64, eval_every=10), random_grid=(Recipe(1e-3, 0.01),),
        sub_grid=(Recipe(1e-3, 1e-3),), seeds=(1,), depth_frac=1.0, calib=128, eval_size=10),
    vit_parent_steps=200, vit_parent_batch=64)   # 300 steps cost 16 s more of the main job


# Step 4 alone (`--iso_only`) at the recipes the full study chose (docs/RESULTS.md:
# LM random lr 3e-3 wd 0.1, subcloned 3e-3 / 1e-3; ViT 3e-3 / 0.01 and 1e-3 / 1e-3),
# random and subcloned inits only: the same cache as the full study's step 4.
ISO_ONLY = dataclasses.replace(
    FULL, lm=dataclasses.replace(FULL.lm, recipes=(Recipe(3e-3, 0.1), Recipe(3e-3, 1e-3)),
                                 ablations=()),
    vit=dataclasses.replace(FULL.vit, recipes=(Recipe(3e-3, 0.01), Recipe(1e-3, 1e-3))))

VIT_VAL_IMAGES = 1000  # carved from training images; the ViT sweep chooses recipes on them


def vit_parent(plan: Plan, workdir: str, progress: bool = True):
  """Trains (or resumes) the parent ViT on Fashion-MNIST (MNIST-5k if it is absent),
  without the validation images. Returns (params, config, test metrics, the
  training dataset, (x_val, y_val))."""
  try:
    full = data.load("fashion_mnist")
  except data.DatasetNotFoundError:
    full = data.load("mnist5k")
  ds, x_val, y_val = data.holdout(full, min(VIT_VAL_IMAGES, len(full.x_train) // 5))
  res = train_classifier(ds, "vit", TrainConfig(
      steps=plan.vit_parent_steps, batch_size=plan.vit_parent_batch, lr=1e-3,
      warmup_steps=plan.vit_parent_steps // 10, log_every=100, ckpt_every=500),
      workdir=os.path.join(workdir, ds.name), progress=progress)
  return res.params, res.model_config, res.metrics, ds, (x_val, y_val)


def _fmt_steps(x) -> str:
  return "never" if x is None else f"{x:.0f}"


def _spread(xs: list[float]) -> str:
  xs = np.asarray(xs, float)
  return f"{np.mean(xs):.2f}x (min {np.min(xs):.2f}, max {np.max(xs):.2f})"


def _seed_table(res: dict) -> str:
  rows = [[s, f"{r['random']['initial_loss']:.3f}", f"{r['subcloned']['initial_loss']:.3f}",
           f"{r['target']:.3f}", _fmt_steps(r["steps_reference"]), _fmt_steps(r["steps"]),
           f"{r['subcloned']['final_loss']:.3f}", f"{r['speedup']:.2f}x"]
          for s, r in res["seeds"].items()]
  return report.markdown_table(["seed", "initial loss random", "initial loss subcloned",
                                "random final loss", "steps (random)", "steps (subcloned)",
                                "subcloned final loss", "speed-up"], rows)


def _curves_plot(res: dict, path: str, title: str) -> str:
  series = {}
  for s, r in res["seeds"].items():
    for name in ("random", "subcloned"):
      steps, losses = zip(*r[name]["curve"])
      series[f"{name} seed {s}"] = (steps, losses)
  return report.line_plot(path, series, xlabel="step", ylabel="validation loss", title=title,
                          logy=True)


def _model_line(c: dict) -> str:
  return f"d={c['d_model']}, L={c['n_layers']}, H={c['n_heads']}, F={c['d_ff']}"


def _iso_cell(rows: list[dict]) -> str:
  """Mean (min-max) over seeds of one budget's iso-loss speed-ups; where a censored
  side makes a seed's value a bound, each seed's value with its mark instead
  ('>=' lower bound, '<=' upper bound, '~' neither); 'never' if not reached."""
  if all(r["speedup"] is None for r in rows):
    return "never"
  mark = {"lower": ">= ", "upper": "<= ", "unknown": "~ ", None: ""}
  if any(r["speedup"] is None or r["bound"] for r in rows):
    return ", ".join("never" if r["speedup"] is None else f"{mark[r['bound']]}{r['speedup']:.2f}x"
                     for r in rows)
  xs = [r["speedup"] for r in rows]
  return f"{np.mean(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


def iso_records(iso: dict) -> list[dict]:
  """One record per random-init budget b: the random run's mean final loss at b
  and, per init, the iso-loss speed-up rows of every seed at that level."""
  seeds = [str(s) for s in iso["seeds"]]
  finals = {n: {str(s): v for s, v in per.items()} for n, per in iso["final_loss"].items()}
  sp = {n: {str(s): v for s, v in per.items()} for n, per in iso["speedup"].items()}
  return [{"budget": b, "random_final": float(np.mean([finals["random init"][s][i]
                                                       for s in seeds])),
           "speedup": {n: [per[s][i] for s in seeds] for n, per in sp.items()}}
          for i, b in enumerate(iso["budgets"])]


def render_iso(iso: dict, label: str, outdir: str, tag: str) -> list[str]:
  recs = iso_records(iso)
  names = list(recs[0]["speedup"])
  rows = [[r["budget"], f"{r['random_final']:.3f}", *(_iso_cell(r["speedup"][n]) for n in names)]
          for r in recs]
  series = {}
  for n in names:
    for j, s in enumerate(iso["seeds"]):
      if n != "subcloned" and j > 0:
        continue
      measured = [(r["budget"], r["speedup"][n][j]) for r in recs
                  if r["speedup"][n][j]["speedup"] is not None]
      # Censored values drawn as their own series, so a bound never reads as a measurement.
      for suffix, keep in (("", lambda x: x["bound"] is None),
                           (" (bounds)", lambda x: x["bound"] is not None)):
        pts = [(b, x["speedup"]) for b, x in measured if keep(x)]
        if pts:
          series[f"{n} seed {s}{suffix}"] = tuple(zip(*pts))
  fig = report.line_plot(os.path.join(outdir, "figures", f"subclone_iso_{tag}.png"), series,
                         xlabel="random init's budget (steps)",
                         ylabel="iso-loss speed-up (x)", title=f"{label}: iso-loss speed-up",
                         logx=True)
  four = [r["budget"] for r in recs
          if all(x["speedup"] is not None and x["speedup"] >= 4 for x in r["speedup"]["subcloned"])]
  return [
      f"Iso-loss budget curve ({label}; seeds {', '.join(map(str, iso['seeds']))}; each budget "
      "a full run with its own warmup+cosine schedule, recipes as chosen above): the speed-up at "
      "the random init's final loss after b steps is b over the budget the other init needs for "
      "that loss, interpolated in log-budget between its own runs. '>=': the init reached the "
      "level already at the smallest budget run, so the value is a lower bound ('<=': the "
      "random init did, an upper bound; '~': both did, no bound either way); 'never': not "
      f"reached within {iso['budgets'][-1]} steps. **Budgets where subcloning is >= 4x on "
      f"every seed: {', '.join(map(str, four)) or 'none'}.**",
      report.markdown_table(["random budget b", "random final loss (mean)", *names], rows),
      f"![{tag} iso-loss]({os.path.relpath(fig, outdir)})"]


def render(lm_res: dict, vit_res: dict, extra: dict, outdir: str) -> report.Section:
  fig_dir = os.path.join(outdir, "figures")
  parts = []
  for label, res in (("LM (KJV bytes)", lm_res), (f"ViT ({vit_res['dataset']})", vit_res)):
    tag = "lm" if label.startswith("LM") else "vit"
    if res.get("recipes_given"):
      rr, sr = res["random_recipe"], res["sub_recipe"]
      parts.append(f"**{label}**: parent {_model_line(res['parent_config'])} ({extra[tag]}) -> "
                   f"child {_model_line(res['child_config'])}; recipes given (random lr "
                   f"{rr['lr']:g} wd {rr['wd']:g}, subcloned lr {sr['lr']:g} wd {sr['wd']:g}).")
      parts += render_iso(res["iso"], label, outdir, tag)
      continue
    sp = [r["speedup"] for r in res["seeds"].values()]
    sweep = "; ".join(f"{k}: {v['speedup']:.2f}x" for k, v in res["sweep"].items())
    rr, sr = res["random_recipe"], res["sub_recipe"]
    fig = _curves_plot(res, os.path.join(fig_dir, f"subclone_{tag}.png"), f"{label}: child")
    parts += [
        f"**{label}**: parent {_model_line(res['parent_config'])} ({extra[tag]}) -> child "
        f"{_model_line(res['child_config'])}. Random init at lr {rr['lr']:g}, wd {rr['wd']:g} "
        f"(lowest final loss of {len(res['random_sweep'])} recipes on the sweep seed, "
        f"evaluated on the {res.get('selection', 'validation')} split); "
        f"subcloned at lr {sr['lr']:g}, wd {sr['wd']:g} (sweep seed speed-ups: {sweep}). "
        f"**Speed-up over {len(sp)} seed(s): {_spread(sp)}.**",
        _seed_table(res), f"![{tag} curves]({os.path.relpath(fig, outdir)})"]
    if "iso" in res:
      parts += render_iso(res["iso"], label, outdir, tag)
    else:
      parts.append("Iso-loss budget curves: full mode only (`python -m experiments.subclone "
                   "--full`); the crossing-step speed-up above is at one budget.")
  if "variants" not in lm_res:
    return report.Section("Subclone: iso-loss budget curves", "\n\n".join(parts))
  spreads = lm_res.get("variant_speedups", {})
  rows = [[n, f"{v['run']['initial_loss']:.3f}", f"{v['run']['final_loss']:.3f}",
           _fmt_steps(v["steps"]), f"{v['speedup']:.2f}x",
           _spread(spreads[n]) if spreads.get(n) else "-"]
          for n, v in lm_res["variants"].items()]
  series = {n: tuple(zip(*v["run"]["curve"])) for n, v in lm_res["variants"].items()}
  fig = report.line_plot(os.path.join(fig_dir, "subclone_ablations.png"), series, xlabel="step",
                         ylabel="validation loss", title="LM child: ablations and peers",
                         logy=True)
  held = lm_res.get("ablation_seeds", [])
  parts += [
      "Ablations and peers on the LM (subcloned recipe, same budget; speed-up against the "
      "random-init run of the same seed). Columns 2-5: the sweep seed, on which the recipe "
      "was chosen as the best of the grid (**selection, flattered**); last column: mean "
      f"(min, max) over seeds {held or 'none'}, which took no part in the choice. Block "
      "influence of the parent's blocks: " + ", ".join(f"{b:.3f}" for b in lm_res["block_influence"]) + ":",
      report.markdown_table(["init", "initial loss (sweep seed)", "final loss (sweep seed)",
                             "steps to random's final (sweep seed)",
                             "speed-up (sweep seed, selection)",
                             "speed-up over held-out seeds"], rows),
      f"![ablations]({os.path.relpath(fig, outdir)})"]
  return report.Section("Subclone: training speed of subcloned vs random init", "\n\n".join(parts))


def run(quick: bool, outdir: str, progress: bool = True, iso_only: bool = False
        ) -> report.Section:
  """The section; ``iso_only`` runs step 4 alone at ``ISO_ONLY``'s recipes (full mode)."""
  if quick and iso_only:
    raise ValueError("iso_only runs the full mode's budgets; drop quick")
  plan = ISO_ONLY if iso_only else QUICK if quick else FULL
  mode = "quick" if quick else "full"
  trained = spd_study.train_model(spd_study.QUICK if quick else spd_study.FULL,
                                  spd_study.default_model_dir("quick" if quick else "full8", outdir), progress)
  lm_res = study.lm_study(trained.params, trained.model_config, plan.lm,
                          os.path.join(outdir, "subclone", f"lm_{mode}_runs.json"), progress)
  vparams, vcfg, vmetrics, ds, val = vit_parent(
      plan, os.path.join(outdir, "models", f"subclone_vit_{mode}"), progress)
  vit_res = study.vit_study(vparams, vcfg, ds, plan.vit,
                            os.path.join(outdir, "subclone", f"vit_{mode}_runs.json"), progress,
                            val=val)
  extra = {"lm": f"val loss {trained.metrics['loss']:.3f}",
           "vit": f"test accuracy {100 * vmetrics['accuracy']:.1f}%"}
  with open(os.path.join(outdir, f"subclone_{'iso' if iso_only else mode}.json"), "w") as f:
    json.dump({"lm": lm_res, "vit": vit_res, "extra": extra}, f, indent=1, default=float)
  return render(lm_res, vit_res, extra, outdir)


def section(quick: bool, outdir: str) -> report.Section:
  return run(quick, outdir)




def _mean_range(xs: list[float], fmt: str = "{:.3f}") -> str:
  return f"{fmt.format(np.mean(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def minilm_records(res: dict) -> list[dict]:
  """Per budget: each init's final validation loss and retrieval agreement over seeds."""
  iso, ret = res["iso"], res["retrieval"]
  recs = []
  for i, b in enumerate(iso["budgets"]):
    row = {"budget": b}
    for n in ("random init", "subcloned"):
      row[n] = {"loss": [v[i] for v in iso["final_loss"][n].values()],
                "top1": [v[i]["top1"] for v in ret[n].values()],
                "top10": [v[i]["top10_overlap"] for v in ret[n].values()]}
    recs.append(row)
  return recs


def render_minilm(res: dict, outdir: str) -> report.Section:
  """The MiniLM study's records as Markdown: iso-loss curve, retrieval, figures."""
  recs = minilm_records(res)
  n_ret = res["n_retrieval"]
  se = lambda xs: f"{100 * np.mean(xs):.1f} +- {100 * np.sqrt(np.mean(xs) * (1 - np.mean(xs)) / n_ret):.1f}"
  rows = [[r["budget"], _mean_range(r["random init"]["loss"]), _mean_range(r["subcloned"]["loss"]),
           se(r["random init"]["top1"]), se(r["subcloned"]["top1"]),
           f"{100 * np.mean(r['random init']['top10']):.1f}",
           f"{100 * np.mean(r['subcloned']['top10']):.1f}"] for r in recs]
  init = res["initial_retrieval"]
  fig_dir = os.path.join(outdir, "figures")
  seeds = res["iso"]["seeds"]
  loss_fig = report.line_plot(
      os.path.join(fig_dir, "subclone_minilm_loss.png"),
      {f"{n} seed {s}": (res["iso"]["budgets"], res["iso"]["final_loss"][n][k])
       for n in ("random init", "subcloned") for s, k in zip(seeds, res["iso"]["final_loss"][n])},
      xlabel="budget (steps, each its own schedule)", ylabel="validation 1 - cos",
      title="MiniLM-L6 child: distillation loss", logx=True, logy=True)
  ret_fig = report.line_plot(
      os.path.join(fig_dir, "subclone_minilm_retrieval.png"),
      {n: (res["iso"]["budgets"], [100 * np.mean(r[n]["top1"]) for r in recs],
           [100 * np.sqrt(np.mean(r[n]["top1"]) * (1 - np.mean(r[n]["top1"])) / n_ret)
            for r in recs]) for n in ("random init", "subcloned")},
      xlabel="budget (steps)", ylabel="top-1 neighbour = parent's (%)",
      title="MiniLM-L6 child: retrieval agreement", logx=True)
  last = recs[-1]
  iso_last = res["iso"]["speedup"]["subcloned"]
  sp_last = [v[-1] for v in iso_last.values()]
  better = [r["budget"] for r in recs
            if np.mean(r["subcloned"]["top1"]) > np.mean(r["random init"]["top1"])]
  pc, cc = res["parent_config"], res["child_config"]
  sw = "; ".join(f"{n}: " + ", ".join(f"lr {k}: {v:.4f}" for k, v in s.items())
                 for n, s in res["sweep"].items())
  parts = [
      f"Parent all-MiniLM-L6-v2 (d={pc['d_model']}, {pc['n_layers']} layers, {pc['n_heads']} "
      f"heads, F={pc['d_ff']}; loaded from the offline package's safetensors) -> child "
      f"d={cc['d_model']}, {cc['n_layers']} layers, {cc['n_heads']} heads, F={cc['d_ff']} "
      "(middle blocks removed). Cosine distillation of the parent's normalised mean-pooled "
      f"embeddings on {res['n_train']} training-book KJV verses; the child's pooled embedding "
      "passes a learned linear map into the parent's 384 dimensions (subcloned: starts as "
      "the selection of its kept neurons; random: random). Validation loss (1 - cos) on "
      f"{res['n_val']} held-out-book verses; retrieval on {n_ret} other held-out-book verses "
      "(each queries the rest; top-1 agreement = its nearest neighbour under the child is "
      "the parent's, binomial SE over verses). Learning rates chosen on sweep seed "
      f"{res['plan']['sweep_seed']} at {res['plan']['budgets'][1]} steps by validation loss "
      f"({sw}); chosen {res['chosen_lr']}. Report seeds {', '.join(map(str, seeds))}.",
      f"At step 0 (seed {seeds[0]}): validation loss random "
      f"{res['initial_loss']['random init']:.3f}, subcloned {res['initial_loss']['subcloned']:.3f}; "
      f"top-1 agreement random {100 * init['random init']['top1']:.1f}%, subcloned "
      f"{100 * init['subcloned']['top1']:.1f}%. Surgery ablations at step 0 (validation "
      "1 - cos, no training): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                            res.get("surgery_at_init", {}).items()) + ".",
      report.markdown_table(
          ["budget", "val loss random: mean (min-max)", "val loss subcloned",
           "top-1 agreement random (%)", "top-1 agreement subcloned (%)",
           "top-10 overlap random (%)", "top-10 overlap subcloned (%)"], rows),
      f"![minilm loss]({os.path.relpath(loss_fig, outdir)}) "
      f"![minilm retrieval]({os.path.relpath(ret_fig, outdir)})",
      *render_iso(res["iso"], "MiniLM-L6 child", outdir, "minilm"),
      f"**Target 1 (subcloned reaches the random child's loss at the largest budget, "
      f"{last['budget']} steps, with >= 4x fewer steps): "
      + ", ".join("never" if x["speedup"] is None else
                  f"{'>= ' if x['bound'] == 'lower' else ''}{x['speedup']:.2f}x" for x in sp_last)
      + f" over seeds {', '.join(map(str, seeds))}. Target 2 (higher retrieval agreement at "
      f"equal steps): subcloned higher at budgets {', '.join(map(str, better)) or 'none'} of "
      f"{', '.join(str(r['budget']) for r in recs)}.**"]
  return report.Section("Subclone: all-MiniLM-L6-v2 (a real pretrained checkpoint)",
                        "\n\n".join(parts))


def minilm_section(quick: bool, outdir: str, progress: bool = True) -> report.Section:
  """The MiniLM study (full mode; quick mode and an absent package skip it visibly)."""
  from core import pretrained
  title = "Subclone: all-MiniLM-L6-v2 (a real pretrained checkpoint)"
  if quick:
    return report.Section(title, "Full mode only (`python -m experiments.subclone --minilm`).")
  try:
    pretrained.minilm_dir()
  except pretrained.PretrainedNotFoundError as e:
    return report.Section(title, f"Skipped: {e}")
  res = minilm.run(minilm.MiniLMPlan(), os.path.join(outdir, "minilm"), progress)
  with open(os.path.join(outdir, "subclone_minilm.json"), "w") as f:
    json.dump(res, f, indent=1, default=float)
  return render_minilm(res, outdir)
