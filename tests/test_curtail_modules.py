"""The MRR defender as one JAX function: OMP denoising with the predicted
class's dictionary equals scikit-learn's OMP patch by patch; the fused scores
equal the module objects' own; the batch sharded over 1, 2 and 4 devices and
over two real processes equals the modules run one after another; the OR's
operating point is set on validation data; the adaptive attacker's output is
checked against an independent recomputation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.linear_model import orthogonal_mp

from core import multiprocess
from core.models import mlp
from secure import sparse
from secure.cleann import analyzers
from secure.curtail import adaptive, defences, input_defender, latent, modules, parallel

CFG = mlp.MLPConfig(input_shape=(8, 8, 1), hidden=(16, 12), num_classes=3)
PATCH = analyzers.PatchConfig(size=4, stride=2)


def _setup():
  rng = np.random.default_rng(0)
  centres = rng.random((3, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 3, 240)
  x = np.clip(centres[y] + 0.1 * rng.standard_normal((240, 8, 8, 1)), 0, 1).astype(np.float32)
  params = mlp.init(jax.random.key(0), CFG)
  lats = [latent.fit("mlp", CFG, params, x, y, latent.LatentConfig(layer=l, steps=20))
          for l in (0, 1)]
  inp = input_defender.fit(x, y, 3, input_defender.InputDefenderConfig(
      patch=PATCH, dictionary=sparse.DictConfig(n_atoms=12, n_nonzero=3, iters=3),
      images_per_class=40))
  spec = modules.spec_of("mlp", CFG, lats, inp)
  return spec, modules.arrays(params, lats, inp), lats, inp, params, x, y


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
  assert spec.names == ("latent0", "latent1", "input")


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


def test_or_operating_point_is_set_on_validation():
  rng = np.random.default_rng(2)
  val = rng.standard_normal((4000, 3))
  thr = defences.thresholds_at(val, 0.05)
  assert np.mean(np.any(val > thr, axis=1)) == pytest.approx(0.05, abs=0.003)
  # each module alone flags less than the OR: the per-module security is below 5%
  assert (np.mean(val > thr, axis=0) < 0.05).all()
  assert defences.thresholds_at(val[:, :1], 0.05) == pytest.approx(np.quantile(val[:, 0], 0.95),
                                                                    abs=0.01)
  with pytest.raises(ValueError, match="target FPR"):
    defences.thresholds_at(val, 1.5)


def test_adaptive_attacker_output_is_what_it_claims():
  spec, arr, lats, inp, params, x, y = setup()
  logits = jax.jit(lambda a: mlp.apply(params, a, CFG))
  keep = np.asarray(logits(x).argmax(-1)) == y
  xs, ys = x[keep][:20], y[keep][:20]
  d = defences.Defence("curtail", spec.names, defences._curtail_fn(spec), arr, has_bpda=True,
                       spec=spec)
  val = d.scores(x[100:])
  thr = defences.thresholds_at(val, 0.05)
  eps = 0.2
  xa, evaded = adaptive.attack(d, logits, thr, val.std(0), xs, ys,
                               adaptive.AdaptiveConfig(eps=eps, steps=30, step_size=0.02,
                                                       penalties=(1.0,)))
  assert np.abs(xa - xs).max() <= eps + 1e-5 and xa.min() >= 0 and xa.max() <= 1
  # recomputed independently: evaded examples fool the victim and pass every module
  fooled = np.asarray(logits(xa).argmax(-1)) != ys
  passed = np.all(d.scores(xa) <= thr + 1e-3 * np.abs(thr), axis=1)
  assert (fooled & passed)[evaded].all()
  with pytest.raises(ValueError, match="AdaptiveConfig"):
    adaptive.AdaptiveConfig(eps=-1)
