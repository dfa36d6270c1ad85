"""Loopback latency of TP inference with attention syncs dropped, measured
across real processes (one device each, so every all-reduce is a gloo transfer).

``run`` launches the processes; ``worker`` is what each one runs. All
processes execute the same deterministic schedule, so their collectives pair
up. Variants are interleaved (rotated each repeat) and summarised by medians.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from core import multiprocess
from core.models import lm
from spd_jax import ladder as ladder_tp
from spd_jax import sharding, tp


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  model: lm.LMConfig
  batch: int = 4
  prompt_len: int = 64
  decode_steps: int = 16
  repeats: int = 7
  fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
  codecs: tuple[str, ...] = ("bf16", "int8", "int4")  # every sync compressed, none dropped
  algorithms: tuple[str, ...] = ("two_shot", "one_shot")  # compress.ALGORITHMS
  ar_sizes: tuple[int, ...] = (256, 4096, 65536, 262144, 1048576)  # float32 elements
  ladder: bool = False  # also time the Ladder Residual wiring (plain, and half the syncs dropped)


# Quick: three drop fractions and int8 by both algorithms keep the six variants (and the
# time) of the earlier five-fraction quick benchmark.
QUICK = BenchConfig(lm.LMConfig(d_model=256, n_layers=8, n_heads=8, d_ff=768, max_seq_len=128),
                    batch=4, prompt_len=64, decode_steps=16, repeats=5, fractions=(0.0, 0.5, 1.0),
                    codecs=("int8",))
FULL = BenchConfig(lm.LMConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1536, max_seq_len=256),
                   batch=8, prompt_len=128, decode_steps=32, repeats=15, ladder=True)


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def worker(cfg_kwargs: dict, bench_kwargs: dict) -> dict:
  """Runs in each process: returns per-variant timings and HLO all-reduce counts."""
  cfg = lm.LMConfig(**cfg_kwargs)
  bench = BenchConfig(model=cfg, **bench_kwargs)
  mesh = sharding.make_mesh(jax.device_count())
  params = tp.prepare_params(lm.init(jax.random.key(0), cfg), cfg, mesh)
  rng = np.random.default_rng(0)
  prompt = sharding.replicate(rng.integers(0, 256, (bench.batch, bench.prompt_len), np.int32), mesh)
  next_tok = sharding.replicate(np.zeros((bench.batch, 1), np.int32), mesh)
  pos0 = sharding.replicate(np.int32(0), mesh)
  max_len = bench.prompt_len + bench.decode_steps
  positions = [sharding.replicate(np.int32(bench.prompt_len + i), mesh)
               for i in range(bench.decode_steps)]

  variants: dict[str, dict] = {}
  for f in bench.fractions:
    variants[f"{int(round(f * 100))}%"] = {"plan": tp.SyncPlan.drop_fraction(cfg.n_layers, f),
                                           "no_sync": False}
  for codec in bench.codecs:
    every = (codec,) * cfg.n_layers
    for alg in bench.algorithms:
      variants[f"{codec} syncs, {alg.replace('_', '-')}"] = {
          "plan": tp.SyncPlan((False,) * cfg.n_layers, every, every), "no_sync": False,
          "algorithm": alg}
  variants["no-sync"] = {"plan": tp.SyncPlan.dense(cfg.n_layers), "no_sync": True}
  if bench.ladder:  # same params, the ladder wiring (XLA may overlap or merge its syncs)
    for f in (0.0, 0.5):
      variants[f"ladder, {int(round(f * 100))}% dropped"] = {
          "plan": tp.SyncPlan.drop_fraction(cfg.n_layers, f), "no_sync": False, "ladder": True}

  for v in variants.values():
    if v.get("ladder"):
      fwd = ladder_tp.make_forward(cfg, mesh, v["plan"].drop_attn, with_cache=True)
    else:
      fwd = tp.make_forward(cfg, mesh, v["plan"], with_cache=True, no_sync=v["no_sync"],
                            compressed_algorithm=v.get("algorithm", "two_shot"))
    cache = tp.init_cache(cfg, mesh, bench.batch, max_len)
    hlo = fwd.lower(params, prompt, cache, pos0).compile().as_text()
    v["all_reduces"] = tp.count_all_reduces(hlo)
    payloads = tp.collective_payloads(hlo)  # prefill: what each device's collectives return
    v["collectives"] = len(payloads)
    v["sent_bytes"] = tp.bytes_sent(payloads, jax.device_count())
    v["fn"] = fwd
    _, warm = fwd(params, prompt, cache, pos0)          # compile prefill shape
    jax.block_until_ready(fwd(params, next_tok, warm, positions[0]))  # and decode shape
    v["prefill"], v["decode"] = [], []

  names = list(variants)
  for r in range(bench.repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
      v = variants[name]
      cache = tp.init_cache(cfg, mesh, bench.batch, max_len)
      t0 = time.perf_counter()
      _, cache = v["fn"](params, prompt, cache, pos0)
      jax.block_until_ready(cache)
      v["prefill"].append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      for pos in positions:
        _, cache = v["fn"](params, next_tok, cache, pos)
      jax.block_until_ready(cache)
      v["decode"].append((time.perf_counter() - t0) / bench.decode_steps)

  # Stand-alone all-reduce latency per message size, for fitting alpha/beta.
  ar = {}
  for n_el in bench.ar_sizes:
    x = sharding.place(np.ones((jax.device_count(), n_el), np.float32), mesh, P(sharding.TP))
    f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, sharding.TP), mesh=mesh,
                              in_specs=P(sharding.TP), out_specs=P()))
    jax.block_until_ready(f(x))
    ar[n_el * 4] = statistics.median(_timed(lambda: f(x)) for _ in range(max(5, bench.repeats)))
  keep = ("all_reduces", "collectives", "sent_bytes", "prefill", "decode")
  return {"variants": {k: {f: v[f] for f in keep} for k, v in variants.items()},
          "allreduce_seconds": ar, "process": jax.process_index()}


def run(bench: BenchConfig, num_processes: int, timeout: float = 900.0) -> dict:
  """Launches ``num_processes`` single-device processes; returns medians,
  ratios to the 0% baseline, and the gap recovered towards the no-sync bound.

  Timings are the per-variant maximum over processes (a step ends when the
  slowest process finishes it), medians over repeats.
  """
  kwargs = {k: v for k, v in dataclasses.asdict(bench).items() if k != "model"}
  results = multiprocess.launch("spd_jax.latency_bench:worker", num_processes,
                                local_devices=1, timeout=timeout,
                                args={"cfg_kwargs": dataclasses.asdict(bench.model),
                                      "bench_kwargs": kwargs})
  rows = {}
  for name in results[0]["variants"]:
    per = [r["variants"][name] for r in results]
    rows[name] = {
        "all_reduces": per[0]["all_reduces"], "collectives": per[0]["collectives"],
        "sent_bytes": per[0]["sent_bytes"],
        "prefill_s": statistics.median(map(max, zip(*(p["prefill"] for p in per)))),
        "decode_s": statistics.median(map(max, zip(*(p["decode"] for p in per)))),
    }
  base, floor = rows["0%"], rows["no-sync"]
  for row in rows.values():
    for k in ("prefill", "decode"):
      row[f"{k}_ratio"] = row[f"{k}_s"] / base[f"{k}_s"]
      gap = base[f"{k}_s"] - floor[f"{k}_s"]
      row[f"{k}_gap_recovered"] = (base[f"{k}_s"] - row[f"{k}_s"]) / gap if gap > 0 else float("nan")
  ar = {int(m): max(r["allreduce_seconds"][m] for r in results)
        for m in results[0]["allreduce_seconds"]}
  return {"num_processes": num_processes, "rows": rows, "allreduce_seconds": ar,
          "bench": dataclasses.asdict(bench)}
