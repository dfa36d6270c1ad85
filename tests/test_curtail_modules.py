"""The MRR defender as one JAX function: OMP denoising with the predicted
class's dictionary and the label-free residual module equal scikit-learn's
OMP patch by patch (with NumPy reassembly); the fused scores equal the module
objects' own; the batch sharded over 1, 2 and 4 devices and over two real
processes equals the modules run one after another; repeated modules (a
randomised pool) get distinct names."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.linear_model import orthogonal_mp

from core import buckets, multiprocess
from core.models import mlp
from secure import sparse
from secure.classifier import from_core
from secure.cleann import analyzers
from secure.curtail import input_defender, latent, modules, parallel, residual

CFG = mlp.MLPConfig(input_shape=(8, 8, 1), hidden=(16, 12), num_classes=3)
CLF = from_core("mlp", CFG)
PATCH = analyzers.PatchConfig(size=4, stride=2)
RES = residual.ResidualConfig(patch=analyzers.PatchConfig(size=4, stride=2),
                              dictionary=sparse.DictConfig(n_atoms=10, n_nonzero=2, iters=3),
                              images=200)


def _setup():
  rng = np.random.default_rng(0)
  centres = rng.random((3, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, 240)
  x = np.clip(centres[y] + 0.1 * rng.standard_normal((240, 8, 8, 1)), 0, 1).astype(np.float32)
  params = mlp.init(jax.random.key(0), CFG)
  lats = [latent.fit(CLF, params, x, y, latent.LatentConfig(layer=l, steps=20))
          for l in (-2, -1)]
  inp = input_defender.fit(x, y, 3, input_defender.InputDefenderConfig(
      patch=PATCH, dictionary=sparse.DictConfig(n_atoms=12, n_nonzero=3, iters=3),
      images_per_class=40))
  res = residual.fit(x, RES)
  spec = modules.spec_of(CLF, lats, [inp], RES, 1)
  return spec, modules.arrays(params, lats, [inp], [res]), lats, inp, params, x, y


SETUP = None


def setup():
  global SETUP
  if SETUP is None:
    SETUP = _setup()
  return SETUP


def _assemble_numpy(p, h, w, size, stride):
  out, cnt = np.zeros((h, w)), np.zeros((h, w))
  starts = analyzers._starts
  k = 0
  for r in starts(h, size, stride):
    for c in starts(w, size, stride):
      out[r:r + size, c:c + size] += p[k].reshape(size, size)
      cnt[r:r + size, c:c + size] += 1
      k += 1
  return out / cnt


def test_denoise_is_sklearn_omp_in_the_labels_dictionary():
  rng = np.random.default_rng(1)
  d = rng.standard_normal((3, 10, 16)).astype(np.float32)
  d /= np.linalg.norm(d, axis=2, keepdims=True)
  x = rng.random((5, 8, 8, 1)).astype(np.float32)
  labels = np.array([0, 2, 1, 2, 0])
  ours = np.asarray(modules.denoise(jnp.asarray(d), jnp.asarray(x), jnp.asarray(labels), PATCH, 3))
  p = np.asarray(analyzers.patches(x, PATCH))
  for i, c in enumerate(labels):
    codes = orthogonal_mp(d[c].T.astype(np.float64), p[i].T.astype(np.float64),
                          n_nonzero_coefs=3).T
    ref = np.clip(_assemble_numpy(codes @ d[c], 8, 8, 4, 2), 0, 1)
    np.testing.assert_allclose(ours[i, ..., 0], ref, atol=2e-4)


def test_residual_module_is_sklearn_omp_with_numpy_reassembly():
  rng = np.random.default_rng(4)
  d = rng.standard_normal((10, 16)).astype(np.float32)
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  scale = (0.05 + rng.random((8, 8, 1))).astype(np.float32)
  x = rng.random((4, 8, 8, 1)).astype(np.float32)
  cfg = residual.ResidualConfig(patch=PATCH, dictionary=sparse.DictConfig(n_atoms=10,
                                                                          n_nonzero=3))
  spec = modules.Spec(CLF, (), PATCH, 3, 0, cfg, 1)
  ours = np.asarray(modules.residual_scores(spec, {"dict": jnp.asarray(d),
                                                    "scale": jnp.asarray(scale)}, jnp.asarray(x)))
  p = np.asarray(analyzers.patches(x, PATCH))
  for i in range(len(x)):
    codes = orthogonal_mp(d.T.astype(np.float64), p[i].T.astype(np.float64),
                          n_nonzero_coefs=3).T
    r = x[i, ..., 0] - np.clip(_assemble_numpy(codes @ d, 8, 8, 4, 2), 0, 1)
    assert ours[i] == pytest.approx([np.mean(np.abs(r) / scale[..., 0]), np.mean(r ** 2)],
                                    rel=1e-3)


def test_fused_scores_equal_the_module_objects():
  spec, arr, lats, inp, params, x, _ = setup()
  xs = x[:30]
  logits = jax.jit(lambda a: mlp.apply(params, a, CFG))
  pred = np.asarray(logits(xs).argmax(-1))
  ref = np.stack([lats[0].score(xs, pred), lats[1].score(xs, pred),
                  inp.score(xs, pred, logits)], 1)
  ours = np.asarray(modules.scores(spec, arr, jnp.asarray(xs)))
  for i in range(3):
    np.testing.assert_allclose(ours[:, i], ref[:, i], rtol=2e-3,
                               atol=2e-3 * np.abs(ref[:, i]).max())
  res = arr["residual"][0]
  np.testing.assert_allclose(ours[:, 3:], np.asarray(residual.scores(
      res, jnp.asarray(xs), RES.patch, RES.dictionary.n_nonzero)), rtol=1e-5)
  assert spec.names == ("latent-2", "latent-1", "input", "residual", "energy")
  assert modules.Spec(CLF, (-1, -1), PATCH, 3, 2).names == ("latent-1", "latent-1.1", "input",
                                                          "input.1")


@pytest.mark.parametrize("k", [1, 2, 4])
def test_sharded_scores_equal_the_modules_in_turn(k):
  spec, arr, *_, x, _ = setup()
  xs = x[:13]    # not a multiple of 2 or 4: the padding is dropped
  mesh = Mesh(np.array(jax.devices()[:k]), ("dp",))
  np.testing.assert_allclose(np.asarray(parallel.sharded_scores(spec, arr, xs, mesh)),
                             np.asarray(modules.scores_in_turn(spec, arr, xs)),
                             rtol=1e-5, atol=1e-4)


def test_two_processes_equal_the_modules_in_turn_and_are_pinned():
  spec, arr, *_, x, _ = setup()
  xs = x[:16]
  host = jax.tree.map(np.asarray, arr)
  out = multiprocess.launch("secure.curtail.parallel:bench_worker", 2, timeout=240,
                            args={"spec": spec, "arr": host, "x": xs, "reps": 1,
                                  "kind": "sharded"}, cpus=[{0}, {0}])
  ref = np.asarray(modules.scores_in_turn(spec, arr, xs))
  for o in out:
    assert o["cpus"] == [0]
    np.testing.assert_allclose(o["sharded_2"]["scores"], ref, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="cpus must give each"):
    multiprocess.launch("tests.mp_workers:affinity", 2, cpus=[{0}])


def test_batched_pads_pieces_to_few_shapes_and_returns_the_rows_in_order():
  seen = set()

  def fn(xb):
    seen.add(xb.shape[0])
    return xb.reshape(len(xb), -1).sum(1) * 2.0
  x = np.random.default_rng(0).random((1234, 3, 2, 1)).astype(np.float32)
  for n in (1, 17, 100, 499, 500, 1234):
    np.testing.assert_allclose(modules.batched(fn, x[:n]), 2 * x[:n].reshape(n, -1).sum(1),
                               rtol=1e-6)
  assert seen == {16, 32, 128, 500, 256}     # 1 and 17 -> 16, 32; 499 and 500 -> 500; 234 -> 256
  assert [buckets.bucket(n, 500) for n in (0, 1, 16, 17, 300, 700)] == [16, 16, 16, 32, 500, 500]
  assert buckets.bucket(700) == 1024 and buckets.pad_rows(np.ones((3, 2)), 5).sum() == 6
