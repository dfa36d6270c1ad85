"""Subclone a trained LM into a half-width, two-thirds-depth child and measure
how much faster it trains than the same child from random init.

  python -m experiments.subclone_lm --parent_dir=runs/spd_study_lm --steps=300
"""

import json
import os

from absl import app, flags

from subclone import study
from subclone.surgery import ChildSpec

_PARENT = flags.DEFINE_string("parent_dir", "runs/spd_study_lm", "Workdir of experiments.train_lm.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps for each child.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (init and data order).")
_SUB_LR = flags.DEFINE_float("sub_lr", 1e-3, "Peak lr for the subcloned child.")
_OUT = flags.DEFINE_string("out", "results/subclone_lm.json", "Where the results go.")


def main(argv):
  del argv
  parent, cfg = study.load_parent(_PARENT.value)
  spec = ChildSpec(d_model=cfg.d_model // 2, n_heads=cfg.n_heads // 2, d_ff=cfg.d_ff // 2,
                   n_layers=max(1, round(2 * cfg.n_layers / 3)))
  res = study.lm_speedup(parent, cfg, study.SpeedupConfig(
      spec, steps=_STEPS.value, seeds=tuple(int(s) for s in _SEEDS.value), sub_lr=_SUB_LR.value))
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(res, f, indent=1, default=float)
  for seed, r in res["seeds"].items():
    print(f"seed {seed}: initial loss random {r['random']['initial_loss']:.3f} / subcloned "
          f"{r['subcloned']['initial_loss']:.3f}; random final {r['target']:.3f} at step "
          f"{r['steps_random']}, subcloned reaches it at step {r['steps_subcloned']}: "
          f"speed-up {r['speedup']:.2f}x")


if __name__ == "__main__":
  app.run(main)
