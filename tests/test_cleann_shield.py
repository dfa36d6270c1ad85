"""CLEANN end to end on a small real victim (an MLP backdoored on mnist5k), and
its parts against independent references: STRIP's entropy and Neural
Cleanse's anomaly index by hand, ROC AUC by pairwise counting, the fixed-point
quantiser on hand-derived values, the FPGA model's MAC count by enumeration."""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from secure import detection, sparse, triggers
from secure.cleann import (fixed_point, fpga_model, neural_cleanse, shield, strip, study,
                           victims)

SMALL = shield.ShieldConfig(input_dict=sparse.DictConfig(n_atoms=64, n_nonzero=4, iters=4),
                            latent_dict=sparse.DictConfig(n_atoms=32, n_nonzero=6, iters=4))


@functools.lru_cache(maxsize=None)
def _victim():
  cfg = victims.VictimConfig(dataset="mnist5k", model="mlp", trigger="patch", steps=300,
                             defender_images=300, seed=0)
  return victims.build(cfg, progress=False)


def test_victim_holds_out_the_defender_images_and_is_backdoored():
  v = _victim()
  assert len(v.defender_x) == 300
  # The defender's images are neither test images nor among what the victim trained on.
  flat = lambda a: {a_.tobytes() for a_ in a.reshape(len(a), -1)}
  assert not flat(v.defender_x) & flat(v.ds.x_test)
  t = victims.threat(v)
  assert t["asr"] > 90 and t["c_acc"] > 85, t
  x_att, y_att = v.attack_set()
  assert (y_att != v.cfg.target).all() and len(x_att) == t["n_attack"]


def test_shield_detects_recovers_and_keeps_its_fpr():
  v = _victim()
  sh = shield.fit(v, SMALL)
  x_fit, x_val = victims.defender_split(v.defender_x, SMALL.fit_fraction)
  assert (len(x_fit), len(x_val)) == (150, 150)
  for f, thr in sh.thresholds.items():   # the requested FPR on the split that set it
    assert np.mean(sh.scores(x_val)["combined"] > thr) <= f
  # Held-out test images (shield.evaluate, run over the whole split, is checked by the
  # notebook tour): triggered ones are flagged and relabelled, clean ones mostly pass.
  x_att, y_att = v.attack_set()
  labels, flagged = sh(v.trigger(x_att[:200]), fpr=0.05)
  assert flagged.mean() > 0.95 and np.mean(labels == y_att[:200]) > 0.8
  assert np.mean(labels == v.cfg.target) < 0.05        # attack success after the shield
  clean, cflag = sh(v.ds.x_test[:300], fpr=0.05)
  assert cflag.mean() < 0.12
  victim_acc = np.mean(v.predict(v.ds.x_test[:300]) == v.ds.y_test[:300])
  assert np.mean(clean == v.ds.y_test[:300]) > victim_acc - 0.03
  # The recovery chain by hand: the patch reconstruction's label where it changed the
  # flagged label, else the envelope's, else the envelope image purified.
  x3 = v.trigger(x_att[:3])
  images = {"patch": x3, "envelope": x3[::-1].copy()}
  got = sh._route(images, {"patch": np.array([1, 0, 0]), "envelope": np.array([2, 2, 0])},
                  np.array([0, 0, 0]))
  assert got[:2].tolist() == [1, 2]
  assert got[2] == sh.model.predict(sh._purify(images["envelope"][2:]))[0]
  with pytest.raises(ValueError, match="no threshold for FPR 0.1"):
    sh(v.ds.x_test[:2], fpr=0.1)
  with pytest.raises(ValueError, match="NaN or inf"):
    sh.scores(np.full((1, 28, 28, 1), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"single-channel images"):
    sh.scores(v.ds.x_test[:2, :, :, 0])


def test_detect_and_reject_metrics_count_by_hand():
  v = _victim()
  held = study._held_out(v, study.Plan(max_test=None))
  x_att, y_att = v.attack_set()
  xt = v.trigger(x_att)
  # A detector that flags exactly the first half of every batch it sees.
  score = lambda x: (np.arange(len(x)) < len(x) // 2).astype(float)
  m = study.evaluate_detector(score, {0.01: 0.5}, v, held)["fpr0.01"]
  half = len(xt) // 2
  pred = v.predict(xt)
  assert m["tpr"] == pytest.approx(100 * half / len(xt))
  assert m["asr_after"] == pytest.approx(100 * np.mean(pred[half:] == 0) * (len(xt) - half)
                                         / len(xt))


def test_strip_score_is_minus_the_mean_entropy_of_the_blends():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((16, 3)).astype(np.float32)
  logits = lambda x: jnp.asarray(x).reshape(len(x), -1) @ w
  over, x = rng.random((5, 4, 4, 1), np.float32), rng.random((3, 4, 4, 1), np.float32)
  st = strip.Strip(logits, over, strip.StripConfig(n_overlays=5, alpha=0.3), {})
  ref = []
  for xi in x:
    b = 0.3 * xi[None] + 0.7 * over
    z = b.reshape(5, -1) @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ref.append(-np.mean(-(p * np.log(p)).sum(1)))
  np.testing.assert_allclose(st.scores(x), ref, rtol=1e-4)


def test_neural_cleanse_anomaly_index_by_hand():
  norms = [10.0, 11.0, 9.0, 12.0, 2.0]
  med = 10.0
  mad = 1.4826 * np.median(np.abs(np.array(norms) - med))   # |.| = 0, 1, 1, 2, 8 -> 1
  ai, j = neural_cleanse.anomaly_index(norms)
  assert j == 4 and ai == pytest.approx((med - 2.0) / mad)


def test_roc_auc_counts_pairs():
  b, a = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0.9, 0.35, 0.7])
  pairs = [(x > y) + 0.5 * (x == y) for x in a for y in b]
  assert detection.roc(b, a)["auc"] == pytest.approx(np.mean(pairs))


