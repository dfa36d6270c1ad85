"""RAPIDNN study: float MLP/CNN on mnist5k, fashion_mnist and digits vs the
clustered lookup datapath over a (u, w) grid, before and after retraining;
k-means vs scikit-learn; the cost model.

  python -m experiments.rapidnn            # quick mode: ~2 min
  python -m experiments.rapidnn --full     # full: ~45 min on 2 cores

Finished grid cells are cached under <outdir>/rapidnn/, so a rerun resumes.
"""

from absl import app, flags, logging

from accel import section
from core import report
from experiments import compile_flags

_FULL = flags.DEFINE_bool("full", False, "The full study (default: quick mode, mnist5k MLP "
                          "only, a 3x3 grid, short retraining).")
_OUTDIR = flags.DEFINE_string("outdir", "results/rapidnn_study",
                              "Where REPORT.md, the JSON and the figures go.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [("rapidnn", section.section)],
                              quick=not _FULL.value, outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
