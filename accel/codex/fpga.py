"""A streaming FPGA model of an encoded network -- a *model*, not a
measurement: every constant carries its source, and the one fitted constant
is fitted on a published FINN result and checked on another (``calibrate``).

Architecture modelled (one image in flight per stage, as in FINN and CodeX):
* every linear layer is one pipeline stage of ``lanes`` multiply-accumulate
  units; a stage needs ceil(MACs / lanes) cycles per image and the pipeline's
  initiation interval (II) is its slowest stage;
* a lane is a DSP slice (one MAC per cycle at any width used here) or LUT
  fabric costing ``lut_per_bit2`` x (activation bits x weight bits) LUTs --
  partial products of an a x w multiplier scale with a*w, and a 1 x 1-bit lane
  is FINN's XNOR-popcount; full-precision activations count 16 bits;
* on chip (BRAM36 blocks of 36 Kb, at most 72 bits read per cycle each): a
  stage's encoded kernel plus its codebook, read ``lanes`` x w bits per cycle;
  its input buffer -- for a 3x3 conv the line buffer of encoded activations
  ((2 W + 3) C values), for a dense layer the input vector, double-buffered;
* lanes are allocated across stages to balance the II: the smallest II whose
  per-stage lanes ceil(MACs / II) fit the DSPs, LUTs and BRAM (DSPs go to the
  stages whose LUT lanes are dearest);
* if the kernels do not fit on chip at all, the largest spill to DRAM and are
  streamed once per image at the board's bandwidth, capping throughput.
Energy per image: the board's system power over the throughput, plus DRAM
traffic at Horowitz's per-byte energy.
"""

from __future__ import annotations

import dataclasses
import json
import math

from accel.codex.encoding import FULL_PRECISION_BITS, BitConfig
from accel.program import Op
from core.sourced import Const

BRAM_BITS = 36 * 1024
BRAM_PORT_BITS = 72   # a BRAM36 in simple dual-port mode reads 72 bits per cycle (UG473)


@dataclasses.dataclass(frozen=True)
class Board:
  name: str
  part: str
  bram36: Const
  dsp: Const
  lut: Const
  clock_mhz: Const
  dram_gb_s: Const
  system_w: Const


BOARDS = {
    "zc706": Board(
        "Xilinx ZC706", "XC7Z045",
        Const(545, "BRAM36", "Xilinx DS190 (Zynq-7000 overview), XC7Z045: 545 x 36 Kb block "
                             "RAM (19.2 Mb)"),
        Const(900, "DSP48E1", "Xilinx DS190, XC7Z045: 900 DSP slices"),
        Const(218_600, "LUT", "Xilinx DS190, XC7Z045: 218,600 LUTs"),
        Const(200, "MHz", "FINN's ZC706 designs run at 200 MHz (Umuroglu et al., FPGA 2017)"),
        Const(12.8, "GB/s", "Xilinx UG954 (ZC706): PL DDR3 SODIMM, 64-bit DDR3-1600 peak"),
        Const(25.0, "W", "FINN (Umuroglu et al. 2017): 'less than 25 W total system power' "
                         "on the ZC706")),
    "zcu102": Board(
        "Xilinx ZCU102", "XCZU9EG",
        Const(912, "BRAM36", "Xilinx DS891 (Zynq UltraScale+ overview), ZU9EG: 912 x 36 Kb "
                             "block RAM (32.1 Mb), no UltraRAM"),
        Const(2_520, "DSP48E2", "Xilinx DS891, ZU9EG: 2,520 DSP slices"),
        Const(274_080, "LUT", "Xilinx DS891, ZU9EG: 274,080 CLB LUTs"),
        Const(200, "MHz", "assumed equal to the ZC706's 200 MHz so boards compare on "
                          "resources alone"),
        Const(19.2, "GB/s", "Xilinx UG1182 (ZCU102): PS DDR4, 64-bit DDR4-2400 peak"),
        Const(25.0, "W", "assumed equal to FINN's ZC706 system power (no published figure "
                         "for this board offline)")),
}

DRAM_PJ_PER_BYTE = Const(325.0, "pJ/B", "Horowitz ISSCC'14: DRAM access 1.3-2.6 nJ per "
                                         "64 bits (upper end, per byte)")
