"""An analytical energy/latency model of one inference, from operation counts
of the emulated network. It is a model, not a measurement: every constant
carries its source, and the RAPIDNN paper's own per-block numbers are not
available offline, so the report also solves for the energy per
multiply-accumulate its claimed 68.4x over ISAAC would require.

Counts (per image): ``lookups`` (one per multiplication: a table read),
``adds`` (accumulation plus bias), ``searches`` (nearest-centroid searches:
encoding the network input and every activation output, each over ``u``
entries), ``pool_cmps`` (3 comparisons per 2x2 max-pool output), ``macs``
(the float network's multiply-accumulates, what a crossbar or GPU executes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from accel.program import Op
from core.sourced import Const


@dataclasses.dataclass(frozen=True)
class OpCounts:
  macs: int
  lookups: int
  adds: int
  searches: int
  pool_cmps: int
  layers: tuple[dict, ...]


def count_ops(ops: tuple[Op, ...], input_shape: tuple[int, ...], params: dict) -> OpCounts:
  """Walks ``ops`` with the activation shape of one image."""
  shape = tuple(input_shape)
  macs = adds = pool = 0
  searches = math.prod(shape)  # the network input is encoded once
  layers = []
  for op in ops:
    kind = op[0]
    if kind == "conv":
      kh, kw, cin, cout = params[op[1]]["kernel"].shape
      h, w, _ = shape
      n = h * w * cout * kh * kw * cin
      shape = (h, w, cout)
    elif kind == "dense":
      k, cout = params[op[1]]["kernel"].shape
      n = k * cout
      shape = (cout,)
    if kind in ("conv", "dense"):
      macs += n
      adds += n  # K-1 accumulations and one bias add per output
      layers.append({"layer": op[1], "macs": n, "outputs": math.prod(shape)})
    elif kind == "relu":
      searches += math.prod(shape)  # ReLU + encoding: one nearest search per value
    elif kind == "pool":
      shape = (shape[0] // 2, shape[1] // 2, shape[2])
      pool += 3 * math.prod(shape)
    elif kind == "flatten":
      shape = (math.prod(shape),)
  return OpCounts(macs, macs, adds, searches, pool, tuple(layers))


# Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm, 0.9 V.
HOROWITZ = {
    "add_int16_pj": Const(0.05, "pJ", "Horowitz ISSCC'14: 8-bit add 0.03 pJ, 32-bit add 0.1 pJ "
                                      "(16-bit interpolated)"),
    "sram_read_16b_pj": Const(2.5, "pJ", "Horowitz ISSCC'14: 8 KB SRAM, 64-bit read 10 pJ "
                                         "(one 16-bit word: a quarter)"),
    "fp32_mac_pj": Const(4.6, "pJ", "Horowitz ISSCC'14: fp32 mult 3.7 pJ + fp32 add 0.9 pJ"),
    "sram_read_32b_pj": Const(5.0, "pJ", "Horowitz ISSCC'14: 8 KB SRAM, 64-bit read 10 pJ "
                                         "(32-bit: half)"),
}

# Shafiee et al., "ISAAC", ISCA 2016, Table I (32 nm), as transcribed; no offline
# copy was available to re-check these values.
ISAAC = {
    "adc_mw": Const(2.0, "mW", "ISAAC Table I: 8-bit 1.28 GS/s ADC, 16 mW per 8 ADCs"),
    "crossbar_mw": Const(0.3, "mW", "ISAAC Table I: 128x128 array, 2.4 mW per 8 arrays"),
    "dac_mw": Const(0.5, "mW", "ISAAC Table I: 1-bit DACs, 4 mW per 8x128 (128 per array)"),
    "cycle_ns": Const(100.0, "ns", "ISAAC: one crossbar read cycle"),
    "macs_per_array_op": Const(2048, "MAC", "128 rows x 16 16-bit weights (8 2-bit cells each); "
                                            "16-bit inputs over 16 1-bit cycles"),
}

GPU = {
    "pj_per_mac": Const(2 * 250 / 15.7, "pJ", "V100: 250 W TDP / 15.7 fp32 TFLOP/s peak, "
                                              "2 FLOP per MAC (an optimistic, peak-rate bound)"),
}

LOOKUP_NS = Const(1.0, "ns", "assumption: a small SRAM table returns one word per 1 GHz cycle")

PAPER_CLAIMS = {"energy_vs_isaac": 68.4, "energy_vs_pipelayer": 49.5,
                "speedup_vs_isaac": 48.1, "speedup_vs_pipelayer": 10.9}


def isaac_pj_per_mac() -> float:
  """Array + ADC + DAC energy per 16-bit MAC: a lower bound for ISAAC (no
  eDRAM, shift-and-add or routing), which only flatters the baseline."""
  p_mw = ISAAC["adc_mw"].value + ISAAC["crossbar_mw"].value + ISAAC["dac_mw"].value
  t_ns = 16 * ISAAC["cycle_ns"].value
  return p_mw * 1e-3 * t_ns * 1e-9 / ISAAC["macs_per_array_op"].value * 1e12


def rapidnn_energy_pj(c: OpCounts, u: int, lookup_pj: float, add_pj: float,
                      compare_pj: float) -> dict[str, float]:
  """Energy of one inference on lookup blocks: table reads, adds, searches
  (binary search over the sorted centroids: ceil(log2 u) compares) and pooling."""
  parts = {"lookup": c.lookups * lookup_pj, "add": c.adds * add_pj,
           "search": c.searches * max(1, math.ceil(math.log2(max(u, 2)))) * compare_pj,
           "pool": c.pool_cmps * compare_pj}
  parts["total"] = sum(parts.values())
  return parts


def compare(c: OpCounts, u: int) -> dict[str, Any]:
  """Modelled energy per inference for RAPIDNN-on-SRAM-lookups, ISAAC and a GPU,
  and the energy per MAC RAPIDNN may spend for the paper's 68.4x to hold."""
  add = HOROWITZ["add_int16_pj"].value
  rap = rapidnn_energy_pj(c, u, HOROWITZ["sram_read_16b_pj"].value, add, add)
  isaac = c.macs * isaac_pj_per_mac()
  gpu = c.macs * (GPU["pj_per_mac"].value + 2 * HOROWITZ["sram_read_32b_pj"].value)
  return {"rapidnn_pj": rap, "isaac_pj": isaac, "gpu_pj": gpu,
          "isaac_over_rapidnn": isaac / rap["total"], "gpu_over_rapidnn": gpu / rap["total"],
          "rapidnn_pj_per_mac": rap["total"] / c.macs,
          # What all of RAPIDNN's work per multiply-accumulate (lookup, add, its share of
          # searches and pooling) may cost for the paper's 68.4x over ISAAC to hold.
          "pj_per_mac_for_paper_ratio": isaac / PAPER_CLAIMS["energy_vs_isaac"] / c.macs,
          # Latency per unit: one lookup block vs one ISAAC array (equal unit counts;
          # the paper's speed-ups also depend on how many units fit in the area).
          "isaac_ns": c.macs * 16 * ISAAC["cycle_ns"].value / ISAAC["macs_per_array_op"].value,
          "rapidnn_ns": c.lookups * LOOKUP_NS.value}
