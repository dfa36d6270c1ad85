"""Ladder Residual (``core.models.ladder``) under Megatron tensor parallelism: the
model's body with each module's partial output all-reduced (``psum``) where the
ladder wiring consumes it one module later, so XLA may overlap the all-reduce with
the next module's compute; ``async_overlap`` reads whether the compiled HLO does.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from core.models import ladder, lm
from spd_jax import sharding
from spd_jax.sharding import TP


def _psum(x):
  return jax.lax.psum(x, TP)


def make_forward(cfg: lm.LMConfig, mesh: Mesh, drop: Sequence[bool] | None = None, *,
                 with_cache: bool = False):
  """The ladder model under Megatron TP over ``mesh`` (params from ``tp.prepare_params``):
  ``f(params, tokens) -> logits`` or, with cache, ``f(params, tokens, cache, pos)``."""
  sharding.check_tp_size(cfg, mesh.shape[TP])
  drop = ladder.check_drop(drop, cfg)
  tcfg = sharding.tp_config(cfg, mesh.shape[TP])
  p_specs = sharding.param_specs(jax.eval_shape(lm.init, jax.random.key(0), tcfg))

  def body(params, tokens, cache, pos):
    x, new_cache = ladder.blocks(params, lm.embed(params, tokens), pos, tcfg, cache, _psum, drop)
    return lm.unembed(params, x, tcfg), new_cache

  if with_cache:
    c_specs = sharding.cache_specs(lm.init_cache(tcfg, 1, 1))
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(p_specs, P(), c_specs, P()),
                              out_specs=(P(), c_specs)))
  else:
    f = jax.jit(jax.shard_map(lambda prm, tok: body(prm, tok, None, jnp.int32(0))[0], mesh=mesh,
                              in_specs=(p_specs, P()), out_specs=P()))
  return f


def async_overlap(compiled_text: str) -> dict:
  """How the compiled HLO schedules the all-reduces: ``ops`` all-reduce instructions
  (sync or async-start), ``tensors`` the tensors they reduce (XLA's combiner merges
  independent all-reduces into one tuple-shaped op), ``async_pairs`` all-reduce-start /
  -done pairs and ``overlapped`` those with another instruction scheduled between."""
  lines = [l.strip() for l in compiled_text.splitlines()]
  ops, tensors, starts, pairs, overlapped = 0, 0, {}, 0, 0
  for idx, l in enumerate(lines):
    if "=" not in l:
      continue
    name, rhs = (t.strip() for t in l.split("=", 1))
    m = re.search(r" all-reduce(-start)?\(([^)]*)\)", rhs)
    if m:
      ops += 1
      tensors += len([a for a in m.group(2).split(",") if a.strip()])
      if m.group(1):
        starts[name.lstrip("%")] = idx
      continue
    m = re.search(r" all-reduce-done\(%?([\w.-]+)\)", rhs)
    if m and m.group(1) in starts:
      pairs += 1
      between = lines[starts[m.group(1)] + 1:idx]
      overlapped += any("=" in b and "all-reduce" not in b for b in between)
  return {"ops": ops, "tensors": tensors, "async_pairs": pairs, "overlapped": overlapped}
