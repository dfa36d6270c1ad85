"""The fake-device harness: 8 CPU devices in one process, shard_map collectives
checked against NumPy, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def test_eight_fake_devices_are_available():
  assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_row_parallel_matmul_with_psum_equals_dense(n):
  mesh = Mesh(np.array(jax.devices()[:n]), ("tp",))
  rng = np.random.default_rng(n)
  x = rng.normal(size=(3, 16)).astype(np.float32)
  w = rng.normal(size=(16, 5)).astype(np.float32)

  def row_parallel(x_local, w_local):
    return jax.lax.psum(x_local @ w_local, "tp")

  f = jax.jit(jax.shard_map(row_parallel, mesh=mesh, in_specs=(P(None, "tp"), P("tp", None)),
                            out_specs=P()))
  xs = jax.device_put(x, NamedSharding(mesh, P(None, "tp")))
  ws = jax.device_put(w, NamedSharding(mesh, P("tp", None)))
  np.testing.assert_allclose(f(xs, ws), x @ w, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda w_: jnp.sum(f(xs, w_) ** 2))(ws)
  np.testing.assert_allclose(g, x.T @ (2 * (x @ w)), rtol=1e-4, atol=1e-4)