def test_quantize_rounds_and_saturates_on_the_grid():
  q = np.asarray(fixed_point.quantize(jnp.array([0.3, -0.3, 5.0, -5.0, 0.126]), 4, 1))
  # 4 bits = sign + 1 integer + 2 fraction: step 0.25, range [-2, 1.75].
  np.testing.assert_allclose(q, [0.25, -0.25, 1.75, -2.0, 0.25])
  assert fixed_point.int_bits(0.9) == 0 and fixed_point.int_bits(3.5) == 2


def test_fixed_point_datapath_converges_to_float_with_word_length():
  v = _victim()
  an = shield.fit(v, dataclasses.replace(SMALL, latent_dict=None)).input
  x = v.ds.x_test[:40]
  ranges = fixed_point.calibrate_ranges(an, v.defender_x[:100])
  err = {}
  for b in (6, 12, 24):
    fp = fixed_point.FixedPointAnalyzer(an, fixed_point.FixedPoint(b, b, b), ranges)
    err[b] = np.abs(fp.score(x) - an.score(x)).max()
  assert err[24] < 1e-2 * np.abs(an.score(x)).max() and err[6] > err[12] > err[24], err


def test_fpga_model_counts_the_omp_macs():
  f, k_atoms, s = 64, 128, 4
  ref = k_atoms * f + s * f   # correlations and reconstruction
  for i in range(1, s + 1):   # correlation update, new factor row, two coefficient solves
    ref += k_atoms * i + i * i // 2 + i * i
  assert fpga_model.omp_macs(f, k_atoms, s) == ref
  w = fpga_model.Workload(36, 8, 128, 4, 128, 128, 12)
  e = fpga_model.estimate(w, dsp=100)
  assert e["macs"] == 36 * (ref + 4 * 8 ** 3) + fpga_model.omp_macs(128, 128, 12)
  assert e["cycles"] >= e["macs"] / 100


def test_additive_trigger_clips_and_checks_shape():
  t = triggers.Additive(np.full((2, 2, 1), 0.5, np.float32))
  np.testing.assert_allclose(t(np.full((1, 2, 2, 1), 0.8, np.float32)), 1.0)
  with pytest.raises(ValueError, match="pattern of shape"):
    t(np.zeros((1, 3, 3, 1), np.float32))
