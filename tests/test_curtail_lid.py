"""LID (Ma et al. 2018): the maximum-likelihood estimator equals a hand
computation, recovers the dimension of data drawn uniformly from a known
subspace, and the traced detector (distances to the benign minibatch, top-k,
standardisation, regression) equals a NumPy re-implementation of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.models import mlp
from secure.classifier import from_core
from secure.curtail import lid


def test_estimator_by_hand():
  d = np.array([[0.5, 1.0, 2.0, 4.0, 9.0], [1.0, 1.0, 3.0, 3.0, 0.2]])
  k = 3
  ref = []
  for row in d:
    r = np.sort(row)[:k]
    ref.append(-1.0 / np.mean(np.log(r / r[-1])))
  np.testing.assert_allclose(np.asarray(lid.lid_mle(jnp.asarray(d), k)), ref, rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 5])
def test_estimator_recovers_a_known_dimension(dim):
  rng = np.random.default_rng(dim)
  basis = np.linalg.qr(rng.standard_normal((20, dim)))[0]      # a dim-dimensional subspace
  ref = rng.random((4000, dim)) @ basis.T
  q = rng.random((200, dim)) @ basis.T * 0.5 + 0.25 * basis.sum(1)   # well inside the cube
  dist = np.linalg.norm(q[:, None] - ref[None], axis=-1)
  est = np.asarray(lid.lid_mle(jnp.asarray(dist, jnp.float32), 50))
  assert np.median(est) == pytest.approx(dim, rel=0.2)


def test_traced_detector_equals_numpy():
  cfg = mlp.MLPConfig(input_shape=(4, 4, 1), hidden=(8, 6), num_classes=3)
  clf = from_core("mlp", cfg)
  params = mlp.init(jax.random.key(0), cfg)
  rng = np.random.default_rng(1)
  ref_x, x = rng.random((30, 4, 4, 1)).astype(np.float32), rng.random((7, 4, 4, 1)).astype(
      np.float32)
  acts = lambda a: [np.asarray(t) for t in lid.activations(clf, params, jnp.asarray(a))]
  p = {"victim": params, "ref": [jnp.asarray(a) for a in acts(ref_x)],
       "mu": jnp.asarray([1.0, 2.0, 3.0]), "sd": jnp.asarray([0.5, 1.0, 2.0]),
       "w": jnp.asarray([0.3, -0.2, 0.1]), "b": jnp.asarray(0.05)}
  k = 5
  feats = []
  for a, r in zip(acts(x), acts(ref_x)):       # hidden layer -2, -1, then the logits
    dist = np.sort(np.linalg.norm(a[:, None] - r[None], axis=-1), axis=1)[:, :k]
    feats.append(-1.0 / np.mean(np.log(dist / dist[:, -1:]), axis=1))
  z = (np.stack(feats, 1) - [1.0, 2.0, 3.0]) / [0.5, 1.0, 2.0]
  np.testing.assert_allclose(np.asarray(lid.score(clf, k, p, jnp.asarray(x))),
                             z @ [0.3, -0.2, 0.1] + 0.05, rtol=2e-4, atol=2e-4)
  with pytest.raises(ValueError, match="1 <= k < batch"):
    lid.LIDConfig(ks=(100,), batch=100)
