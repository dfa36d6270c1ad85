"""The main job: every method's headline experiment, one report.

  python -m experiments.reproduce            # quick mode (minutes)
  python -m experiments.reproduce --full     # full mode (hours)

Writes ``<outdir>/REPORT.md`` with tables and PNG plots under ``<outdir>/figures``.
"""

from absl import app, flags, logging

from accel import section as rapidnn_section
from accel.codex import section as codex_section
from core import baselines, report
from experiments import compile_flags
from secure.cleann import section as cleann_section
from secure.curtail import section as curtail_section
from spd_jax import latency_report, study
from spd_jax import minilm_section as spd_minilm_section
from subclone import section as subclone_section

_FULL = flags.DEFINE_bool("full", False, "Run the full (slow) experiments.")
_OUTDIR = flags.DEFINE_string("outdir", "results", "Where REPORT.md and figures go.")
_ONLY = flags.DEFINE_list("only", [], "Run only these sections (default: all).")

# Each method adds its (name, section function) here.
SECTIONS: list[tuple[str, report.SectionFn]] = [
    ("baselines", baselines.section),
    ("spd_latency", latency_report.section),
    ("spd_accuracy", study.section),
    ("spd_minilm", spd_minilm_section.section),             # full mode only; needs `make minilm`
    ("subclone", subclone_section.section),
    ("subclone_minilm", subclone_section.minilm_section),   # full mode only; needs `make minilm`
    ("rapidnn", rapidnn_section.section),
    ("codex", codex_section.section),
    ("cleann", cleann_section.section),
    ("curtail", curtail_section.section),
]


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  chosen = [(n, f) for n, f in SECTIONS if not _ONLY.value or n in _ONLY.value]
  unknown = set(_ONLY.value) - {n for n, _ in SECTIONS}
  if unknown:
    raise app.UsageError(f"unknown sections {sorted(unknown)}; have {[n for n, _ in SECTIONS]}")
  report.write_report_or_exit(f"{_OUTDIR.value}/REPORT.md", chosen, quick=not _FULL.value,
                              outdir=_OUTDIR.value)


if __name__ == "__main__":
  app.run(main)
