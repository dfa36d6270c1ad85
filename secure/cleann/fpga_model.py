"""An FPGA cost model of CLEANN's shield datapath (a model, not a measurement).

Per image: the input analyzer's DCT, OMP and inverse DCT over every patch,
and the latent analyzer's OMP on one feature vector. Operation counts are
exact for the Gram-Cholesky OMP of ``secure.sparse`` (per signal of F
features, K atoms, s iterations):

  correlations D x: K F MACs; at iteration i (1..s): correlation update K i,
  forward solve for the new factor row i^2 / 2, two solves for the
  coefficients i^2, one square root; reconstruction s F MACs.
  Separable 2-D DCT on a b x b patch: 2 b^3 MACs (and as many for the inverse).

Mapping: ``dsp`` multiply-accumulate lanes at ``clock_mhz``; each OMP
iteration adds ``argmax_cycles`` (a log2 K comparator tree) and
``sqrt_cycles`` of latency that is not overlapped. Memory: dictionary and Gram
matrix in BRAM at their fixed-point widths. Energy = power x time at
``power_w``. Every constant carries its source; the power figure and the
per-iteration latencies are assumptions, and the model has not been
calibrated against a measured OMP accelerator (no such measurement with its
problem sizes is available offline; see ``REFERENCE``).
"""

from __future__ import annotations

import dataclasses
import math

from core.sourced import Const


DEVICE = {
    "dsp": Const(220, "DSP48E1 slices", "Xilinx DS190, Zynq-7000 SoC overview: XC7Z020"),
    "bram_kbit": Const(4480, "kbit (140 x 36 Kb)", "Xilinx DS190: XC7Z020 block RAM"),
    "clock_mhz": Const(100, "MHz", "assumed: a conservative fabric clock for a DSP datapath "
                                   "on a -1 speed grade Zynq-7020 (our choice)"),
    "power_w": Const(2.0, "W", "assumed: board-level dynamic + static power of a loaded "
                               "Zynq-7020 design; not measured (our choice)"),
    "argmax_cycles": Const(8, "cycles/iteration", "assumed: log2(256) comparator stages"),
    "sqrt_cycles": Const(16, "cycles/iteration", "assumed: a pipelined fixed-point square "
                                                 "root of ~16-bit operands"),
}
REFERENCE = ("Published order of magnitude, not a calibration: an OMP on a Kintex UltraScale "
             "at 250 MHz reconstructs one compressed-sensing signal in 27 us (Electronics "
             "2018, 7(9), 206; problem sizes not available offline).")


def omp_macs(n_features: int, n_atoms: int, sparsity: int) -> int:
  """MACs of one Gram-Cholesky OMP (see the module docstring)."""
  it = sum(n_atoms * i + i * i // 2 + i * i for i in range(1, sparsity + 1))
  return n_atoms * n_features + it + sparsity * n_features


@dataclasses.dataclass(frozen=True)
class Workload:
  patches: int           # per image
  patch_side: int
  input_atoms: int
  input_sparsity: int
  latent_features: int
  latent_atoms: int
  latent_sparsity: int
  dict_bits: int = 16
  factor_bits: int = 16


def estimate(w: Workload, dsp: int | None = None) -> dict:
  """Cycles, time, throughput, energy and resources per image."""
  lanes = int(dsp or DEVICE["dsp"].value)
  f = w.patch_side ** 2
  dct = 2 * 2 * w.patch_side ** 3                         # forward + inverse
  per_patch = omp_macs(f, w.input_atoms, w.input_sparsity) + dct
  latent = omp_macs(w.latent_features, w.latent_atoms, w.latent_sparsity)
  macs = w.patches * per_patch + latent
  serial = (w.patches * w.input_sparsity + w.latent_sparsity) * (
      DEVICE["argmax_cycles"].value + DEVICE["sqrt_cycles"].value)
  cycles = math.ceil(macs / lanes) + serial
  seconds = cycles / (DEVICE["clock_mhz"].value * 1e6)
  bram_bits = (w.input_atoms * f + w.input_atoms ** 2) * w.dict_bits + (
      w.latent_atoms * w.latent_features + w.latent_atoms ** 2) * w.dict_bits
  return {"macs": macs, "cycles": cycles, "us_per_image": 1e6 * seconds,
          "images_per_s": 1 / seconds, "uj_per_image": 1e6 * seconds * DEVICE["power_w"].value,
          "dsp": lanes, "bram_kbit": bram_bits / 1024,
          "bram_fraction": bram_bits / 1024 / DEVICE["bram_kbit"].value}
