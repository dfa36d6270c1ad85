"""Train a shared classifier on an offline image dataset (resumable).

  python -m experiments.train_classifier --dataset=mnist5k --model=cnn \
      --steps=2000 --workdir=runs/cnn_mnist5k

Re-running the same command after an interruption resumes from the last
checkpoint in --workdir; a workdir made with another config is refused unless
--restart.
"""

from absl import app, flags, logging

from core import data, models
from core.recipes import train_classifier
from core.train import TrainConfig
from experiments import compile_flags

_DATASET = flags.DEFINE_enum("dataset", "mnist5k", ["digits", "mnist5k", "fashion_mnist"],
                             "Image dataset.")
_MODEL = flags.DEFINE_enum("model", "cnn", list(models.CLASSIFIERS), "Classifier.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_LR = flags.DEFINE_float("lr", 1e-3, "Peak learning rate.")
_WD = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init and batch order.")
_CKPT_EVERY = flags.DEFINE_integer("ckpt_every", 200, "Checkpoint interval (steps).")
_RESTART = flags.DEFINE_bool("restart", False, "Discard a run in --workdir made with another "
                             "config and start over (without it such a workdir is refused).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, summary.json.")
_FASHION_DIR = flags.DEFINE_string("fashion_mnist_dir", None,
                                   "Folder with the Fashion-MNIST IDX .gz files.")


def main(argv):
  del argv
  compile_flags.setup()
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  kwargs = {"data_dir": _FASHION_DIR.value} if _DATASET.value == "fashion_mnist" else {}
  cfg = TrainConfig(steps=_STEPS.value, batch_size=_BATCH.value, lr=_LR.value,
                    weight_decay=_WD.value, warmup_steps=max(1, _STEPS.value // 10),
                    seed=_SEED.value, ckpt_every=_CKPT_EVERY.value)
  res = train_classifier(data.load(_DATASET.value, **kwargs), _MODEL.value, cfg,
                         workdir=_WORKDIR.value, restart=_RESTART.value)
  print({k: round(v, 5) if isinstance(v, float) else v for k, v in res.metrics.items()})


if __name__ == "__main__":
  app.run(main)