# Fitted by ``calibrate`` on FINN SFC-max and pinned here (the calibration test
# re-fits it and checks it equals this value).
LUT_PER_BIT2 = Const(10.0, "LUT", "fitted on FINN SFC-max (12.3 M images/s on the ZC706, "
                                  "FINN 2017 abstract): LUTs per 1x1-bit MAC lane")


def board(name: str) -> Board:
  if name not in BOARDS:
    raise ValueError(f"unknown board {name!r}; presets are {sorted(BOARDS)}")
  return BOARDS[name]


@dataclasses.dataclass(frozen=True)
class Block:
  """One hardware block of the compiled design (all counts per image)."""
  name: str
  kind: str              # 'mac' (a linear layer's stage), 'encode' (ReLU + nearest search),
                         # 'pool' (max over 2x2 codes), 'input' (encoder of the pixels)
  macs: int = 0
  w_bits: int = 0
  a_bits: int = 0
  lanes: int = 0
  dsp: int = 0
  lut: int = 0
  weight_mem_bits: int = 0
  act_buffer_bits: int = 0
  bram36: int = 0
  cycles: int = 0
  spilled: bool = False
  comparators: int = 0   # 'encode'/'input': 2^a - 1 midpoints searched per value


@dataclasses.dataclass(frozen=True)
class Design:
  board: str
  bits: dict
  blocks: tuple[Block, ...]
  ii_cycles: int
  images_per_s: float
  compute_images_per_s: float
  dram_images_per_s: float | None
  bram36: int
  dsp: int
  lut: int
  dram_bytes_per_image: float
  energy_uj_per_image: float

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> "Design":
    d = json.loads(text)
    d["blocks"] = tuple(Block(**b) for b in d["blocks"])
    return cls(**d)


def _kernel_shape(p) -> tuple[int, ...]:
  if isinstance(p, dict):
    return tuple((p["kernel"] if "kernel" in p else p["w_idx"]).shape)
  return tuple(p)


