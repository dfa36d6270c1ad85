"""The subcloning study: half-width children of a trained byte LM (the SPD
study's model, trained here if absent) and of a ViT on Fashion-MNIST, trained
from random and from subcloned init; ablations and peers on the LM.

  python -m experiments.subclone            # quick mode: ~4 min
  python -m experiments.subclone --full     # full: ~5 h on 2 cores (iso-loss curves for every init)
  python -m experiments.subclone --iso_only # the iso-loss curves alone at the full study's
                                            # recipes, random vs subcloned: ~70 min
  python -m experiments.subclone --minilm   # all-MiniLM-L6-v2 -> half-width child (make minilm)

Finished runs are cached under <outdir>/subclone/, so a rerun resumes.
"""

from absl import app, flags, logging

from core import report
from experiments import compile_flags
from subclone import section

_FULL = flags.DEFINE_bool("full", False, "The full study (default: quick mode, small "
                          "budgets, one seed, one peer).")
_ISO_ONLY = flags.DEFINE_bool("iso_only", False, "Only the iso-loss budget curves (full-mode "
                              "budgets) at the recipes the full study chose.")
_MINILM = flags.DEFINE_bool("minilm", False, "Only the MiniLM-L6 subcloning study (needs "
                            "`make minilm`; ~50 min).")
_OUTDIR = flags.DEFINE_string("outdir", "results/subclone_study",
                               "Where REPORT.md, the JSON and the figures go.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  if _MINILM.value:
    report.write_report_or_exit(f"{_OUTDIR.value}/REPORT_minilm.md",
                                [("subclone MiniLM", section.minilm_section)], quick=False,
                                outdir=_OUTDIR.value, echo=True)
    return
  if _ISO_ONLY.value:
    sec = lambda quick, outdir: section.run(False, outdir, iso_only=True)
    report.write_report_or_exit(f"{_OUTDIR.value}/REPORT_iso.md", [("subclone iso-loss", sec)],
                                quick=False, outdir=_OUTDIR.value, echo=True)
    return
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", [("subclone", section.section)],
                              quick=not _FULL.value, outdir=_OUTDIR.value, echo=True)


if __name__ == "__main__":
  app.run(main)
