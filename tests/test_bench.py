"""The roofline bench: the jaxpr FLOP counter against hand counts, the
interleaved study's rendered tables against its records, and the loopback
collective's ring fit."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import flops, roofline, study
from core.models import lm
from spd_jax import latency_model


def test_flop_counter_matches_hand_counts():
  assert flops.flops(jnp.matmul, jnp.ones((3, 4)), jnp.ones((4, 5))) == 2 * 3 * 4 * 5
  # A conv: per output element, window x input features per group multiply-adds.
  x, w = jnp.ones((2, 8, 8, 6)), jnp.ones((3, 3, 3, 10))   # 2 groups of 3 input features
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
  assert flops.flops(conv, x, w) == 2 * (2 * 8 * 8 * 10) * (3 * 3 * 3)
  # A scan counts its body `length` times; a while loop is refused, not guessed.
  body = lambda c, _: (c @ c, None)
  assert flops.flops(lambda a: jax.lax.scan(body, a, length=7)[0], jnp.ones((4, 4))) == 7 * 128
  with pytest.raises(ValueError, match="while loop"):
    flops.flops(lambda a: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ c, a),
                jnp.ones((4, 4)))
  # Dead code is not counted (a custom VJP computes cotangents nobody reads).
  assert flops.flops(lambda a: (a @ a, jnp.sum(a))[1], jnp.ones((4, 4))) == 0
  # Reverse mode: the input gradient of a @ b is one more product of the same size.
  assert flops.flops(jax.grad(lambda a, b: jnp.sum(jnp.tanh(a @ b))), jnp.ones((3, 4)),
                     jnp.ones((4, 5))) == 2 * 120


def test_linear_ops_alone_groups_repeats_and_times_each_once():
  # a scan of 5 identical matmuls, one differently shaped one, one conv: 3 distinct ops
  body = lambda c, _: (jnp.tanh(c @ c), None)
  conv = lambda x: jax.lax.conv_general_dilated(x, jnp.ones((3, 3, 2, 4)), (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  fn = lambda a, b, x: (jax.lax.scan(body, a, length=5)[0], a @ b, conv(x))
  args = (jnp.ones((64, 64)), jnp.ones((64, 8)), jnp.ones((1, 16, 16, 2)))
  got = roofline.linear_ops_alone(fn, *args, repeats=3)
  assert got["distinct_ops"] == 3
  assert got["flops"] == flops.flops(fn, *args) == 5 * 2 * 64 ** 3 + 2 * 64 * 64 * 8 + \
      2 * 16 * 16 * 4 * 3 * 3 * 2
  # the scan's matmul is timed once and counted five times (a timing comparison
  # with a lone matmul was flaky under a parallel suite: microseconds apart)
  assert sorted(r["count"] for r in got["ops"]) == [1, 1, 5]
  assert got["seconds"] == pytest.approx(sum(r["count"] * r["seconds_each"] for r in got["ops"]))


def test_lm_forward_flops_match_the_config_formula():
  cfg = lm.LMConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=24,
                    max_seq_len=12)
  b, l, d, f, dkv = 2, 12, 16, 24, 2 * 4
  per_token = cfg.n_layers * (2 * d * d + 2 * d * dkv + 3 * d * f) + d * cfg.vocab_size
  attention = cfg.n_layers * 2 * b * l * l * d           # Q.K^T and P.V, the full square
  hand = 2 * b * l * per_token + 2 * attention
  got = flops.flops(functools.partial(lm.apply, cfg=cfg), lm.init(jax.random.key(0), cfg),
                    jnp.zeros((b, l), jnp.int32))
  assert got == hand


def test_study_renders_the_records_it_measured():
  rec = study.run(("omp",), rounds=2, matmul_sizes=(128,), bf16=False, collective=False,
                  stream_floats=1 << 20)
  md = study.render(rec)
  (omp,) = rec["paths"]
  row = next(line for line in md.splitlines() if line.startswith("| batched OMP"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert float(cells[2].split()[0]) == pytest.approx(omp["seconds"], abs=1e-4)
  assert float(cells[4].split()[0]) == pytest.approx(omp["rate"] / 1e9, abs=0.01)
  assert float(cells[6].rstrip("%")) == pytest.approx(100 * omp["fraction"], abs=0.1)
  # The fraction is the path's counted FLOPs per second over the measured peak.
  assert omp["fraction"] == pytest.approx(omp["flops"] / omp["seconds"] / rec["peak_flops"])
  # its matmuls alone: the ceiling's cells are the record's, and a fraction of the same peak
  assert cells[7].startswith(f"{omp['ceiling_s']:.4f} s = {100 * omp['ceiling_fraction']:.1f}%")
  assert cells[8] == f"{100 * omp['of_ceiling']:.0f}%"
  assert omp["of_ceiling"] == pytest.approx(omp["ceiling_s"] / omp["seconds"])
  peak = float(re.search(r"Peak float32 matmul: \*\*([\d.]+) GFLOP/s", md).group(1))
  assert peak == pytest.approx(rec["peak_flops"] / 1e9, abs=0.1)
  assert rec["peak_flops"] == max(p["rate"] for p in rec["probes"] if p["kind"] == "matmul")
  with pytest.raises(ValueError, match="unknown hot paths"):
    study.run(("nope",), collective=False)


def test_loopback_collective_fits_a_positive_ring_model():
  # The fitted numbers depend on the machine's load; what must hold is the sweep's shape,
  # the fit of exactly these timings, and a 32 MiB all-reduce taking longer than a 1 KiB one
  # (a 4 MiB one once did not, 11.5 vs 11.7 ms, with the other test worker on both cores).
  c = roofline.collective(2, sizes=(256, 16384, 8388608), repeats=5)
  assert sorted(c["seconds_by_bytes"]) == [1024, 65536, 33554432]
  secs = c["seconds_by_bytes"]
  assert secs[33554432] > secs[1024] > 0
  alpha, beta = latency_model.fit_alpha_beta(list(secs), list(secs.values()), 2)
  assert (c["alpha_s"], c["beta_bytes_per_s"]) == (alpha, beta) and beta > 0
