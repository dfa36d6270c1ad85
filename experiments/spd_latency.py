"""SPD latency benchmark: TP across N processes on loopback (one device each),
prefill and decode latency against the fraction of attention syncs dropped,
plus the analytical model's projections.

  python -m experiments.spd_latency --num_processes=2,4 --outdir=results/spd
"""

import dataclasses

from absl import app, flags, logging

from experiments import compile_flags
from spd_jax import latency_bench, latency_report

_N = flags.DEFINE_list("num_processes", ["2", "4"], "Process counts (TP sizes) to measure.")
_FULL = flags.DEFINE_bool("full", False, "Larger model, more repeats.")
_REPEATS = flags.DEFINE_integer("repeats", None, "Override the number of repeats.")
_OUTDIR = flags.DEFINE_string("outdir", "results/spd_latency", "Output folder.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  bench = latency_bench.FULL if _FULL.value else latency_bench.QUICK
  if _REPEATS.value:
    bench = dataclasses.replace(bench, repeats=_REPEATS.value)
  sec = latency_report.latency_study(bench, [int(n) for n in _N.value], _OUTDIR.value)
  print(sec.body)


if __name__ == "__main__":
  app.run(main)
