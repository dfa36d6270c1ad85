"""A constant with its unit and where it comes from: what every model (energy,
latency, FPGA resources) in this codebase labels its numbers with."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Const:
  value: float
  unit: str
  source: str
