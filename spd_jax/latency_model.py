"""Analytical per-block latency model of TP inference, with and without SPD.

Per block and device: time = max(compute, memory) (a roofline), where compute
is the block's matmul FLOPs / N over the device's peak, and memory is its
weight shard plus KV-cache shard read once, over memory bandwidth. An
all-reduce of M bytes over N devices costs, by algorithm (Thakur, Rabenseifner
& Gropp, "Optimization of collective communication operations in MPICH",
IJHPCA 2005; reduction arithmetic ignored):

    ring (bandwidth-optimal; the default):   2 (N - 1) alpha + 2 (N - 1) / N * M / beta
    recursive doubling (latency-optimal):    ceil(log2 N) * (alpha + M / beta)

Collective libraries pick the low-latency kind for small messages such as a
decode step's (a few KB), so a decode-time figure is given as the range between
the two. The ring is an assumption of the default, not a fact about any library.

End-to-end latency = L * (t_block + syncs_per_block * t_AR) + LM head. SPD
removes one all-reduce from each dropped block. This is a model, not a
measurement: every constant below is listed with its source or marked as an
assumption.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from spd_jax import compress


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  peak_flops: float      # dense bf16 FLOP/s per device
  mem_bw: float          # HBM bytes/s per device
  link_bw: float         # all-reduce bus bandwidth beta, bytes/s per direction per device
  alpha: float           # per-step latency of a ring all-reduce, seconds
  efficiency: float = 0.7  # fraction of peak compute / bandwidth actually reached (assumed)
  source: str = ""


# Peak numbers are the vendors' datasheet figures. alpha and efficiency are
# assumptions (no primary source offline); alpha ~ a few microseconds per ring
# step is the order of magnitude NCCL reaches over NVLink, ~10 us over PCIe.
PRESETS = {
    "a100-nvlink": Hardware(
        "A100-SXM4-80GB, NVLink 3", 312e12, 2.039e12, 300e9, 3e-6,
        source="NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, "
               "NVLink 600 GB/s bidirectional (300 GB/s per direction); alpha assumed"),
    "a100-pcie": Hardware(
        "A100-PCIe-80GB, PCIe 4.0 x16", 312e12, 1.935e12, 32e9, 10e-6,
        source="NVIDIA A100 datasheet: 312 TFLOP/s bf16, 1,935 GB/s; PCIe 4.0 x16 "
               "~32 GB/s per direction (PCI-SIG spec); alpha assumed"),
    "h100-nvlink": Hardware(
        "H100-SXM5-80GB, NVLink 4", 989e12, 3.35e12, 450e9, 3e-6,
        source="NVIDIA H100 datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, "
               "NVLink 900 GB/s bidirectional (450 GB/s per direction); alpha assumed"),
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
  name: str
  n_layers: int
  d_model: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  vocab: int = 32_000
  bytes_per_param: int = 2  # bf16

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def block_params(self) -> int:
    d, kv = self.d_model, self.n_kv_heads * self.head_dim
    return d * d * 2 + 2 * d * kv + 3 * d * self.d_ff  # q, o, k, v, gate/up/down


# LLaMA-2 shapes from the LLaMA-2 paper / released configs.
LLAMA2 = {
    "7b": ModelShape("LLaMA2-7B", 32, 4096, 32, 32, 11008),
    "13b": ModelShape("LLaMA2-13B", 40, 5120, 40, 40, 13824),
    "70b": ModelShape("LLaMA2-70B", 80, 8192, 64, 8, 28672),
}


ALGORITHMS = ("ring", "recursive_doubling")


def allreduce_time(n_bytes: float, n_devices: int, alpha: float, beta: float,
                   algorithm: str = "ring") -> float:
  """Modelled seconds of one all-reduce (see the module docstring)."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; choose one of {ALGORITHMS}")
  if n_devices == 1:
    return 0.0
  if algorithm == "recursive_doubling":
    return float(np.ceil(np.log2(n_devices))) * (alpha + n_bytes / beta)
  return 2 * (n_devices - 1) * alpha + 2 * (n_devices - 1) / n_devices * n_bytes / beta


