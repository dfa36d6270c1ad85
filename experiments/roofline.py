"""This machine's roofline and every hot path's fraction of it, measured in one
interleaved run (about a minute).

  python -m experiments.roofline --outdir=results/roofline
"""

import json
import os

import jax
from absl import app, flags

from experiments import compile_flags
_PATHS = flags.DEFINE_list("paths", None, "Hot paths to measure (default: all of "
                           "bench.hotpaths.BUILDERS).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds; medians are reported.")
_DEVICES = flags.DEFINE_integer("devices", 2, "Fake CPU devices in this process (the TP "
                                "forward runs over them).")
_COLLECTIVE = flags.DEFINE_bool("collective", True, "Measure the loopback all-reduce across "
                                "two processes.")
_OUTDIR = flags.DEFINE_string("outdir", "results/roofline", "Output folder.")


def main(argv):
  del argv
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)   # before any computation
  compile_flags.setup()
  from bench import hotpaths, study
  paths = tuple(_PATHS.value) if _PATHS.value else tuple(hotpaths.BUILDERS)
  rec = study.run(paths, rounds=_ROUNDS.value, collective=_COLLECTIVE.value,
                  progress=lambda s: print(f"[roofline] {s}", flush=True))
  os.makedirs(_OUTDIR.value, exist_ok=True)
  path = os.path.join(_OUTDIR.value, "roofline.json")
  with open(path + ".tmp", "w") as f:
    json.dump(rec, f, indent=1)
  os.replace(path + ".tmp", path)
  md = study.render(rec)
  with open(os.path.join(_OUTDIR.value, "ROOFLINE.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  app.run(main)
