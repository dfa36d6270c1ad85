"""Calibration of the FPGA model against FINN's published binarized MNIST
MLPs on the ZC706 (Umuroglu et al., "FINN", FPGA 2017).

SFC: 784-256-256-256-10, LFC: 784-1024-1024-1024-10, weights and activations
binarized (1 bit; FINN binarizes the input pixels too), XNOR-popcount lanes in
LUTs and no DSPs. The model's one free constant (LUTs per 1x1-bit lane) is
fitted on SFC-max and *checked* on LFC-max.
"""

from __future__ import annotations

import math

from accel.codex import fpga
from accel.codex.encoding import BitConfig
from core.sourced import Const

PUBLISHED = {
    "SFC-max": Const(12.3e6, "images/s", "FINN abstract: 12.3 M classifications/s on MNIST "
                                         "(SFC-max, ZC706, 0.31 us latency)"),
    "LFC-max": Const(1.561e6, "images/s", "FINN Table 2 as recalled (LFC-max 1,561 k "
                                          "images/s, 98.4%); not re-checkable offline"),
}
TOPOLOGIES = {"SFC-max": (256, 256, 256), "LFC-max": (1024, 1024, 1024)}


def topology(name: str) -> tuple[tuple, dict]:
  """(ops, kernel shapes) of a FINN MLP."""
  widths = (784, *TOPOLOGIES[name], 10)
  ops, kernels = [("flatten",)], {}
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    ops.append(("dense", f"dense_{i}"))
    kernels[f"dense_{i}"] = (a, b)
    if i < len(widths) - 2:
      ops.append(("relu",))
  return tuple(ops), kernels


def modelled(name: str, lut_per_bit2: float | None = None) -> fpga.Design:
  ops, kernels = topology(name)
  bits = BitConfig.uniform(len(kernels), 1)
  return fpga.compile_design(ops, (28, 28, 1), kernels, bits, "zc706", use_dsp=False,
                             lut_per_bit2=lut_per_bit2)


def fit(on: str = "SFC-max", lo: float = 0.5, hi: float = 200.0, steps: int = 60) -> float:
  """LUTs per 1x1-bit lane that makes the model's throughput on ``on`` equal the
  published one (throughput falls as the constant grows: bisection on its log)."""
  target = PUBLISHED[on].value
  for _ in range(steps):
    mid = math.sqrt(lo * hi)
    if modelled(on, mid).images_per_s > target:
      lo = mid
    else:
      hi = mid
  return math.sqrt(lo * hi)


def calibration() -> list[dict]:
  """Modelled (at the pinned constant) vs published throughput per topology."""
  rows = []
  for name, pub in PUBLISHED.items():
    d = modelled(name)
    rows.append({"topology": name, "published": pub.value, "modelled": d.images_per_s,
                 "ratio": d.images_per_s / pub.value, "lut": d.lut, "bram36": d.bram36,
                 "ii_cycles": d.ii_cycles, "role": "fit" if name == "SFC-max" else "check",
                 "source": pub.source})
  return rows