def stages(ops: tuple[Op, ...], input_shape: tuple[int, ...], kernels: dict,
           bits: BitConfig) -> list[Block]:
  """The op list as blocks with their lane-independent counts: MACs, encoded
  kernel + codebook bits, input-buffer bits. ``kernels`` maps a layer to its
  params (or just its kernel shape)."""
  shape, blocks, li = tuple(input_shape), [], 0
  names = [op[1] for op in ops if op[0] in ("conv", "dense")]
  if len(names) != len(bits.weights):
    raise ValueError(f"the bit config has {len(bits.weights)} layers, the network "
                     f"{len(names)} ({names})")
  abits = [FULL_PRECISION_BITS if a is None else a for a in bits.acts]
  if bits.acts[0] is not None:
    blocks.append(Block("input", "input", a_bits=abits[0], comparators=2 ** abits[0] - 1))
  for i, op in enumerate(ops):
    kind = op[0]
    if kind in ("conv", "dense"):
      ks = _kernel_shape(kernels[op[1]])
      wb, ab = bits.weights[li], abits[li]
      n_w = math.prod(ks)
      if kind == "conv":
        h, w, c = shape
        macs = h * w * n_w
        buf = (2 * w + 3) * c * ab          # 3x3 line buffer: two rows and three pixels
        shape = (h, w, ks[-1])
      else:
        macs = n_w
        buf = 2 * ks[0] * ab                # the input vector, double-buffered
        shape = (ks[-1],)
      wmem = n_w * wb + 2 ** wb * FULL_PRECISION_BITS + ks[-1] * FULL_PRECISION_BITS
      blocks.append(Block(op[1], "mac", macs=macs, w_bits=wb, a_bits=ab,
                          weight_mem_bits=wmem, act_buffer_bits=buf))
      li += 1
    elif kind == "relu" and li < len(names):
      a = bits.acts[li]
      blocks.append(Block(f"{names[li - 1]}_encode", "encode", a_bits=abits[li],
                          comparators=0 if a is None else 2 ** a - 1))
    elif kind == "pool":
      shape = (shape[0] // 2, shape[1] // 2, shape[2])
      blocks.append(Block(f"pool_{i}", "pool"))
    elif kind == "flatten":
      shape = (math.prod(shape),)
  return blocks


def _blocks_for(bits_total: int, read_bits_per_cycle: int) -> int:
  return max(math.ceil(bits_total / BRAM_BITS), math.ceil(read_bits_per_cycle / BRAM_PORT_BITS))


def _allocate(macs: list[Block], ii: int, b: Board, lut_per_bit2: float, use_dsp: bool):
  """Per stage (lanes, dsp, lut, bram36) at initiation interval ``ii``, or None
  when the board's DSPs, LUTs or BRAM do not suffice."""
  lanes = [math.ceil(s.macs / ii) for s in macs]
  cost = [lut_per_bit2 * s.a_bits * s.w_bits for s in macs]
  dsp_left = int(b.dsp.value) if use_dsp else 0
  dsp = [0] * len(macs)
  for j in sorted(range(len(macs)), key=lambda j: -cost[j]):   # dearest LUT lanes first
    dsp[j] = min(lanes[j], dsp_left)
    dsp_left -= dsp[j]
  lut = [math.ceil((n - d) * c) for n, d, c in zip(lanes, dsp, cost)]
  bram = [(0 if s.spilled else _blocks_for(s.weight_mem_bits, n * s.w_bits))
          + _blocks_for(s.act_buffer_bits, 0) for s, n in zip(macs, lanes)]
  if sum(lut) > b.lut.value or sum(bram) > b.bram36.value:
    return None
  return lanes, dsp, lut, bram


def compile_design(ops: tuple[Op, ...], input_shape: tuple[int, ...], kernels: dict,
                   bits: BitConfig, board_name: str = "zc706", *, use_dsp: bool = True,
                   lut_per_bit2: float | None = None) -> Design:
  """The network and a bit configuration -> hardware blocks, resources, throughput
  and energy on ``board_name``."""
  b = board(board_name)
  k = LUT_PER_BIT2.value if lut_per_bit2 is None else lut_per_bit2
  blocks = stages(ops, input_shape, kernels, bits)
  macs = [s for s in blocks if s.kind == "mac"]
  # Spill the largest kernels until the rest fit on chip by capacity alone.
  cap = lambda s: math.ceil(s.weight_mem_bits / BRAM_BITS) + math.ceil(s.act_buffer_bits /
                                                                      BRAM_BITS)
  spilled: set[str] = set()
  while sum(cap(s) for s in macs if s.name not in spilled) + sum(
      math.ceil(s.act_buffer_bits / BRAM_BITS) for s in macs if s.name in spilled) > b.bram36.value:
    rest = [s for s in macs if s.name not in spilled]
    if not rest:
      raise ValueError(f"the input buffers alone exceed the {int(b.bram36.value)} BRAM36 of "
                       f"{b.name}")
    spilled.add(max(rest, key=lambda s: s.weight_mem_bits).name)
  macs = [dataclasses.replace(s, spilled=s.name in spilled) for s in macs]
  lo, hi = 1, max(s.macs for s in macs)
  if _allocate(macs, hi, b, k, use_dsp) is None:
    raise ValueError(f"{b.name} cannot hold even one MAC lane per stage for this network "
                     f"({len(macs)} stages)")
  while lo < hi:              # resources fall as the II grows: bisect the smallest that fits
    mid = (lo + hi) // 2
    if _allocate(macs, mid, b, k, use_dsp) is None:
      lo = mid + 1
    else:
      hi = mid
  ii = lo
  lanes, dsp, lut, bram = _allocate(macs, ii, b, k, use_dsp)
  done = {s.name: dataclasses.replace(s, lanes=n, dsp=d, lut=l, bram36=r,
                                      cycles=math.ceil(s.macs / n))
          for s, n, d, l, r in zip(macs, lanes, dsp, lut, bram)}
  blocks = [done.get(s.name, s) for s in blocks]
  clock = b.clock_mhz.value * 1e6
  compute = clock / ii
  dram_bytes = sum(s.weight_mem_bits for s in macs if s.spilled) / 8
  dram_rate = b.dram_gb_s.value * 1e9 / dram_bytes if dram_bytes else None
  rate = min(compute, dram_rate) if dram_rate else compute
  energy = b.system_w.value / rate + dram_bytes * DRAM_PJ_PER_BYTE.value * 1e-12
  return Design(board_name, bits.to_json(), tuple(blocks), ii, rate, compute, dram_rate,
                sum(bram), sum(dsp), sum(lut), dram_bytes, energy * 1e6)
