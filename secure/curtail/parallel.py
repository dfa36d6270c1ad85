"""MRR defenders spread over devices and processes. The modules are
independent and so are the images, so the batch is split over a ``('dp',)``
mesh with ``jax.shard_map``: every device runs every module on its slice
(``sharded_scores``). Across processes it is the same code on a global mesh
(``jax.distributed`` with gloo, via ``core.multiprocess``), each process
feeding its own slice (``bench_worker``).

``throughput`` measures, in one run: one process pinned to one core running
the modules one after another (the baseline), two processes pinned to a core
each (the sharded run), and one process with 1, 2 and 4 fake CPU devices
(which share this machine's cores: equality and the shape of the scaling, not
a speed-up).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from secure.curtail import modules


@functools.lru_cache(maxsize=16)
def _sharded_fn(spec: modules.Spec, mesh: Mesh):
  return jax.jit(jax.shard_map(functools.partial(modules.scores_traced, spec), mesh=mesh,
                               in_specs=(P(), P("dp")), out_specs=P("dp"),
                               # no collectives: each device scores its own images
                               check_vma=False))


def sharded_scores(spec: modules.Spec, arr: dict, x, mesh: Mesh) -> jax.Array:
  """``modules.scores`` with the batch split over ``mesh``'s 'dp' axis (padded
  to a multiple of its size; the padding is dropped)."""
  if mesh.axis_names != ("dp",):
    raise ValueError(f"the defender mesh needs one axis 'dp', got {mesh.axis_names}")
  x = jnp.asarray(x, jnp.float32)
  n, k = x.shape[0], mesh.size
  pad = (-n) % k
  xp = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  return _sharded_fn(spec, mesh)(arr, xp)[:n]


def _time(fn, reps: int) -> tuple[float, list[float], object]:
  """(cold seconds, warm seconds per rep, the first call's result)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  cold = time.perf_counter() - t0
  warm = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    warm.append(time.perf_counter() - t0)
  return cold, warm, out


def bench_worker(spec: modules.Spec, arr: dict, x: np.ndarray, reps: int, kind: str,
                 device_counts: tuple[int, ...] = ()) -> dict:
  """Runs inside ``core.multiprocess`` workers. ``kind='in_turn'``: the modules
  one after another on this process's first device; ``'sharded'``: the global
  mesh over all processes' devices (each process feeds its slice of ``x``),
  and with one process also sub-meshes of ``device_counts`` devices. Returns
  timings and the scores (gathered to every process)."""
  from jax.experimental import multihost_utils
  out = {"process": jax.process_index(), "cpus": sorted(os.sched_getaffinity(0)),
         "n_images": len(x)}
  if kind == "in_turn":
    xj = jnp.asarray(x)
    cold, warm, scores = _time(lambda: modules.scores_in_turn(spec, arr, xj), reps)
    out["in_turn"] = {"cold_s": cold, "warm_s": warm, "scores": np.asarray(scores)}
    # The two-process run's work done on one core: both halves, fused, one
    # after the other (separates parallelism from fusion and batch-size effects).
    halves = [jnp.asarray(h) for h in np.array_split(x, 2)]
    cold, warm, _ = _time(lambda: [modules.scores(spec, arr, h) for h in halves], reps)
    out["halves_in_turn"] = {"cold_s": cold, "warm_s": warm}
    return out
  if kind != "sharded":
    raise ValueError(f"kind must be 'in_turn' or 'sharded', got {kind!r}")
  nproc, pid = jax.process_count(), jax.process_index()
  counts = device_counts if nproc == 1 and device_counts else (jax.device_count(),)
  for k in counts:
    mesh = Mesh(np.array(jax.devices()[:k]), ("dp",))
    if len(x) % k:
      raise ValueError(f"{len(x)} images do not split over {k} devices")
    rep = NamedSharding(mesh, P())
    garr = jax.tree.map(lambda a: jax.make_array_from_process_local_data(rep, np.asarray(a)),
                        arr)
    per = len(x) // nproc
    gx = jax.make_array_from_process_local_data(NamedSharding(mesh, P("dp")),
                                                np.asarray(x[pid * per:(pid + 1) * per]))
    fn = _sharded_fn(spec, mesh)
    cold, warm, res = _time(lambda: fn(garr, gx), reps)
    scores = multihost_utils.process_allgather(res, tiled=True)
    out[f"sharded_{k}"] = {"cold_s": cold, "warm_s": warm, "scores": np.asarray(scores)}
  return out


def throughput(spec: modules.Spec, arr: dict, x: np.ndarray, reps: int = 5,
               rounds: int = 2, timeout: float = 600.0) -> dict:
  """Images per second of the MRR defender: baseline (1 process, 1 core,
  modules in turn), the same process running the two-process split's work
  fused and in turn, and 2 processes on a core each, interleaved over
  ``rounds``; plus 1/2/4 fake devices in one process. Medians of warm runs;
  the largest difference from the baseline's scores is reported."""
  from core import multiprocess
  host_arr = jax.tree.map(np.asarray, arr)
  cores = sorted(os.sched_getaffinity(0))
  args = {"spec": spec, "arr": host_arr, "x": np.asarray(x, np.float32), "reps": reps}
  base, two = [], []
  for _ in range(rounds):
    base.append(multiprocess.launch("secure.curtail.parallel:bench_worker", 1,
                                    args=dict(args, kind="in_turn"), timeout=timeout,
                                    cpus=[{cores[0]}])[0])
    if len(cores) >= 2:
      two.append(multiprocess.launch("secure.curtail.parallel:bench_worker", 2,
                                     args=dict(args, kind="sharded"), timeout=timeout,
                                     cpus=[{cores[0]}, {cores[1]}]))
  fake = multiprocess.launch("secure.curtail.parallel:bench_worker", 1, local_devices=4,
                             args=dict(args, kind="sharded", device_counts=(1, 2, 4)),
                             timeout=timeout)[0]
  ref = base[0]["in_turn"]["scores"]
  n = len(x)
  med = lambda runs: float(np.median([t for r in runs for t in r]))
  rec = {"n_images": n, "reps": reps, "rounds": rounds, "cores": cores,
         "baseline": {"cold_s": base[0]["in_turn"]["cold_s"],
                      "warm_s": med([b["in_turn"]["warm_s"] for b in base])}}
  rec["baseline"]["images_per_s"] = n / rec["baseline"]["warm_s"]
  w = med([b["halves_in_turn"]["warm_s"] for b in base])
  rec["same_work_one_core"] = {"warm_s": w, "images_per_s": n / w}
  diffs = {}
  if two:
    w = med([p["sharded_2"]["warm_s"] for r in two for p in r])
    rec["two_processes"] = {"cold_s": two[0][0]["sharded_2"]["cold_s"], "warm_s": w,
                            "images_per_s": n / w, "cpus": [p["cpus"] for p in two[0]]}
    rec["two_processes"]["speedup"] = rec["two_processes"]["images_per_s"] / \
        rec["baseline"]["images_per_s"]
    rec["two_processes"]["speedup_same_work"] = rec["two_processes"]["images_per_s"] / \
        rec["same_work_one_core"]["images_per_s"]
    diffs["two_processes"] = float(np.abs(two[0][0]["sharded_2"]["scores"] - ref).max())
  rec["fake_devices"] = {}
  for k in (1, 2, 4):
    r = fake[f"sharded_{k}"]
    w = float(np.median(r["warm_s"]))
    rec["fake_devices"][str(k)] = {"cold_s": r["cold_s"], "warm_s": w, "images_per_s": n / w}
    diffs[f"fake_{k}"] = float(np.abs(r["scores"] - ref).max())
  rec["max_abs_diff_vs_in_turn"] = diffs
  rec["score_scale"] = float(np.abs(ref).max())
  return rec
