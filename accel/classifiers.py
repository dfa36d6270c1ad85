"""Any of the project's image classifiers -- the ViT above all -- on the
CodeX / RAPIDNN datapaths through ``accel.interpret``, against AQT through the
same interpreter (issue 25). Post-training: the float model is trained (or
loaded from ``workdir``), codebooks are fitted on training images, and test
accuracy is reported with its binomial SE (no choice is made here: every
configuration is a fixed ladder, so no validation split is spent).

  python -m experiments.codex --classifier=vit --dataset=fashion_mnist
"""

from __future__ import annotations

import dataclasses
import functools
import time

from accel import codebooks, graph, interpret
from accel.codex import uniform
from accel.study import binomial_se
from core import data, evaluation
from core.models import CLASSIFIERS
from core.recipes import train_classifier
from core.train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ClassifierPlan:
  dataset: str = "fashion_mnist"
  model: str = "vit"
  steps: int = 3000
  lr: float = 1e-3
  n_calib: int = 512               # training images the codebooks are fitted on
  widths: tuple[int, ...] = (8, 6, 5, 4, 3)
  tables: tuple[tuple[int, int], ...] = ((64, 64), (32, 32), (16, 16))   # RAPIDNN (u, w)
  aqt: tuple[int, ...] = (8, 6, 4)

  def __post_init__(self):
    if self.model not in CLASSIFIERS:
      raise ValueError(f"unknown classifier {self.model!r}; have {sorted(CLASSIFIERS)}")


def run(plan: ClassifierPlan, workdir: str | None, progress: bool = True) -> dict:
  """Float, CodeX (uniform widths, with and without activations), RAPIDNN
  tables and AQT test accuracies of one trained classifier."""
  say = print if progress else (lambda *a, **k: None)
  ds = data.load(plan.dataset)
  res = train_classifier(ds, plan.model, TrainConfig(
      steps=plan.steps, batch_size=64, lr=plan.lr, warmup_steps=max(1, plan.steps // 10),
      log_every=max(1, plan.steps // 10), ckpt_every=max(1, plan.steps // 2)),
      workdir=workdir, progress=progress)
  params = res.params
  apply = functools.partial(CLASSIFIERS[plan.model].apply, cfg=res.model_config)
  x_calib = ds.x_train[:plan.n_calib]
  g = graph.trace(apply, params, x_calib)
  n = len(ds.x_test)

  def acc(fn) -> dict:
    a = 100 * evaluation.classifier_metrics(fn, params, ds.x_test, ds.y_test)["accuracy"]
    return {"acc": a, "se": binomial_se(a, n)}

  out = {"model": plan.model, "dataset": ds.name, "n_test": n, "ops": len(g.ops),
         "activation_ops": sum(not o.weight for o in g.ops), "float": acc(apply)}
  say(f"{plan.model}/{ds.name} float: {out['float']['acc']:.2f}%")
  t = time.perf_counter()
  operands = interpret.operands(g, params, x_calib)
  bank = codebooks.Bank(g, operands, widths=plan.widths)
  out["fit_s"] = time.perf_counter() - t
  run_enc = lambda enc: (lambda p, x: interpret.run(g, p, x, enc))
  out["codex"] = []
  for b in plan.widths:
    for weight_only in (False, True):
      bits = codebooks.uniform(g, b, weight_only=weight_only)
      r = {"bits": b, "scope": "weights" if weight_only else "weights+activations",
           **codebooks.average_bits(g, bits), **acc(run_enc(bank.encoding(bits)))}
      out["codex"].append(r)
      say(f"  CodeX {r['scope']} {b}-bit: {r['acc']:.2f}%")
  out["rapidnn"] = []
  for u, w in plan.tables:
    r = {"u": u, "w": w, **acc(run_enc(codebooks.rapidnn(g, operands, u, w)))}
    out["rapidnn"].append(r)
    say(f"  RAPIDNN {u}x{w}: {r['acc']:.2f}%")
  out["aqt"] = []
  for b in plan.aqt:
    widths = {o.name: b for o in g.ops}
    r = {"bits": b, **acc(lambda p, x, _w=widths: uniform.run_interpreted(g, p, x, _w))}
    out["aqt"].append(r)
    say(f"  AQT int{b}: {r['acc']:.2f}%")
  _, total = codebooks.accounting(g, bank.encoding(codebooks.uniform(g, plan.widths[0])))
  out["multiplies"] = total
  return out
