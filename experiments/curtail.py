"""CuRTAIL: victims and their vulnerability profile, the Modular Robust
Redundancy defender and its peers (Mahalanobis, MagNet, Feature Squeezing,
LID) on the same attacks and strength sweeps, the adaptive attacker against
epsilon with the Tramer check, randomised redundancy, the defender spread
over devices and processes, attack speed against foolbox.

  python -m experiments.curtail                    # quick mode (~2 minutes, mnist5k MLP)
  python -m experiments.curtail --full             # full mode (four victims)
  python -m experiments.curtail --full --victims=mnist5k/mlp --attacks=fgsm,deepfool

Writes ``<outdir>/CURTAIL.md``, ``<outdir>/curtail_<mode>.json`` and plots;
finished victims are cached, so an interrupted run resumes (a changed plan
starts afresh).
"""

import dataclasses

from absl import app, flags, logging

from core import report
from core.models import CLASSIFIERS
from experiments import compile_flags
from secure.curtail import section, study

_FULL = flags.DEFINE_bool("full", False, "Full mode (two datasets x MLP and CNN).")
_OUTDIR = flags.DEFINE_string("outdir", "results", "Where the report, JSON and figures go.")
_VICTIMS = flags.DEFINE_list("victims", [], "Subset as dataset/model, e.g. mnist5k/mlp.")
_ATTACKS = flags.DEFINE_list("attacks", [], f"Subset of {sorted(study.ATTACKS)}.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)
  plan = section.FULL if _FULL.value else section.QUICK
  over = {}
  if _VICTIMS.value:
    pairs = tuple(tuple(v.split("/")) for v in _VICTIMS.value)
    bad = [v for v, p in zip(_VICTIMS.value, pairs) if len(p) != 2 or p[1] not in CLASSIFIERS
           or p[0] not in plan.steps]
    if bad:
      raise app.UsageError(f"victims {bad} are not dataset/model with a dataset in "
                           f"{sorted(plan.steps)} and a model in {sorted(CLASSIFIERS)}")
    over["victims"] = pairs
    over["adaptive_on"] = tuple(p for p in plan.adaptive_on if p in pairs)
    over["pool_on"] = tuple(p for p in plan.pool_on if p in pairs)
  if _ATTACKS.value:
    unknown = set(_ATTACKS.value) - set(plan.attacks)
    if unknown:
      raise app.UsageError(f"unknown attacks {sorted(unknown)}; have {sorted(plan.attacks)}")
    over["attacks"] = {k: v for k, v in plan.attacks.items() if k in _ATTACKS.value}
    over["bench_attacks"] = tuple(a for a in plan.bench_attacks if a in _ATTACKS.value)
  plan = dataclasses.replace(plan, **over)
  report.write_report_or_exit(
      f"{_OUTDIR.value}/CURTAIL.md",
      [("curtail", lambda quick, outdir: section.run(quick, outdir, plan=plan))],
      quick=not _FULL.value, outdir=_OUTDIR.value)


if __name__ == "__main__":
  app.run(main)
