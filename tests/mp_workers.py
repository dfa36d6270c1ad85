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
