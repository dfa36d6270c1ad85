"""The CodeX study for one (dataset, model): codebooks at every width, the
bitwidth searches under a memory budget (equal evaluations, several seeds),
fine-tuning of the chosen configuration, the uniform-integer baseline (AQT)
at equal bits, stand-alone weight encoding, and the FPGA model's throughput.

Choices are made on a validation split carved from the training images (the
budget, every search's pick); accuracies are reported on the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax

from accel import rapidnn
from accel import study as rapid_study
from accel.codex import encoding, fpga, search, uniform
from accel.codex.encoding import BitConfig
from accel.program import linear_layers, program
from accel.retrain import RetrainConfig, retrain
from core import data, evaluation
from core.cache import RunCache, params_fingerprint
from core.models import CLASSIFIERS

CODE_VERSION = "codex-1"


@dataclasses.dataclass(frozen=True)
class CodexPlan:
  runs: tuple[tuple[str, str, int], ...]     # (dataset, model, float training steps)
  evaluations: int = 120      # distinct configurations each search may evaluate
  seeds: tuple[int, ...] = (0, 1, 2)
  bound: float = 0.5          # accuracy points allowed below the 8-bit codebook
  saving: float = 1.5         # the budget: the smallest uniform width within bound / this
  int_bits: tuple[int, ...] = (8, 4, 2)
  qat: RetrainConfig = RetrainConfig(lr=5e-4)   # AQT quantization-aware training
  retrain: RetrainConfig = RetrainConfig(steps=300, batch=64, lr=5e-4)
  calib_images: int = 512
  val_images: int = 500
  board: str = "zc706"


def _acc(apply, params, x, y) -> float:
  return 100 * evaluation.classifier_metrics(apply, params, x, y)["accuracy"]


def _split(bits: tuple[int, ...]) -> BitConfig:
  n = len(bits) // 2
  return BitConfig(tuple(bits[:n]), tuple(bits[n:]))


def _curve(trace: list[dict]) -> list[float]:
  """Best feasible validation accuracy after each evaluation (NaN before the first)."""
  best, out = float("nan"), []
  for t in trace:
    if t["feasible"] and not best >= t["acc"]:
      best = t["acc"]
    out.append(best)
  return out


def run(ds: data.Dataset, model: str, steps: int, plan: CodexPlan, workdir: str | None,
        cache_path: str | None, progress: bool = True) -> dict:
  """Everything the report needs for one (dataset, model), JSON-ready."""
  t_start = time.perf_counter()
  fit, x_val, y_val = data.holdout(ds, min(plan.val_images, len(ds.x_train) // 5))
  # The same float model (and workdir) as the RAPIDNN study: trained once.
  params, mcfg = rapid_study.train_float(fit, model, steps, rapid_study.GridPlan(runs=()),
                                         workdir, progress)
  ops = program(model, mcfg)
  names = linear_layers(ops)
  acts = rapidnn.layer_activations(params, ops, fit.x_train[:plan.calib_images])
  bank = encoding.CodebookBank(params, ops, acts)
  shapes = encoding.layer_shapes(ops, ds.input_shape, params)
  cost = lambda bits: encoding.total_bits(shapes, _split(bits))["total"]
  fwd = jax.jit(lambda cb, x: rapidnn.float_forward(cb, ops, x))
  apply_cb = lambda cb, x: fwd(cb, x)

  @functools.lru_cache(maxsize=None)
  def val_acc(bits: tuple[int, ...]) -> float:
    return _acc(apply_cb, bank.codebook(_split(bits), pad=True), x_val, y_val)

  def test_acc(cfg: BitConfig, cb=None) -> float:
    return _acc(apply_cb, cb if cb is not None else bank.codebook(cfg, pad=True),
                ds.x_test, ds.y_test)

  n = len(names)
  float_apply = lambda p, x: CLASSIFIERS[model].apply(p, x, mcfg)
  res: dict[str, Any] = {
      "dataset": ds.name, "model": model, "layers": names, "n_val": len(x_val),
      "n_test": len(ds.x_test), "float_val": _acc(float_apply, params, x_val, y_val),
      "float_test": _acc(float_apply, params, ds.x_test, ds.y_test),
      "shapes": [dataclasses.asdict(s) for s in shapes]}

  # Uniform codebooks (and stand-alone weight encoding) at every width.
  res["uniform"] = []
  for b in range(1, encoding.MAX_BITS + 1):
    cfg, wo = BitConfig.uniform(n, b), BitConfig.uniform(n, b, weight_only=True)
    res["uniform"].append({"bits": b, "val": val_acc((b,) * 2 * n), "test": test_acc(cfg),
                           "total_bits": cost((b,) * 2 * n), "weight_only_test": test_acc(wo),
                           "weight_only_bits": encoding.total_bits(shapes, wo)["total"]})
  ref8 = res["uniform"][-1]
  # b*: the smallest width that, with every wider one, is within the bound on validation.
  passes = [u["val"] >= ref8["val"] - plan.bound for u in res["uniform"]]
  b_star = next(b for b in range(1, encoding.MAX_BITS + 1) if all(passes[b - 1:]))
  budget = max(cost((b_star,) * 2 * n) / plan.saving, cost((1,) * 2 * n))
  res["budget"] = {"b_star": b_star, "bits": budget, "saving": plan.saving}

  # The searches: equal evaluations, several seeds; greedy and uniform are deterministic.
  res["searches"] = {}
  methods = {"reinforce": lambda p, s: search.reinforce(p, plan.evaluations, seed=s),
             "random": lambda p, s: search.random_search(p, plan.evaluations, seed=s),
             "greedy": lambda p, s: search.greedy(p, plan.evaluations),
             "uniform": lambda p, s: search.uniform(p)}
  for name, fn in methods.items():
    runs = []
    for s in (plan.seeds if name in ("reinforce", "random") else plan.seeds[:1]):
      p = search.Problem(2 * n, val_acc, cost, budget)
      best = fn(p, s)
      runs.append({"seed": s, "best": best, "evaluations": p.evaluations,
                   "curve": _curve(p.trace),
                   "test": test_acc(_split(tuple(best["bits"]))) if best else None})
      if progress:
        found = (f"{best['acc']:.2f} val at {best['cost']:.0f} bits" if best
                 else "no feasible configuration")
        print(f"  {ds.name}/{model} {name} seed {s}: {found} ({p.evaluations} evaluations)")
    res["searches"][name] = runs

  # Fine-tune the searched pick (best validation accuracy over REINFORCE seeds)
  # and the uniform widths compared with AQT, all with the same retraining.
  found = [r["best"] for r in res["searches"]["reinforce"] if r["best"]]
  # No feasible REINFORCE pick on any seed (a budget near 1 bit everywhere): fall
  # back to the best feasible configuration any search found, and say so.
  pick = max(found or [r["best"] for m in res["searches"].values() for r in m if r["best"]],
             key=lambda b: b["acc"])
  chosen = _split(tuple(pick["bits"]))
  tuned = retrain(bank.codebook(chosen, pad=True), ops, fit, plan.retrain)
  res["chosen"] = {"bits": chosen.to_json(), "label": chosen.label(), "total_bits": pick["cost"],
                   "by": "reinforce" if found else "fallback (no feasible REINFORCE pick)",
                   "val_before": pick["acc"], "test_before": test_acc(chosen),
                   "test_after": test_acc(chosen, tuned)}
  cache = RunCache(cache_path, {"code": CODE_VERSION, "qat": dataclasses.asdict(plan.qat),
                                "retrain": dataclasses.asdict(plan.retrain), "ds": ds.name,
                                "model": model, "params": params_fingerprint(params)})
  res["equal_bits"] = []
  for b in plan.int_bits:
    def cell(b=b):
      cb = retrain(bank.codebook(BitConfig.uniform(n, b), pad=True), ops, fit, plan.retrain)
      q = uniform.qat(params, ops, (b,) * n, fit, plan.qat)
      return {"bits": b, "codebook_test": test_acc(BitConfig.uniform(n, b), cb),
              "int_test": uniform.accuracy(q, ops, (b,) * n, ds.x_test, ds.y_test),
              "int_before": uniform.accuracy(params, ops, (b,) * n, ds.x_test, ds.y_test)}
    res["equal_bits"].append(cache.get(f"bits{b}", cell))

  # Hardware: CodeX (the chosen configuration, and uniform b*) vs stand-alone weight
  # encoding with the same weight widths.
  hw = {}
  configs = {"chosen": chosen, f"uniform b*={b_star}": BitConfig.uniform(n, b_star)}
  if b_star != 4:
    configs["uniform 4"] = BitConfig.uniform(n, 4)
  for label, cfg in configs.items():
    wo = BitConfig(cfg.weights, (None,) * n)
    for board_name in fpga.BOARDS:
      d = fpga.compile_design(ops, ds.input_shape, params, cfg, board_name)
      dw = fpga.compile_design(ops, ds.input_shape, params, wo, board_name)
      hw[f"{label} @ {board_name}"] = {
          "bits": cfg.label(), "codex_img_s": d.images_per_s, "weight_only_img_s": dw.images_per_s,
          "ratio": d.images_per_s / dw.images_per_s, "codex": _summary(d),
          "weight_only": _summary(dw)}
  res["fpga"] = hw
  res["seconds"] = time.perf_counter() - t_start
  return res


def _summary(d: fpga.Design) -> dict:
  return {"ii_cycles": d.ii_cycles, "bram36": d.bram36, "dsp": d.dsp, "lut": d.lut,
          "dram_bytes": d.dram_bytes_per_image, "uj_per_image": d.energy_uj_per_image,
          "spilled": [b.name for b in d.blocks if b.spilled]}
