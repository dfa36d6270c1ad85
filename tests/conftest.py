"""Test-wide set-up, before any JAX computation:

* 8 fake CPU devices, so single-process sharding tests can build meshes of 1-8.
* The non-partitionable threefry PRNG: on this 2-core CPU it compiles ~4x
  faster per new shape (0.3 s vs 1.2 s), which dominates small-model tests.
  No test depends on particular random values.
* XLA:CPU's LLVM backend at optimisation level 0: compilation is most of this
  suite's time (817 of 1,540 s of in-process test time at the default level,
  measured with jax.monitoring's compile events), and level 0 halves it while
  the tests' small computations run about as fast. The whole suite took 13 min 20 s
  at the default and 9 min 11 s at level 0 (same machine, same day, 2 workers).
  Set here, before JAX starts its backend, so notebook kernels and worker
  processes launched by tests inherit it; a user's own XLA_FLAGS are kept.
"""

import atexit
import os
import shutil
import tempfile

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

# One persistent compilation cache for the session, empty at its start (as on a fresh
# clone): set by the controlling process before it starts the xdist workers, so
# workers, notebook kernels and test subprocesses reuse what another compiled
# (suite 8 min 35 s vs 9 min 11 s without, runs an hour apart). Removed at the end.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", False)

