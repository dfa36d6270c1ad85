"""The subcloning study: half-width children of a trained byte LM (the SPD
study's model, trained here if absent) and of a ViT on Fashion-MNIST, trained
from random and from subcloned init; ablations and peers on the LM.

  python -m experiments.subclone            # quick mode: ~4 min
  python -m experiments.subclone --full     # full: ~45 min on 2 cores

Finished runs are cached under <outdir>/subclone/, so a rerun resumes.
"""

from absl import app, flags, logging

from core import report
from subclone import section

_FULL = flags.DEFINE_bool("full", False, "The full study (default: quick mode, small "
                          "budgets, one seed, one peer).")
_OUTDIR = flags.DEFINE_string("outdir", "results/subclone_study",
                               "Where REPORT.md, the JSON and the figures go.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [("subclone", section.section)],
                              quick=not _FULL.value, outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
