"""Train the LLaMA-style byte LM on the KJV corpus (resumable).

  python -m experiments.train_lm --n_layers=4 --d_model=256 --steps=3000 \
      --workdir=runs/lm_kjv

Re-running the same command after an interruption resumes from --workdir; a
workdir made with another config is refused unless --restart.
"""

from absl import app, flags, logging

from core.models import lm
from core.recipes import train_lm
from core.train import TrainConfig
from experiments import compile_flags

_D = flags.DEFINE_integer("d_model", 256, "Model width.")
_L = flags.DEFINE_integer("n_layers", 4, "Blocks.")
_H = flags.DEFINE_integer("n_heads", 8, "Attention heads.")
_KV = flags.DEFINE_integer("n_kv_heads", None, "KV heads (grouped-query attention).")
_F = flags.DEFINE_integer("d_ff", 768, "SwiGLU hidden width.")
_CTX = flags.DEFINE_integer("seq_len", 256, "Context length.")
_STEPS = flags.DEFINE_integer("steps", 3000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Sequences per step.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init and batch order.")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 64, "Validation windows (-1: all).")
_CKPT_EVERY = flags.DEFINE_integer("ckpt_every", 200, "Checkpoint interval (steps).")
_RESTART = flags.DEFINE_bool("restart", False, "Discard a run in --workdir made with another "
                             "config and start over (without it such a workdir is refused).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, summary.json.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  model_cfg = lm.LMConfig(d_model=_D.value, n_layers=_L.value, n_heads=_H.value,
                          n_kv_heads=_KV.value, d_ff=_F.value, max_seq_len=_CTX.value)
  cfg = TrainConfig(steps=_STEPS.value, batch_size=_BATCH.value, lr=_LR.value,
                    warmup_steps=max(1, _STEPS.value // 10), seed=_SEED.value,
                    ckpt_every=_CKPT_EVERY.value)
  res = train_lm(model_cfg, cfg, workdir=_WORKDIR.value, restart=_RESTART.value,
                 eval_windows=None if _EVAL_WINDOWS.value < 0 else _EVAL_WINDOWS.value)
  print({k: round(v, 5) if isinstance(v, float) else v for k, v in res.metrics.items()})


if __name__ == "__main__":
  app.run(main)
