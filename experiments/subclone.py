"""The subcloning study: half-width children of a trained byte LM (the SPD
study's model, trained here if absent) and of a ViT on Fashion-MNIST, trained
from random and from subcloned init; ablations and peers on the LM.

  python -m experiments.subclone            # full: ~45 min on 2 cores
  python -m experiments.subclone --quick    # ~4 min

Finished runs are cached under <outdir>/subclone/, so a rerun resumes.
"""

from absl import app, flags

from core import report
from subclone import section

_QUICK = flags.DEFINE_bool("quick", False, "Small budgets, one seed, one peer.")
_OUTDIR = flags.DEFINE_string("outdir", "results/subclone_study",
                               "Where REPORT.md, the JSON and the figures go.")


def main(argv):
  del argv
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [("subclone", section.section)],
                              quick=_QUICK.value, outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
