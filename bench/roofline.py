"""This machine's roofline, measured: what XLA:CPU reaches on a dense matmul
(float32, and bfloat16 to see whether it is native), streaming memory bandwidth,
and the loopback collective's latency and bandwidth across real processes.

Each probe is a compiled unit of work and what it does; ``bench.study`` times
them interleaved with the hot paths they judge, so drift hits both sides.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MATMUL_SIZES = (256, 512, 1024, 2048)
STREAM_FLOATS = 1 << 25            # 128 MiB per array: far beyond any cache here
AR_SIZES = (256, 4096, 65536, 262144, 1048576)  # float32 elements per all-reduce


def timed(fn: Callable[[], object]) -> float:
  """Wall seconds of one call ``fn()``, its outputs blocked on."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int) -> float:
  """Median of ``timed(fn)`` over ``repeats`` calls."""
  return statistics.median(timed(fn) for _ in range(repeats))


def threads() -> dict:
  """The cores this process may use (XLA:CPU sizes its intra-op pool to them)."""
  return {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}


@dataclasses.dataclass(frozen=True)
class Probe:
  run: Callable[[], object]   # one call, timed by the caller
  info: dict                  # kind ("matmul" / "stream"), its work (flops or bytes), sizes


def matmul_probe(n: int, dtype: str = "float32") -> Probe:
  """A jitted (n, n) @ (n, n) in ``dtype``, compiled here: 2 n^3 FLOPs per call."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dtype)
  b = jnp.asarray(rng.standard_normal((n, n)), dtype)
  f = jax.jit(jnp.matmul)
  jax.block_until_ready(f(a, b))   # compile outside the timing
  return Probe(lambda: f(a, b), {"kind": "matmul", "dtype": dtype, "n": n, "flops": 2.0 * n ** 3})


def stream_probe(n: int = STREAM_FLOATS) -> Probe:
  """STREAM's triad, a = b + s * c, jitted: 3 x 4 n bytes moved per call (two
  reads, one write; XLA writes a fresh buffer, so there is no write-allocate read)."""
  b = jnp.ones((n,), jnp.float32)
  c = jnp.full((n,), 2.0, jnp.float32)
  f = jax.jit(lambda b, c: b + 3.0 * c)
  jax.block_until_ready(f(b, c))
  return Probe(lambda: f(b, c), {"kind": "stream", "bytes": 12.0 * n})


def collective_worker(sizes: tuple[int, ...], repeats: int) -> dict:
  """Runs in each process (one device each): median seconds of a float32 psum
  per message size, every process on the same schedule so the collectives pair."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()), ("x",))
  out = {}
  for n_el in sizes:
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")),
                                               np.ones((1, n_el), np.float32))
    f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "x"), mesh=mesh, in_specs=P("x"),
                              out_specs=P()))
    jax.block_until_ready(f(x))
    out[n_el * 4] = median_time(lambda: f(x), repeats)
  return out


def collective(num_processes: int = 2, sizes: tuple[int, ...] = AR_SIZES, repeats: int = 9,
               pin: bool = True) -> dict:
  """Loopback all-reduce across ``num_processes`` gloo processes (pinned one per
  core when the machine has that many), fitted to the ring model
  t = 2(N-1) alpha + 2(N-1)/N M / beta (``spd_jax.latency_model.fit_alpha_beta``)."""
  from core import multiprocess
  from spd_jax import latency_model
  cores = sorted(os.sched_getaffinity(0))
  cpus = [{c} for c in cores[:num_processes]] if pin and len(cores) >= num_processes else None
  res = multiprocess.launch("bench.roofline:collective_worker", num_processes, local_devices=1,
                            args={"sizes": tuple(sizes), "repeats": repeats}, timeout=300,
                            cpus=cpus)
  secs = {m: max(r[m] for r in res) for m in res[0]}   # a step ends with the slowest process
  alpha, beta = latency_model.fit_alpha_beta(list(secs), list(secs.values()), num_processes)
  return {"processes": num_processes, "pinned": cpus is not None,
          "seconds_by_bytes": {int(k): v for k, v in secs.items()},
          "alpha_s": alpha, "beta_bytes_per_s": beta}


def linear_ops_alone(fn: Callable, *args, repeats: int = 7) -> dict:
  """The seconds one call of ``fn(*args)``'s matmuls and convolutions take on
  their own: each distinct one (primitive, operand shapes and dtypes, params)
  compiled alone on random operands, timed (median of ``repeats``) and counted
  as often as the call runs it (``core.jaxpr_ops.linear_eqns``). This is the path's own
  ceiling: its FLOPs over these seconds is the rate it would reach if every
  other op were free, at its shapes rather than the square probes' (a call's
  dispatch, a few microseconds, is included in each op's time)."""
  from core import jaxpr_ops
  groups: dict = {}
  for eqn, t, _ in jaxpr_ops.linear_eqns(jaxpr_ops.jaxpr_of(fn, *args)):
    key = (eqn.primitive.name, tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars),
           repr(sorted(eqn.params.items())))
    if key in groups:
      groups[key][1] += t
    else:
      groups[key] = [eqn, t]
  rng = np.random.default_rng(0)
  seconds = total_flops = 0.0
  rows = []
  for eqn, t in groups.values():
    ops = [jnp.asarray(rng.standard_normal(v.aval.shape), v.aval.dtype) for v in eqn.invars]
    f = jax.jit(lambda *a, eqn=eqn: eqn.primitive.bind(*a, **eqn.params))
    jax.block_until_ready(f(*ops))
    each = median_time(lambda: f(*ops), repeats)
    rows.append({"primitive": eqn.primitive.name, "count": t, "seconds_each": each})
    seconds += t * each
    total_flops += t * jaxpr_ops.op_flops(eqn)
  return {"seconds": seconds, "flops": total_flops, "distinct_ops": len(groups), "ops": rows}
