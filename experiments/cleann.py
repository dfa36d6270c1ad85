"""CLEANN: backdoored victims, the sparse-recovery shield, its peers (STRIP,
Neural Cleanse, SCALE-UP, TeCo, IBD-PSC), the adaptive attacker, the
fixed-point datapath and the FPGA model.

  python -m experiments.cleann                 # quick mode (~4 minutes, MLP victims)
  python -m experiments.cleann --full          # full mode (about an hour)
  python -m experiments.cleann --full --rates=0.05 --triggers=patch,sig

Writes ``<outdir>/CLEANN.md``, ``<outdir>/cleann_<mode>.json`` and ROC plots;
finished victims are cached, so an interrupted run resumes.
"""

import dataclasses

from absl import app, flags, logging

from core import report
from experiments import compile_flags
from secure.cleann import section, victims

_FULL = flags.DEFINE_bool("full", False, "Full mode (both datasets, five triggers, blend at 1%).")
_OUTDIR = flags.DEFINE_string("outdir", "results", "Where the report, JSON and figures go.")
_RATES = flags.DEFINE_list("rates", [], "Poison rates (default: the mode's, 5% first).")
_TRIGGERS = flags.DEFINE_list("triggers", [], f"Subset of {sorted(victims.TRIGGERS)}.")
_DATASETS = flags.DEFINE_list("datasets", [], "Subset of mnist5k, fashion_mnist.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)
  plan = section.FULL if _FULL.value else section.QUICK
  over = {}
  if _RATES.value:
    over["rates"] = tuple(float(r) for r in _RATES.value)
  if _TRIGGERS.value:
    unknown = set(_TRIGGERS.value) - set(victims.TRIGGERS)
    if unknown:
      raise app.UsageError(f"unknown triggers {sorted(unknown)}; have {sorted(victims.TRIGGERS)}")
    over["triggers"] = tuple(_TRIGGERS.value)
    over["extra"] = tuple(e for e in plan.extra if e[0] in _TRIGGERS.value)
  if _DATASETS.value:
    over["datasets"] = tuple(_DATASETS.value)
    over["adaptive_on"] = tuple(d for d in plan.adaptive_on if d in _DATASETS.value)
  plan = dataclasses.replace(plan, **over)
  report.write_report_or_exit(
      f"{_OUTDIR.value}/CLEANN.md",
      [("cleann", lambda quick, outdir: section.run(quick, outdir, plan=plan))],
      quick=not _FULL.value, outdir=_OUTDIR.value)


if __name__ == "__main__":
  app.run(main)
