"""Functions run inside multi-process workers (see core.multiprocess.launch)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def psum_rows(values: np.ndarray) -> dict:
  """Each device holds one row of ``values``; returns the psum over all
  devices of all processes, as seen by this process."""
  mesh = Mesh(np.array(jax.devices()), ("x",))
  n_local = jax.local_device_count()
  start = jax.process_index() * n_local
  local = values[start:start + n_local]
  arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local)
  summed = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "x"), mesh=mesh,
                                 in_specs=P("x"), out_specs=P()))(arr)
  return {"process_index": jax.process_index(), "device_count": jax.device_count(),
          "sum": np.asarray(summed.addressable_data(0))}


def fail_on(process: int, values: np.ndarray) -> dict:
  """Process ``process`` raises; the others block in a collective waiting for it."""
  if jax.process_index() == process:
    raise ValueError(f"deliberate failure in process {process}")
  return psum_rows(values)


def hang(seconds: float) -> None:
  """Never returns within a test's patience (a stuck worker)."""
  import time
  time.sleep(seconds)


def tp_logits(params: dict, tokens: np.ndarray, cfg_kwargs: dict, drop: tuple,
              decode_from: int) -> dict:
  """TP over every device of every process: prefill logits, and logits from
  prefill of ``tokens[:, :decode_from]`` followed by cached decode steps."""
  from core.models import lm
  from spd_jax import sharding, tp
  cfg = lm.LMConfig(**cfg_kwargs)
  mesh = sharding.make_mesh(jax.device_count())
  sp = tp.prepare_params(params, cfg, mesh)
  plan = tp.SyncPlan(tuple(drop))
  prefill = tp.make_forward(cfg, mesh, plan)(sp, sharding.replicate(tokens, mesh))
  step = tp.make_forward(cfg, mesh, plan, with_cache=True)
  cache = tp.init_cache(cfg, mesh, tokens.shape[0])
  outs = []
  for start, end in [(0, decode_from)] + [(i, i + 1) for i in range(decode_from, tokens.shape[1])]:
    logits, cache = step(sp, sharding.replicate(tokens[:, start:end], mesh), cache,
                         sharding.replicate(np.int32(start), mesh))
    outs.append(np.asarray(logits.addressable_data(0)))
  return {"prefill": np.asarray(prefill.addressable_data(0)),
          "decode": np.concatenate(outs, axis=1), "devices": jax.device_count()}


def affinity() -> dict:
  """The cores this worker may run on."""
  import os
  return {"process_index": jax.process_index(), "cpus": sorted(os.sched_getaffinity(0))}