def block_time(m: ModelShape, hw: Hardware, n_devices: int, tokens: int, context: int,
               batch: int) -> float:
  """Compute/memory roofline of one block's local work (no communication). With more
  devices than KV heads, each KV head (its K/V projections and cache) is replicated on
  N / K devices, so those bytes and FLOPs shrink only to 1/K per device, not 1/N."""
  r = max(1, n_devices // m.n_kv_heads)  # copies of each KV head
  kv_params = 2 * m.d_model * m.n_kv_heads * m.head_dim
  flops = 2 * tokens * (m.block_params + (r - 1) * kv_params)  # matmuls, replicas included
  flops += 4 * tokens * context * m.d_model  # attention scores and mixing
  weight_bytes = (m.block_params + (r - 1) * kv_params) * m.bytes_per_param
  kv_bytes = 2 * batch * context * m.n_kv_heads * r * m.head_dim * m.bytes_per_param
  compute = flops / n_devices / (hw.peak_flops * hw.efficiency)
  memory = (weight_bytes + kv_bytes) / n_devices / (hw.mem_bw * hw.efficiency)
  return max(compute, memory)


def forward_latency(m: ModelShape, hw: Hardware, n_devices: int, *, n_dropped: int = 0,
                    batch: int = 1, new_tokens: int = 1, context: int = 1024,
                    algorithm: str = "ring") -> dict:
  """Modelled latency (seconds) of one forward pass over ``new_tokens`` per
  sequence (1 = a decode step), split into compute and communication."""
  tokens = batch * new_tokens
  t_block = block_time(m, hw, n_devices, tokens, context, batch)
  msg = tokens * m.d_model * m.bytes_per_param
  t_ar = allreduce_time(msg, n_devices, hw.alpha, hw.link_bw, algorithm)
  n_ar = 2 * m.n_layers - n_dropped
  head = max(2 * tokens * m.d_model * m.vocab / (hw.peak_flops * hw.efficiency),
             m.d_model * m.vocab * m.bytes_per_param / (hw.mem_bw * hw.efficiency))
  compute = m.n_layers * t_block + head
  return {"total": compute + n_ar * t_ar, "compute": compute, "comm": n_ar * t_ar,
          "allreduce": t_ar, "all_reduces": n_ar}


def spd_reduction(m: ModelShape, hw: Hardware, n_devices: int, n_dropped: int, **kw) -> float:
  """Fractional end-to-end latency reduction from dropping ``n_dropped`` syncs."""
  base = forward_latency(m, hw, n_devices, **kw)["total"]
  return 1.0 - forward_latency(m, hw, n_devices, n_dropped=n_dropped, **kw)["total"] / base


def fit_alpha_beta(sizes_bytes, seconds, n_devices: int) -> tuple[float, float]:
  """Least-squares fit of the ring model t = 2(N-1) alpha + 2(N-1)/N M / beta."""
  sizes = np.asarray(sizes_bytes, np.float64)
  t = np.asarray(seconds, np.float64)
  a = np.stack([np.full_like(sizes, 2 * (n_devices - 1)), 2 * (n_devices - 1) / n_devices * sizes], 1)
  (alpha, inv_beta), *_ = np.linalg.lstsq(a, t, rcond=None)
  return float(alpha), float(1.0 / inv_beta) if inv_beta > 0 else float("inf")


CODEC_TRAFFIC = ("fused", "unfused")


def sync_time(m: ModelShape, hw: Hardware, n_devices: int, tokens: int, action: str,
              algorithm: str = "ring", codec_traffic: str = "fused") -> float:
  """Modelled seconds of one sync carrying ``tokens`` x d_model activations.

  ``keep``: a plain all-reduce of bf16 activations (``m.bytes_per_param``) by
  ``algorithm``. A codec: its payload (``compress.payload_bytes_per_element``)
  through a reduce-scatter (all-to-all) and an all-gather, which move what a ring
  all-reduce moves, so the ring formula applies to the smaller message; plus HBM
  traffic for the codec, memory-bound. ``codec_traffic`` (an assumption either way):

  * ``fused``: encoding happens in the producing matmul's epilogue and decoding in
    the consumer's prologue (as in quantised-communication kernels), so the extra
    traffic is the reduction step alone: read the N received chunks, write the
    re-encoded one (payload x (1 + 1/N)).
  * ``unfused``: separate kernels: read the bf16 activations and write the payload
    to encode, read the received chunks and write the reduced one, read the
    gathered payload and write bf16 to decode (about 2 x (2 + 2 x payload) bytes
    per element).

  ``drop``: nothing.
  """
  if codec_traffic not in CODEC_TRAFFIC:
    raise ValueError(f"codec_traffic must be one of {CODEC_TRAFFIC}, got {codec_traffic!r}")
  if action == "drop":
    return 0.0
  elems = tokens * m.d_model
  if action == "keep":
    return allreduce_time(elems * m.bytes_per_param, n_devices, hw.alpha, hw.link_bw, algorithm)
  per_el = compress.payload_bytes_per_element(action, max(1, m.d_model // n_devices))
  wire = allreduce_time(elems * per_el, n_devices, hw.alpha, hw.link_bw, "ring")
  if codec_traffic == "fused":
    traffic = elems * per_el * (1 + 1 / n_devices)
  else:
    traffic = 2 * (elems * m.bytes_per_param + 2 * elems * per_el)
  return wire + traffic / (hw.mem_bw * hw.efficiency)


def plan_latency(m: ModelShape, hw: Hardware, n_devices: int, attn: Sequence[str],
                 mlp: Sequence[str], *, batch: int = 1, new_tokens: int = 1, context: int = 1024,
                 algorithm: str = "ring", codec_traffic: str = "fused") -> float:
  """Modelled seconds of one forward under per-block sync actions (one per model block:
  attention keep/drop/codec, MLP keep/codec); ``forward_latency`` with every sync priced."""
  if len(attn) != m.n_layers or len(mlp) != m.n_layers:
    raise ValueError(f"{m.name} has {m.n_layers} blocks; got {len(attn)} attention and "
                     f"{len(mlp)} MLP actions")
  compute = forward_latency(m, hw, n_devices, batch=batch, new_tokens=new_tokens,
                            context=context, algorithm=algorithm)["compute"]
  tokens = batch * new_tokens
  t = {a: sync_time(m, hw, n_devices, tokens, a, algorithm, codec_traffic)
       for a in set(attn) | set(mlp)}
  return compute + sum(t[a] for a in attn) + sum(t[a] for a in mlp)


def map_actions(actions: Sequence[str], n_model_layers: int) -> tuple[str, ...]:
  """Spreads a study model's per-block actions over a deeper model: model block j takes
  study block floor(j L_study / L_model) (16 -> 80 blocks: each action covers 5)."""
  n = len(actions)
  return tuple(actions[j * n // n_model_layers] for j in range(n_model_layers))


def module_times(m: ModelShape, hw: Hardware, n_devices: int, tokens: int, context: int,
                 batch: int) -> tuple[float, float]:
  """(attention, MLP) halves of ``block_time``'s roofline, each max(compute, memory)
  on its own weights (the attention half also on the KV cache and the score FLOPs)."""
  r = max(1, n_devices // m.n_kv_heads)
  d, kv = m.d_model, m.n_kv_heads * m.head_dim
  attn_params = 2 * d * d + 2 * d * kv * r
  mlp_params = 3 * d * m.d_ff
  kv_bytes = 2 * batch * context * m.n_kv_heads * r * m.head_dim * m.bytes_per_param
  rate, bw = hw.peak_flops * hw.efficiency * n_devices, hw.mem_bw * hw.efficiency * n_devices
  attn = max((2 * tokens * attn_params + 4 * tokens * context * d) / rate,
             (attn_params * m.bytes_per_param + kv_bytes) / bw)
  mlp = max(2 * tokens * mlp_params / rate, mlp_params * m.bytes_per_param / bw)
  return attn, mlp


LADDER_PUBLISHED = ("Ladder Residual (Zhang et al., arXiv 2501.06589): about 29-30% end-to-end "
                    "inference speed-up for a 70B model at TP=8 over NVLink, and communication "
                    "about 38% of a standard 70B TP=8 forward (the authors' blog post)")


def ladder_latency(m: ModelShape, hw: Hardware, n_devices: int, *, batch: int = 1,
                   new_tokens: int = 1, context: int = 1024, algorithm: str = "ring",
                   dropped: Sequence[bool] | None = None, overlap: float = 1.0) -> dict:
  """Modelled seconds of one forward, standard against Ladder Residual, on the same
  per-module roofline (``module_times``). A model, not a measurement.

  Standard: every module's compute and then its all-reduce, in sequence. Ladder: a
  module's all-reduce runs while the next module computes, so only
  max(0, t_AR - overlap * t_next) is exposed; the last one is exposed whole.
  ``overlap`` (assumed 1: communication and compute do not slow each other; NCCL
  kernels do take SMs in practice) scales the hidden part. ``dropped[i]``: block i's
  attention sync is dropped (SPD), its partial sums riding in the MLP's sync. The
  LM head is computed after the last module in both."""
  if not 0 <= overlap <= 1:
    raise ValueError(f"overlap must lie in [0, 1], got {overlap}")
  dropped = [False] * m.n_layers if dropped is None else list(dropped)
  if len(dropped) != m.n_layers:
    raise ValueError(f"{m.name} has {m.n_layers} blocks; got {len(dropped)} drop flags")
  tokens = batch * new_tokens
  t_attn, t_mlp = module_times(m, hw, n_devices, tokens, context, batch)
  t_ar = allreduce_time(tokens * m.d_model * m.bytes_per_param, n_devices, hw.alpha,
                        hw.link_bw, algorithm)
  head = max(2 * tokens * m.d_model * m.vocab / (hw.peak_flops * hw.efficiency),
             m.d_model * m.vocab * m.bytes_per_param / (hw.mem_bw * hw.efficiency))
  compute = [t for _ in range(m.n_layers) for t in (t_attn, t_mlp)]
  comm = [t for d in dropped for t in ((0.0 if d else t_ar), t_ar)]
  standard = sum(compute) + sum(comm) + head
  exposed = [max(0.0, c - overlap * nxt) for c, nxt in zip(comm[:-1], compute[1:])] + [comm[-1]]
  ladder = sum(compute) + sum(exposed) + head
  return {"standard": standard, "ladder": ladder, "compute": sum(compute) + head,
          "comm": sum(comm), "exposed_comm": sum(exposed),
          "speedup": standard / ladder - 1.0, "reduction": 1.0 - ladder / standard}
