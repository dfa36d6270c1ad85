"""RAPIDNN study: float MLP/CNN on mnist5k, fashion_mnist and digits vs the
clustered lookup datapath over a (u, w) grid, before and after retraining;
k-means vs scikit-learn; the cost model.

  python -m experiments.rapidnn            # full: ~45 min on 2 cores
  python -m experiments.rapidnn --quick    # ~2 min

Finished grid cells are cached under <outdir>/rapidnn/, so a rerun resumes.
"""

from absl import app, flags

from accel import section
from core import report

_QUICK = flags.DEFINE_bool("quick", False, "mnist5k MLP only, a 3x3 grid, short retraining.")
_OUTDIR = flags.DEFINE_string("outdir", "results/rapidnn_study",
                              "Where REPORT.md, the JSON and the figures go.")


def main(argv):
  del argv
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [("rapidnn", section.section)],
                              quick=_QUICK.value, outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
