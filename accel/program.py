"""A trained MLP or CNN (``core.models``) as a flat op list, so the RAPIDNN
emulator, its float reference and the cost model all walk the same network.

Ops: ('conv', name), ('dense', name), ('relu',), ('pool',), ('flatten',).
Every 'conv'/'dense' is a *linear layer*: its input gets ``u`` clusters and its
kernel ``w`` clusters.
"""

from __future__ import annotations

from typing import Any

from core.models import cnn, mlp

Op = tuple[str, ...]


def program(model: str, cfg: Any) -> tuple[Op, ...]:
  """The op list of ``core.models.<model>`` with config ``cfg``."""
  ops: list[Op] = []
  if model == "cnn":
    if not isinstance(cfg, cnn.CNNConfig):
      raise TypeError(f"model 'cnn' needs a CNNConfig, got {type(cfg).__name__}")
    for i in range(len(cfg.channels)):
      ops += [("conv", f"conv_{i}"), ("relu",), ("pool",)]
    n_dense = len(cfg.hidden) + 1
  elif model == "mlp":
    if not isinstance(cfg, mlp.MLPConfig):
      raise TypeError(f"model 'mlp' needs an MLPConfig, got {type(cfg).__name__}")
    n_dense = len(cfg.hidden) + 1
  else:
    raise ValueError(f"RAPIDNN emulates 'mlp' and 'cnn' models, not {model!r}")
  ops.append(("flatten",))
  for i in range(n_dense):
    ops.append(("dense", f"dense_{i}"))
    if i < n_dense - 1:
      ops.append(("relu",))
  return tuple(ops)


def linear_layers(ops: tuple[Op, ...]) -> list[str]:
  return [op[1] for op in ops if op[0] in ("conv", "dense")]
