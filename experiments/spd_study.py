"""SPD accuracy study: train (or resume) the byte LM, then sensitivity analysis,
zero-shot / B2B / head-grouping strategies, perplexity and cloze accuracy
against the fraction of attention syncs dropped, for several TP sizes.

  python -m experiments.spd_study                  # quick mode (the main job's section), minutes
  python -m experiments.spd_study --config=deep    # the 16-block study + sync planner (= --full)
  python -m experiments.spd_study --config=full8   # the earlier 8-block study model
  python -m experiments.spd_study --config=minilm  # all-MiniLM-L6-v2 (needs `make minilm`)
  python -m experiments.spd_study --config=bytes   # sync bytes per token on the deep model
  python -m experiments.spd_study --config=ladder  # Ladder Residual LM, SPD on it, latency model

Finished evaluations are kept in <outdir>/spd_study_cache.json (MiniLM:
spd_minilm_cache.json, bytes: spd_bytes_cache.json, ladder: spd_ladder_cache.json): an
interrupted run resumes,
and a changed config or model starts afresh (the old file is set aside).
"""

import dataclasses

import jax
from absl import app, flags, logging

from core import report
from experiments import compile_flags
from spd_jax import bytes_study, ladder_study, minilm_section, study

_CONFIG = flags.DEFINE_enum("config", None, list(study.CONFIGS) + ["minilm", "bytes", "ladder"],
                            "Study config (default: quick, or deep with --full).")
_FULL = flags.DEFINE_bool("full", False, "Same as --config=deep.")
_MODEL_DIR = flags.DEFINE_string("model_dir", None,
                                 "Checkpoint folder of the LM, trained or resumed here "
                                 "(default: runs/spd_deep_lm, runs/spd_study_lm for full8, "
                                 "<outdir>/models/spd_quick_lm in quick mode).")
_OUTDIR = flags.DEFINE_string("outdir", "results/spd_study", "Report, JSON and figures.")
_TP = flags.DEFINE_list("tp_sizes", None, "TP sizes to study (default 2,4,8).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None, "Override LM training steps.")
_T_ISB = flags.DEFINE_float("t_isb", None, "ISB threshold (relative ppl increase).")
_T_ESB = flags.DEFINE_float("t_esb", None, "ESB threshold (relative ppl increase).")
_B2B_STEPS = flags.DEFINE_integer("b2b_steps", None, "B2B distillation steps per block.")
_LADDER_K = flags.DEFINE_integer(
    "ladder_spd_blocks", 14, "--config=ladder: study blocks (of 16) whose attention sync the "
    "standard model's SPD plan drops in the latency comparison (default: the deep study's "
    "best within 1% perplexity at TP=8, ZS+B2B, docs/RESULTS.md).")


def main(argv):
  del argv
  if _CONFIG.value == "bytes":  # the HLO check compiles the TP=8 forward: 8 CPU devices
    jax.config.update("jax_num_cpu_devices", 8)
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  name = _CONFIG.value or ("deep" if _FULL.value else "quick")
  if name == "minilm":
    report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md",
                                [("spd_minilm", minilm_section.section)], quick=False,
                                outdir=_OUTDIR.value, echo=True)
    return
  extra = {"bytes": lambda quick, outdir: bytes_study.render(bytes_study.run(outdir), outdir),
           "ladder": lambda quick, outdir: ladder_study.render(
               ladder_study.run(outdir), outdir, _LADDER_K.value)}
  if name in extra:
    report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [(f"spd_{name}", extra[name])],
                                quick=False, outdir=_OUTDIR.value, echo=True)
    return
  cfg = study.CONFIGS[name]
  over = {}
  if _TP.value:
    over["tp_sizes"] = tuple(int(n) for n in _TP.value)
  if _TRAIN_STEPS.value:
    over["train_steps"] = _TRAIN_STEPS.value
  if _T_ISB.value is not None:
    over["t_isb"] = _T_ISB.value
  if _T_ESB.value is not None:
    over["t_esb"] = _T_ESB.value
  if _B2B_STEPS.value:
    over["b2b"] = dataclasses.replace(cfg.b2b, steps=_B2B_STEPS.value)
  cfg = dataclasses.replace(cfg, **over)
  model_dir = _MODEL_DIR.value or study.default_model_dir(name, _OUTDIR.value)
  run = lambda quick, outdir: study.run_study(cfg, outdir, model_dir=model_dir)
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [("spd_accuracy", run)],
                              quick=name == "quick", outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
