"""core.argext's halving arg-max/arg-min equal NumPy's argmax/argmin (first
index on ties, NaN as the extreme) and the extreme value, for any axis length
(padded to a power of two) and leading shape, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import argext


@pytest.mark.parametrize("shape", [(1,), (7,), (5, 33), (3, 4, 64), (100, 3)])
@pytest.mark.parametrize("kind", ["random", "ties", "nan", "all -inf"])
def test_argmax_and_argmin_equal_numpys(shape, kind):
  rng = np.random.default_rng(len(shape) * 100 + shape[-1])
  if kind == "ties":     # few distinct values: most rows tie for the extreme
    a = rng.integers(0, 3, shape).astype(np.float32)
  else:
    a = rng.standard_normal(shape).astype(np.float32)
  if kind == "nan":
    a.ravel()[rng.integers(0, a.size, max(1, a.size // 10))] = np.nan
  if kind == "all -inf":
    a[:] = -np.inf
  i, v = jax.jit(argext.argmax)(jnp.asarray(a))
  j, w = jax.jit(argext.argmin)(jnp.asarray(a))   # jitted: eager mode compiles op by op
  np.testing.assert_array_equal(np.asarray(i), np.argmax(a, -1))
  np.testing.assert_array_equal(np.asarray(j), np.argmin(a, -1))
  np.testing.assert_array_equal(np.asarray(v), np.max(a, -1))
  np.testing.assert_array_equal(np.asarray(w), np.min(a, -1))


def test_vmapped_rows_equal_the_batched_call():
  a = jnp.asarray(np.random.default_rng(0).integers(0, 4, (50, 24)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(lambda r: argext.argmax(r)[0]))(a)),
                                np.argmax(np.asarray(a), -1))


def test_empty_axis_is_refused():
  with pytest.raises(ValueError, match="empty"):
    argext.argmax(jnp.zeros((3, 0)))
