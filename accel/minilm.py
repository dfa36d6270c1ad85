"""The pretrained all-MiniLM-L6-v2 with every linear op of its encoder --
the 36 weight products and the 12 attention products Q.K^T and P.V -- on the
CodeX / RAPIDNN datapaths (``accel.interpret``), against AQT's uniform integers
through the same interpreter (issue 25).

Protocol (as ``subclone.minilm``): codebooks are fitted on training-book
verses; choices (the searched per-operand widths) on held-out-book verses
(validation); reported on other held-out-book verses (test): the mean cosine
of each sentence embedding to the float model's, and top-1 retrieval
agreement (each verse queries the others; agreement: the same nearest
neighbour as under the float model). Post-training only: MiniLM is not ours
to fine-tune here.

Average bits: the element-weighted mean width of the stored weights (each
counted once) and, separately, of the activation operands (per sentence);
a configuration meets a budget when both do.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from accel import codebooks, graph, interpret
from accel.codex import search, uniform
from core import data, pretrained
from core.models import bert
from subclone import minilm as sub_minilm

@dataclasses.dataclass(frozen=True)
class MiniLMPlan:
  max_len: int = 64            # word pieces per verse (95% fit)
  n_calib: int = 64            # training-book verses the codebooks are fitted on
  n_val: int = 100             # held-out-book verses: the search's choices
  n_test: int = 800            # other held-out-book verses: what is reported
  widths: tuple[int, ...] = (8, 6, 5, 4, 3)
  budget: float = 4.0          # average bits, weights and activations each
  evaluations: int = 240       # distinct configurations the search may evaluate
  probe_widths: tuple[int, ...] = (4, 3, 6, 5)   # the greedy's sensitivity probes; its floor
  chunk: int = 100             # verses per emulator call (one compiled shape)
  fit: codebooks.FitConfig = codebooks.FitConfig()

  def __post_init__(self):
    if not self.widths or any(not 1 <= b <= 8 for b in self.widths):
      raise ValueError(f"widths must be in 1..8, got {self.widths}")
    if self.n_val < 2 or self.n_test < 2 or self.n_calib < 1:
      raise ValueError("n_val and n_test need >= 2 verses, n_calib >= 1")

  @classmethod
  def quick(cls) -> "MiniLMPlan":
    return cls(n_calib=32, n_val=64, n_test=200, widths=(8, 4), evaluations=0)


@dataclasses.dataclass(frozen=True)
class Verses:
  calib: tuple[np.ndarray, np.ndarray]
  val: tuple[np.ndarray, np.ndarray]
  test: tuple[np.ndarray, np.ndarray]


def verses(plan: MiniLMPlan) -> Verses:
  """Calibration verses from the training books; validation and test from the
  held-out books (disjoint)."""
  tok = pretrained.WordPiece(pretrained.minilm_dir(), plan.max_len, fixed=True)
  train, val, test = data.kjv_verse_splits(plan.n_calib, plan.n_val, plan.n_test, seed=25)
  return Verses(tok(train), tok(val), tok(test))


def _cosines(e: np.ndarray, e0: np.ndarray) -> np.ndarray:
  return np.sum(e * e0, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(e0, axis=1))


def _score(e: np.ndarray, e0: np.ndarray) -> dict:
  cos = _cosines(e, e0)
  r = sub_minilm.retrieval(e, e0)
  return {"cos": float(cos.mean()), "cos_min": float(cos.min()),
          "cos_se": float(cos.std(ddof=1) / np.sqrt(len(cos))),
          "top1": r["top1"], "top1_se": r["top1_se"], "n": len(cos)}


def _bits_of(g: graph.Graph, knobs: tuple[int, ...]) -> codebooks.Bits:
  """Knob vector (per op: lhs, rhs) -> {op: (lhs bits, rhs bits)}."""
  return {o.name: (int(knobs[2 * i]), int(knobs[2 * i + 1])) for i, o in enumerate(g.ops)}


def budget_cost(g: graph.Graph) -> Callable[[codebooks.Bits], float]:
  """The larger of the weights' and the activations' average bits."""
  return lambda bits: max(codebooks.average_bits(g, bits).values())


def run(plan: MiniLMPlan, progress: bool = True) -> dict:
  """Every record of the study (see the module docstring)."""
  say = print if progress else (lambda *a, **k: None)
  params, cfg = pretrained.load_minilm()
  v = verses(plan)
  apply = lambda p, x: bert.sentence_embedding(p, x[0], x[1], cfg)
  g = graph.trace(apply, params, v.calib)
  float_fn = jax.jit(lambda p, a, m: apply(p, (a, m)))

  def embed(fn, split):
    return sub_minilm.embed_all(fn, params, *split, chunk=plan.chunk)

  t0 = time.perf_counter()
  ref = {"val": embed(float_fn, v.val), "test": embed(float_fn, v.test)}
  t = time.perf_counter()
  operands = interpret.operands(g, params, v.calib)
  searched = set(range(min(plan.probe_widths), 9)) if plan.evaluations else set()
  bank = codebooks.Bank(g, operands, fit=plan.fit, widths=sorted(set(plan.widths) | searched))
  fit_s = time.perf_counter() - t
  say(f"MiniLM: {len(g.ops)} linear ops, codebooks fitted in {fit_s:.0f} s")

  def encoded(enc):
    return lambda p, a, m: interpret.run(g, p, (a, m), enc)

  out = {"ops": len(g.ops), "activation_ops": sum(not o.weight for o in g.ops),
         "fit_s": fit_s, "uniform": [], "aqt": []}
  _, total = codebooks.accounting(g, bank.encoding(codebooks.uniform(g, plan.widths[0])))
  out["multiplies"] = total
  for b in plan.widths:
    for weight_only in (False, True):
      bits = codebooks.uniform(g, b, weight_only=weight_only)
      enc = bank.encoding(bits, pad=True)
      rec = {"bits": b, "scope": "weights" if weight_only else "weights+activations",
             **codebooks.average_bits(g, bits), **_score(embed(encoded(enc), v.test), ref["test"])}
      out["uniform"].append(rec)
      say(f"  CodeX {rec['scope']} {b}-bit: cos {rec['cos']:.4f}, top-1 {rec['top1']:.3f}")
    aqt_bits = {o.name: b for o in g.ops}
    aqt_fn = lambda p, a, m, _b=aqt_bits: uniform.run_interpreted(g, p, (a, m), _b)
    rec = {"bits": b, "scope": "weights+activations", "weights": float(b),
           "activations": float(b), **_score(embed(aqt_fn, v.test), ref["test"])}
    out["aqt"].append(rec)
    say(f"  AQT int{b}: cos {rec['cos']:.4f}, top-1 {rec['top1']:.3f}")
  if plan.evaluations:
    out["search"] = _search(g, bank, plan, embed, encoded, ref, v, say)
  out["throughput"] = _throughput(g, params, bank, plan, v, float_fn)
  out["wall_s"] = time.perf_counter() - t0
  return out


def _search(g, bank, plan, embed, encoded, ref, v, say) -> dict:
  """The greedy per-operand search (``accel.codex.search.greedy``) under the
  budget, on validation cosine; its pick reported on test."""
  cost = budget_cost(g)

  def evaluate(knobs):
    enc = bank.encoding(_bits_of(g, knobs), pad=True)
    return 100.0 * float(_cosines(embed(encoded(enc), v.val), ref["val"]).mean())

  p = search.Problem(2 * len(g.ops), evaluate, lambda k: cost(_bits_of(g, k)), plan.budget)
  t = time.perf_counter()
  best = search.greedy(p, plan.evaluations, widths=plan.probe_widths)
  wall = time.perf_counter() - t
  bits = _bits_of(g, tuple(best["bits"]))
  enc = bank.encoding(bits, pad=True)
  rec = {"method": "greedy", "evaluations": p.evaluations, "wall_s": wall,
         "val_cos": best["acc"] / 100, "config": {k: list(w) for k, w in bits.items()},
         **codebooks.average_bits(g, bits), **_score(embed(encoded(enc), v.test), ref["test"])}
  say(f"  greedy <= {plan.budget} bits: {rec['weights']:.2f}/{rec['activations']:.2f} bits, "
      f"cos {rec['cos']:.4f}, top-1 {rec['top1']:.3f} ({p.evaluations} evaluations, {wall:.0f} s)")
  return rec


def _throughput(g, params, bank, plan, v, float_fn, repeats: int = 3) -> dict:
  """Sentences/s of the float model and of the emulator (every op at the
  plan's lowest width), interleaved: cold = the first call at a batch shape
  neither has seen (compile included), warm = the median of ``repeats``."""
  enc = bank.encoding(codebooks.uniform(g, plan.widths[-1]))
  runs = {"float": lambda a, m: float_fn(params, a, m),
          "emulator": lambda a, m: interpret.run(g, params, (a, m), enc)}
  cold_a, cold_m = v.test[0][:plan.chunk - 1], v.test[1][:plan.chunk - 1]
  a, m = v.test[0][:plan.chunk], v.test[1][:plan.chunk]
  out = {}
  for name, fn in runs.items():
    t = time.perf_counter()
    jax.block_until_ready(fn(cold_a, cold_m))
    out[f"{name}_cold"] = len(cold_a) / (time.perf_counter() - t)
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      jax.block_until_ready(fn(a, m))          # warm this shape
      t = time.perf_counter()
      jax.block_until_ready(fn(a, m))
      times[name].append(time.perf_counter() - t)
  for name, ts in times.items():
    out[f"{name}_warm"] = len(a) / float(np.median(ts))
  out["bits"] = plan.widths[-1]
  return out
