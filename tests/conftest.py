"""Test-wide set-up, before any JAX computation:

* 8 fake CPU devices, so single-process sharding tests can build meshes of 1-8.
* The non-partitionable threefry PRNG: on this 2-core CPU it compiles ~4x
  faster per new shape (0.3 s vs 1.2 s), which dominates small-model tests.
  No test depends on particular random values.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_threefry_partitionable", False)
