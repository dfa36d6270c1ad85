"""Sparse coding (secure/sparse.py) against scikit-learn: OMP supports and
coefficients on the same dictionary, exact recovery of sparse signals, and a
learned dictionary's reconstruction error next to MiniBatchDictionaryLearning's."""

import numpy as np
import pytest
from sklearn.decomposition import MiniBatchDictionaryLearning
from sklearn.linear_model import orthogonal_mp_gram

from secure import sparse


def _unit_rows(a):
  return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _sklearn_omp(x, d, **kw):
  return orthogonal_mp_gram((d @ d.T).astype(np.float64), (x @ d.T).T.astype(np.float64),
                            **kw).T


@pytest.mark.parametrize("n_nonzero", [1, 5, 20])   # 20: past the unrolled solves
def test_omp_equals_sklearn_at_fixed_sparsity(n_nonzero):
  rng = np.random.default_rng(0)
  d = _unit_rows(rng.standard_normal((64, 32)))
  x = rng.standard_normal((300, 32)).astype(np.float32)
  got, want = np.asarray(sparse.omp(x, d, n_nonzero)), _sklearn_omp(x, d, n_nonzero_coefs=n_nonzero)
  np.testing.assert_array_equal(got != 0, want != 0)   # same supports
  np.testing.assert_allclose(got, want, atol=2e-5)     # same coefficients


def test_omp_equals_sklearn_with_a_residual_tolerance():
  rng = np.random.default_rng(1)
  d = _unit_rows(rng.standard_normal((48, 24)))
  x = rng.standard_normal((200, 24)).astype(np.float32)
  got = np.asarray(sparse.omp(x, d, 24, tol=4.0))
  want = _sklearn_omp(x, d, tol=4.0, norms_squared=(x.astype(np.float64) ** 2).sum(1))
  np.testing.assert_array_equal(got != 0, want != 0)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert len(set((got != 0).sum(1))) > 1  # the tolerance, not a fixed count, stopped them


@pytest.mark.parametrize("k, f", [(32, 32), (128, 256)])
def test_s_sparse_signals_are_recovered_exactly(k, f):
  # (32, 32): an orthonormal dictionary, where OMP provably recovers any sparse code;
  # (128, 256): an overcomplete-in-atoms but incoherent random one.
  rng = np.random.default_rng(2)
  d = np.linalg.qr(rng.standard_normal((f, f)))[0][:k].astype(np.float32) if k == f else \
      _unit_rows(rng.standard_normal((k, f)))
  true = np.zeros((50, k), np.float32)
  for i in range(50):
    s = rng.choice(k, 4, replace=False)
    true[i, s] = rng.uniform(1, 2, 4) * rng.choice([-1, 1], 4)
  got = np.asarray(sparse.omp(true @ d, d, 4))
  np.testing.assert_allclose(got, true, atol=1e-4)
  np.testing.assert_allclose(sparse.reconstruction_error(true @ d, d, got), 0, atol=1e-8)


def test_learned_dictionary_reconstructs_like_sklearns():
  rng = np.random.default_rng(3)
  basis = _unit_rows(rng.standard_normal((40, 16)))
  codes = np.where(rng.random((1500, 40)) < 3 / 40, rng.standard_normal((1500, 40)), 0)
  x = (codes @ basis + 0.01 * rng.standard_normal((1500, 16))).astype(np.float32)
  train, test = x[:1000], x[1000:]
  d, errs = sparse.learn_dictionary(train, sparse.DictConfig(n_atoms=40, n_nonzero=3, iters=15))
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
  assert errs[-1] < 0.5 * errs[0]
  d2, errs2 = sparse.learn_dictionary(train, sparse.DictConfig(n_atoms=40, n_nonzero=3, iters=15))
  np.testing.assert_array_equal(d, d2)  # deterministic under the seed
  sk = MiniBatchDictionaryLearning(n_components=40, transform_algorithm="omp",
                                   transform_n_nonzero_coefs=3, random_state=0,
                                   max_iter=50).fit(train)
  ours = float(np.mean(sparse.reconstruction_error(test, d, sparse.omp(test, d, 3))))
  theirs = float(np.mean(sparse.reconstruction_error(test, sk.components_.astype(np.float32),
                                                     sparse.omp(test, _unit_rows(sk.components_), 3))))
  assert ours < 1.5 * theirs, (ours, theirs)


def test_bad_inputs_raise_clear_errors():
  d = _unit_rows(np.random.default_rng(0).standard_normal((8, 4)))
  x = np.ones((3, 4), np.float32)
  with pytest.raises(ValueError, match=r"n_nonzero=5 must lie in \[1, 4\]"):
    sparse.omp(x, d, 5)
  with pytest.raises(ValueError, match=r"signals must be \(N, 4\)"):
    sparse.omp(np.ones((3, 5)), d, 2)
  with pytest.raises(ValueError, match="NaN or inf"):
    sparse.omp(np.full((3, 4), np.nan), d, 2)
  with pytest.raises(ValueError, match="non-empty"):
    sparse.learn_dictionary(np.zeros((0, 4)), sparse.DictConfig(n_atoms=2, n_nonzero=1))
  with pytest.raises(ValueError, match="at least as many training signals"):
    sparse.learn_dictionary(x, sparse.DictConfig(n_atoms=8, n_nonzero=1))
