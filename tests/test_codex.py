"""CodeX: the encoded datapath against the centroid-substituted network, 8-bit
accuracy against float (in the tiny study), the searches on a constructed problem with a known
optimum, the FPGA model against a hand count and against FINN, the compiler's
JSON round trip, AQT's quantization against a NumPy reference, clear errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from accel import rapidnn
from accel.codex import encoding, finn, fpga, search, uniform
from accel.codex.encoding import BitConfig
from accel.program import program
from core.models import cnn, mlp
from core.sourced import Const

MLP = mlp.MLPConfig(input_shape=(6, 6, 1), hidden=(12, 8), num_classes=3)
CNN = cnn.CNNConfig(input_shape=(8, 8, 1), channels=(4, 6), hidden=(10,), num_classes=3)


def _bank(model, cfg, seed=0):
  params = (mlp if model == "mlp" else cnn).init(jax.random.key(seed), cfg)
  ops = program(model, cfg)
  x = np.random.default_rng(seed).uniform(0, 1, (64, *cfg.input_shape)).astype(np.float32)
  acts = rapidnn.layer_activations(params, ops, x)
  return params, ops, x, encoding.CodebookBank(params, ops, acts, seed=seed)


@pytest.mark.parametrize("model, cfg, bits", [
    ("mlp", MLP, BitConfig((3, 1, 8), (2, 5, 4))),
    ("mlp", MLP, BitConfig((2, 4, 6), (None, None, None))),      # weight-only
    ("cnn", CNN, BitConfig((4, 2, 5, 3), (3, 6, 2, 8))),
    ("cnn", CNN, BitConfig((4, 2, 5, 3), (3, None, 2, None))),   # mixed
])
def test_encoded_datapath_equals_centroid_substituted_network(model, cfg, bits):
  params, ops, x, bank = _bank(model, cfg)
  cb = bank.codebook(bits)
  emu = encoding.emulate(cb, x, ops)
  ref = rapidnn.float_forward(cb, ops, jnp.asarray(x))   # snaps floats, pools floats
  np.testing.assert_allclose(emu, ref, atol=1e-5, rtol=1e-5)
  # The codebooks have the widths asked for (duplicates allowed when a layer is tiny).
  for name, wb, ab in zip(bank.layers, bits.weights, bits.acts):
    assert cb[name]["w_c"].shape[0] == min(2 ** wb, params[name]["kernel"].size)
    assert cb[name]["w_idx"].max() < 2 ** wb
    assert ("in_c" in cb[name]) == (ab is not None)
    if ab is not None:
      assert cb[name]["in_c"].shape == (2 ** ab,)
      assert np.all(np.diff(np.asarray(cb[name]["in_c"])) >= 0)
  # And the datapath is not the float network (1-bit weights change the logits).
  if bits.weights[1] == 1:
    float_logits = mlp.apply(params, jnp.asarray(x), cfg)
    assert float(jnp.max(jnp.abs(emu - float_logits))) > 1e-2


def test_total_bits_count_weights_and_input_maps():
  params = mlp.init(jax.random.key(0), MLP)
  shapes = encoding.layer_shapes(program("mlp", MLP), MLP.input_shape, params)
  assert [(s.weights, s.inputs) for s in shapes] == [(36 * 12, 36), (12 * 8, 12), (8 * 3, 8)]
  t = encoding.total_bits(shapes, BitConfig((3, 1, 8), (2, None, 4)))
  assert t["weight_bits"] == 36 * 12 * 3 + 96 * 1 + 24 * 8
  assert t["act_bits"] == 36 * 2 + 12 * 16 + 8 * 4
  assert t["codebook_bits"] == 16 * (8 + 2 + 256 + 4 + 16)


# A constructed problem: accuracy 100 - sum_k s_k 2^-b_k, cost sum_k c_k b_k.
_S = np.array([40.0, 5.0, 20.0, 1.0])
_C = np.array([1.0, 4.0, 2.0, 8.0])


def _problem(budget=40.0):
  return search.Problem(4, lambda b: 100 - float(np.sum(_S * 2.0 ** -np.asarray(b))),
                        lambda b: float(np.dot(_C, b)), budget)


def test_searches_respect_the_budget_and_reinforce_finds_the_known_best():
  truth = search.brute_force(_problem())
  assert truth["cost"] <= 40.0
  found = {}
  for name, run in [("reinforce", lambda p: search.reinforce(p, 300, seed=0)),
                    ("random", lambda p: search.random_search(p, 300, seed=0)),
                    ("greedy", lambda p: search.greedy(p, 300)),
                    ("uniform", search.uniform)]:
    p = _problem()
    best = run(p)
    assert p.evaluations <= 300
    assert best is not None and best["cost"] <= 40.0, name
    assert all(t["feasible"] == (t["cost"] <= 40.0) for t in p.trace)
    found[name] = best
  assert found["reinforce"]["bits"] == truth["bits"], (found["reinforce"], truth)
  assert found["reinforce"]["acc"] >= found["random"]["acc"]
  assert found["uniform"]["bits"] == [2, 2, 2, 2]       # 15 x 2 = 30 <= 40 < 45


def test_a_budget_nothing_meets_and_bad_configurations_raise():
  with pytest.raises(ValueError, match="no configuration meets the budget"):
    _problem(budget=10.0)
  with pytest.raises(ValueError, match="1..8"):
    _problem()((0, 1, 2, 3))
  with pytest.raises(ValueError, match="1..8"):
    BitConfig((9, 2), (2, 2))
  with pytest.raises(ValueError, match="1..8"):
    BitConfig((2, 2), (2, True))
  with pytest.raises(ValueError, match="one weight and one activation"):
    BitConfig((2, 2), (2,))
  with pytest.raises(ValueError, match="unknown board 'vu9000'"):
    fpga.board("vu9000")


_TINY = fpga.Board("tiny", "test", Const(4, "BRAM36", "test"), Const(1, "DSP", "test"),
                   Const(100, "LUT", "test"), Const(100, "MHz", "test"),
                   Const(1.0, "GB/s", "test"), Const(2.0, "W", "test"))
_TWO = ((("flatten",), ("dense", "dense_0"), ("relu",), ("dense", "dense_1")),
        {"dense_0": (4, 3), "dense_1": (3, 2)})


def test_fpga_model_counts_match_a_hand_count(monkeypatch):
  monkeypatch.setitem(fpga.BOARDS, "tiny", _TINY)
  ops, kernels = _TWO
  bits = BitConfig((2, 3), (3, 4))
  d = fpga.compile_design(ops, (2, 2, 1), kernels, bits, "tiny", lut_per_bit2=2.0)
  blocks = {b.name: b for b in d.blocks}
  assert [b.kind for b in d.blocks] == ["input", "mac", "encode", "mac"]
  assert blocks["input"].comparators == 7 and blocks["dense_0_encode"].comparators == 15
  b0, b1 = blocks["dense_0"], blocks["dense_1"]
  # MACs; encoded kernel + 2^w codebook entries + biases at 16 bits; double-buffered inputs.
  assert (b0.macs, b1.macs) == (12, 6)
  assert (b0.weight_mem_bits, b1.weight_mem_bits) == (12 * 2 + 4 * 16 + 3 * 16,
                                                      6 * 3 + 8 * 16 + 2 * 16)
  assert (b0.act_buffer_bits, b1.act_buffer_bits) == (2 * 4 * 3, 2 * 3 * 4)
  # LUT lanes cost 2*a*w = 12 and 24; the one DSP goes to dense_1. II=2 needs
  # 6*12 + 2*24 = 120 > 100 LUTs; II=3: 4*12 + 1*24 = 72.
  assert d.ii_cycles == 3 and (b0.lanes, b1.lanes) == (4, 2)
  assert (b0.dsp, b1.dsp, b0.lut, b1.lut) == (0, 1, 48, 24)
  assert (b0.cycles, b1.cycles) == (3, 3) and d.bram36 == 4
  assert d.images_per_s == pytest.approx(100e6 / 3) and d.dram_bytes_per_image == 0
  assert d.energy_uj_per_image == pytest.approx(2.0 / (100e6 / 3) * 1e6)
  # One BRAM fewer: the larger kernel (dense_1, 178 bits) spills to DRAM.
  monkeypatch.setitem(fpga.BOARDS, "tiny", dataclasses.replace(_TINY,
                                                               bram36=Const(3, "BRAM36", "t")))
  s = fpga.compile_design(ops, (2, 2, 1), kernels, bits, "tiny", lut_per_bit2=2.0)
  assert [b.spilled for b in s.blocks if b.kind == "mac"] == [False, True]
  assert s.dram_bytes_per_image == pytest.approx(178 / 8)
  assert s.images_per_s == pytest.approx(min(100e6 / 3, 1e9 / (178 / 8)))


def test_compiler_report_round_trips_through_json():
  params = cnn.init(jax.random.key(0), CNN)
  d = fpga.compile_design(program("cnn", CNN), CNN.input_shape, params,
                          BitConfig((4, 2, 5, 3), (3, None, 2, 8)), "zcu102")
  back = fpga.Design.from_json(d.to_json())
  assert back == d and isinstance(back.blocks[0], fpga.Block)
  assert json.loads(d.to_json())["bits"]["acts"] == [3, None, 2, 8]


def test_fpga_model_is_calibrated_on_finn_sfc_and_checked_on_lfc():
  rows = {r["topology"]: r for r in finn.calibration()}
  assert abs(rows["SFC-max"]["ratio"] - 1) < 0.05     # the fitted point
  assert 0.5 <= rows["LFC-max"]["ratio"] <= 2.0       # the held-out check (the target)
  # The pinned constant is the fit, up to the II's integer granularity.
  k = finn.fit()
  assert fpga.LUT_PER_BIT2.value <= k <= 1.1 * fpga.LUT_PER_BIT2.value
  assert rows["SFC-max"]["lut"] <= fpga.BOARDS["zc706"].lut.value


def _np_symmetric(v, bits, axis):
  """AQT's default integer numerics in NumPy: abs-max scaled onto the edge of
  the last of 2^b - 1 zero-centred buckets (127.5 at 8 bits, 1.5 at 2), clipped
  to the last bucket's centre, rounded half to even."""
  edge = 2.0 ** (bits - 1) - 0.5
  scale = np.max(np.abs(v), axis=axis, keepdims=True) / edge
  return np.round(np.clip(v / scale, -(edge - 0.5), edge - 0.5)) * scale


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_aqt_dense_matches_a_numpy_symmetric_quantizer(bits):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(5, 7)).astype(np.float32)
  params = {"dense_0": {"kernel": rng.normal(size=(7, 3)).astype(np.float32),
                        "bias": np.zeros(3, np.float32)}}
  ops = (("flatten",), ("dense", "dense_0"))
  got = uniform.forward(params, ops, jnp.asarray(x), (bits,))
  want = _np_symmetric(x, bits, 1) @ _np_symmetric(params["dense_0"]["kernel"], bits, 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert bits == 8 or np.abs(want - x @ params["dense_0"]["kernel"]).max() > 1e-2


def test_tiny_study_records_and_the_rendered_report_agree(tmp_path):
  import re

  from accel import study as rapid_study
  from accel.codex import section, study
  from core import data
  ds = data.load("digits")
  # No equal-bits cells (each is a retraining and a QAT compile): the AQT numerics
  # have their own test and the full study renders them.
  plan = study.CodexPlan(runs=(("digits", "mlp", 120),), evaluations=8, seeds=(0, 1),
                         int_bits=(), qat=retrain_cfg(),
                         retrain=retrain_cfg(), calib_images=128, val_images=200)
  r = study.run(ds, "mlp", 120, plan, str(tmp_path / "model"), None, progress=False)
  n = len(r["layers"])
  b_star = r["budget"]["b_star"]
  # b* and every wider width are within the bound on validation; the one below is not.
  # At 8 bits per operand the codebook network is within noise of float; 1 bit is not free.
  se = rapid_study.binomial_se(r["float_test"], r["n_test"])
  assert r["float_test"] > 85
  assert abs(r["uniform"][-1]["test"] - r["float_test"]) <= 2 * se + 1e-9
  assert r["uniform"][0]["test"] < r["float_test"] - 10
  vals = [u["val"] for u in r["uniform"]]
  assert all(v >= vals[-1] - plan.bound for v in vals[b_star - 1:])
  assert b_star == 1 or vals[b_star - 2] < vals[-1] - plan.bound
  for name, runs in r["searches"].items():
    for x in runs:
      assert x["evaluations"] <= (8 if name == "uniform" else plan.evaluations)
      assert x["best"]["cost"] <= r["budget"]["bits"] + 1e-6
      assert len(x["curve"]) == x["evaluations"]
  assert len(r["chosen"]["bits"]["weights"]) == n
  assert r["fpga"]["chosen @ zc706"]["ratio"] > 1        # fewer activation bits, more lanes
  sec = section.render([r], finn.calibration(), [], plan, str(tmp_path))
  row = next(line for line in sec.body.splitlines() if line.startswith("| digits mlp | ")
             and r["chosen"]["label"] in line)
  cells = [c.strip() for c in row.strip("|").split("|")]
  saving = r["uniform"][b_star - 1]["total_bits"] / r["chosen"]["total_bits"]
  assert cells[5].endswith(f"({saving:.2f}x)")
  met = (r["chosen"]["test_after"] >= r["uniform"][-1]["test"] - plan.bound and saving >= 1.5)
  assert cells[7] == ("met" if met else "missed")
  a, b = section.wins(r)
  assert re.search(rf"digits mlp: {a}/{b} seeds", sec.body) and b == 2
  assert (tmp_path / "figures" / "codex_digits_mlp_search.png").exists()


def retrain_cfg():
  from accel.retrain import RetrainConfig
  return RetrainConfig(steps=10, batch=32, lr=1e-3)


def test_bit_strings_parse_and_bad_ones_are_rejected():
  assert BitConfig.parse("3", 2) == BitConfig((3, 3), (3, 3))
  assert BitConfig.parse("w4a2,w1a-", 2) == BitConfig((4, 1), (2, None))
  for bad, match in [("9", "1..8"), ("w4a2", "has 1 layers"), ("w4x2,w1a1", "look like"),
                     ("w0a2,w1a1", "1..8")]:
    with pytest.raises(ValueError, match=match):
      BitConfig.parse(bad, 2)
