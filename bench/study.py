"""Fraction of this machine's peak for each hot path, measured in one run:
roofline probes and hot paths called in rotating order for ``rounds`` rounds,
medians reported, so machine drift hits roof and path alike. The loopback
collective (separate processes) runs once, before the rounds; each matmul
path's own ceiling (its matmuls and convolutions timed alone, at its shapes)
once, after them.

``run`` computes records; ``render`` turns them into Markdown.
"""

from __future__ import annotations

import statistics
from typing import Callable

import jax

from bench import hotpaths, roofline


def run(paths: tuple[str, ...] = tuple(hotpaths.BUILDERS), rounds: int = 5,
        matmul_sizes: tuple[int, ...] = roofline.MATMUL_SIZES, bf16: bool = True,
        collective: bool = True, stream_floats: int = roofline.STREAM_FLOATS,
        progress: Callable[[str], None] = lambda s: None) -> dict:
  """Records of the roofline and of every hot path in ``paths`` (names of
  ``hotpaths.BUILDERS``)."""
  unknown = set(paths) - set(hotpaths.BUILDERS)
  if unknown:
    raise ValueError(f"unknown hot paths {sorted(unknown)}; known: {sorted(hotpaths.BUILDERS)}")
  if rounds < 1:
    raise ValueError(f"rounds must be >= 1, got {rounds}")
  out: dict = {"threads": roofline.threads(), "devices": jax.device_count(),
               "jax": jax.__version__,
               "compile_cache": bool(jax.config.jax_enable_compilation_cache
                                     and jax.config.jax_compilation_cache_dir)}
  if collective:
    progress("loopback collective")
    out["collective"] = roofline.collective()
  probes: dict[str, roofline.Probe] = {}
  for n in matmul_sizes:
    for dt in ("float32",) + (("bfloat16",) if bf16 else ()):
      probes[f"matmul {dt} {n}"] = roofline.matmul_probe(n, dt)
  probes["stream triad"] = roofline.stream_probe(stream_floats)
  built: dict[str, hotpaths.HotPath] = {}
  for name in paths:
    progress(f"building {name}")
    hp = hotpaths.BUILDERS[name]()
    if hp is not None:
      built[name] = hp
  units = {**{k: p.run for k, p in probes.items()}, **{k: hp.run for k, hp in built.items()}}
  times: dict[str, list[float]] = {k: [] for k in units}
  order = list(units)
  for r in range(rounds):
    progress(f"round {r + 1}/{rounds}")
    for k in order[r % len(order):] + order[:r % len(order)]:   # rotate the order
      times[k].append(roofline.timed(units[k]))
  med = {k: statistics.median(v) for k, v in times.items()}
  out["probes"] = [dict(p.info, probe=k, seconds=med[k],
                        rate=p.info.get("flops", p.info.get("bytes", 0)) / med[k])
                   for k, p in probes.items()]
  f32 = [p for p in out["probes"] if p.get("dtype") == "float32"]
  bf = [p for p in out["probes"] if p.get("dtype") == "bfloat16"]
  peak = max(f32, key=lambda p: p["rate"])
  out["peak_flops"] = peak["rate"]
  out["peak_at"] = peak["n"]
  out["bf16_peak_flops"] = max((p["rate"] for p in bf), default=None)
  out["stream_bytes_per_s"] = next(p["rate"] for p in out["probes"] if p["kind"] == "stream")
  ceilings = {}
  for k, hp in built.items():
    if hp.traced is not None:
      progress(f"{k}: its matmuls alone")
      ceilings[k] = roofline.linear_ops_alone(hp.traced[0], *hp.traced[1])
  rows = []
  for k, hp in built.items():
    s = med[k]
    if hp.roof == "matmul":
      rate, roof = hp.flops / s, out["peak_flops"]
    else:
      rate, roof = hp.bytes / s, out["stream_bytes_per_s"]
    rows.append({"path": hp.name, "key": k, "unit": hp.unit, "seconds": s, "cold_s": hp.cold_s,
                 "flops": hp.flops, "bytes": hp.bytes, "roof": hp.roof, "rate": rate,
                 "fraction": rate / roof, "note": hp.note,
                 "spread": [min(times[k]), max(times[k])]})
    if k in ceilings:
      c = ceilings[k]
      rows[-1].update(ceiling_s=c["seconds"], ceiling_ops=c["distinct_ops"],
                      ceiling_fraction=c["flops"] / c["seconds"] / out["peak_flops"],
                      of_ceiling=c["seconds"] / s)
  out["paths"] = rows
  out["rounds"] = rounds
  return out


