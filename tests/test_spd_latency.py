"""Latency model against hand-derived values; the loopback benchmark's plumbing
on a tiny model (its timings are a benchmark's business, not a test's)."""

import numpy as np
import pytest

from core.models import lm
from spd_jax import latency_bench, latency_model as lmod


def test_ring_allreduce_formula_by_hand():
  # 2(N-1) alpha + 2(N-1)/N M / beta with N=4, alpha=1us, M=1MB, beta=1GB/s
  assert lmod.allreduce_time(1e6, 4, 1e-6, 1e9) == pytest.approx(6e-6 + 1.5e-3)
  assert lmod.allreduce_time(1e6, 1, 1e-6, 1e9) == 0.0


def test_llama2_block_parameter_counts_match_published_sizes():
  total = lambda m: m.n_layers * m.block_params + 2 * m.vocab * m.d_model
  assert lmod.LLAMA2["7b"].block_params == 202_375_168
  assert total(lmod.LLAMA2["7b"]) / 1e9 == pytest.approx(6.74, abs=0.01)
  assert total(lmod.LLAMA2["70b"]) / 1e9 == pytest.approx(68.98, abs=0.01)


def test_alpha_beta_fit_recovers_known_constants():
  sizes = np.array([1e3, 1e4, 1e5, 1e6, 4e6])
  t = [lmod.allreduce_time(s, 4, 50e-6, 2e8) for s in sizes]
  alpha, beta = lmod.fit_alpha_beta(sizes, t, 4)
  assert alpha == pytest.approx(50e-6, rel=1e-6) and beta == pytest.approx(2e8, rel=1e-6)


def test_spd_saves_exactly_the_dropped_allreduces():
  m, hw = lmod.LLAMA2["70b"], lmod.PRESETS["a100-nvlink"]
  base = lmod.forward_latency(m, hw, 8)
  spd = lmod.forward_latency(m, hw, 8, n_dropped=73)
  assert base["all_reduces"] == 160 and spd["all_reduces"] == 87
  assert base["total"] - spd["total"] == pytest.approx(73 * base["allreduce"])
  assert lmod.spd_reduction(m, hw, 8, 0) == 0.0
  assert lmod.spd_reduction(m, lmod.PRESETS["a100-pcie"], 8, 73) > lmod.spd_reduction(m, hw, 8, 73)


def test_recursive_doubling_all_reduce_by_hand():
  # 8 devices: 3 rounds of (alpha + M / beta); a ring takes 14 alpha steps + 1.75 M / beta.
  assert lmod.allreduce_time(16e3, 8, 3e-6, 300e9, "recursive_doubling") == pytest.approx(
      3 * (3e-6 + 16e3 / 300e9))
  assert lmod.allreduce_time(16e3, 8, 3e-6, 300e9) == pytest.approx(14 * 3e-6 + 1.75 * 16e3 / 300e9)
  assert lmod.allreduce_time(1e3, 5, 1.0, 1e3, "recursive_doubling") == pytest.approx(3 * 2.0)
  with pytest.raises(ValueError, match="unknown all-reduce algorithm"):
    lmod.allreduce_time(1e3, 8, 1e-6, 1e9, "tree")


@pytest.mark.multiprocess
def test_loopback_benchmark_runs_and_counts_all_reduces():
  bench = latency_bench.BenchConfig(
      lm.LMConfig(d_model=32, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16),
      batch=1, prompt_len=4, decode_steps=2, repeats=1, fractions=(0.0, 1.0), ar_sizes=(16, 64),
      codecs=("int8",), ladder=True)
  res = latency_bench.run(bench, 2, timeout=180)
  rows = res["rows"]
  # The ladder sends what the standard model sends (same syncs, rewired); half dropped: 3 of 4.
  assert rows["ladder, 0% dropped"]["sent_bytes"] == rows["0%"]["sent_bytes"]
  assert rows["ladder, 50% dropped"]["sent_bytes"] == 0.75 * rows["0%"]["sent_bytes"]
  rows = {k: r for k, r in rows.items() if not k.startswith("ladder")}
  two, one = rows["int8 syncs, two-shot"], rows["int8 syncs, one-shot"]
  assert {k: r["all_reduces"] for k, r in rows.items()} == {  # 2L - dropped; int8: none
      "0%": 4, "100%": 2, "int8 syncs, two-shot": 0, "int8 syncs, one-shot": 0, "no-sync": 0}
  assert (two["collectives"], one["collectives"]) == (8, 4)  # per sync: a2a + gather / gather
  # By hand, per device and prefill (1 x 4 tokens x 32 features, N = 2): a plain sync's
  # ring sends 2 (N-1)/N of 512 float32 bytes; an int8 sync returns 128 int8 values + 2 chunk
  # scales per token (32 bytes, packed in the same buffer) from its all-to-all and again
  # from its all-gather, sending half of each; one-shot gathers both devices' 160 bytes.
  assert rows["0%"]["sent_bytes"] == 4 * (4 * 32 * 4)
  assert two["sent_bytes"] == one["sent_bytes"] == 4 * 2 * (4 * 32 + 4 * 2 * 4) / 2
  assert all(0 < r["decode_s"] < 10 and 0 < r["prefill_s"] < 10 for r in rows.values())
  assert sorted(res["allreduce_seconds"]) == [64, 256]