def render(rec: dict) -> str:
  """Markdown tables of the roofline and of each hot path's fraction of it."""
  th = rec["threads"]
  lines = [f"Machine: {th['affinity']} cores usable ({th['cpu_count']} reported), "
           f"{rec['devices']} JAX device(s) in this process, jax {rec['jax']}; "
           f"medians of {rec['rounds']} interleaved rounds. Cold = a path's first call: "
           + ("compilation, or a load where the persistent compilation cache held it."
              if rec.get("compile_cache") else "compilation (persistent cache off)."), "",
           "| probe | seconds | rate |", "|---|---|---|"]
  for p in rec["probes"]:
    rate = (f"{p['rate'] / 1e9:.1f} GFLOP/s" if p["kind"] == "matmul"
            else f"{p['rate'] / 1e9:.1f} GB/s")
    lines.append(f"| {p['probe']} | {p['seconds']:.4f} | {rate} |")
  lines.append("")
  lines.append(f"Peak float32 matmul: **{rec['peak_flops'] / 1e9:.1f} GFLOP/s** (n={rec['peak_at']}); "
               f"streaming bandwidth **{rec['stream_bytes_per_s'] / 1e9:.1f} GB/s**.")
  if rec.get("bf16_peak_flops") is not None:
    ratio = rec["bf16_peak_flops"] / rec["peak_flops"]
    native = "faster than float32: native" if ratio > 1.05 else (
        "no faster than float32: XLA:CPU does not run bfloat16 matmuls natively here")
    lines.append(f"bfloat16 matmul peaks at {rec['bf16_peak_flops'] / 1e9:.1f} GFLOP/s, "
                 f"{ratio:.2f}x float32 ({native}).")
  c = rec.get("collective")
  if c:
    lines.append(f"Loopback all-reduce over {c['processes']} gloo processes"
                 f"{' pinned one per core' if c['pinned'] else ''}: alpha "
                 f"{c['alpha_s'] * 1e6:.0f} us, beta {c['beta_bytes_per_s'] / 1e9:.2f} GB/s "
                 f"(ring fit over {len(c['seconds_by_bytes'])} sizes, "
                 f"{min(c['seconds_by_bytes'])}-{max(c['seconds_by_bytes'])} bytes).")
  lines += ["", "| hot path | one call | warm s (min-max) | cold s | achieved | roof | "
                "fraction of roof | its matmuls alone | path time in them |",
            "|---|---|---|---|---|---|---|---|---|"]
  for r in rec["paths"]:
    ach = (f"{r['rate'] / 1e9:.2f} GFLOP/s" if r["roof"] == "matmul"
           else f"{r['rate'] / 1e9:.2f} GB/s")
    roof = "f32 matmul peak" if r["roof"] == "matmul" else "stream bandwidth"
    lines.append(f"| {r['path']} | {r['unit']} | {r['seconds']:.4f} ({r['spread'][0]:.4f}-"
                 f"{r['spread'][1]:.4f}) | {r['cold_s']:.2f} | {ach} | {roof} | "
                 f"{100 * r['fraction']:.1f}% | " + (
                     f"{r['ceiling_s']:.4f} s = {100 * r['ceiling_fraction']:.1f}% of peak | "
                     f"{100 * r['of_ceiling']:.0f}% |" if "ceiling_s" in r else "n/a | n/a |"))
  lines += ["", "*Its matmuls alone*: the path's matmuls and convolutions (from its jaxpr), "
            "each compiled and timed on its own at the path's shapes and counted as often as "
            "the path runs it: the rate the path would reach if everything else were free. "
            "*Path time in them*: that time over the path's; near 100% means the path is bound "
            "by its matmul shapes, low means by the rest (element-wise passes, gathers, "
            "control)."]
  return "\n".join(lines) + "\n"
