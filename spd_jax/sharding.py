"""The one place that maps transformer parameter paths to PartitionSpecs (Megatron TP),
for the byte LM (``core.models.lm``) and BERT (``core.models.bert``) alike.

Column-parallel (split the output features): Q/K/V over heads, MLP gate/up
(BERT: w_in) over hidden units. Row-parallel (split the input features, all-reduce
the output): attention out-projection over heads, MLP down (BERT: w_out) over
hidden units.
Everything else -- embeddings, norms, row-parallel output biases, the
unembedding -- is replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from core.models.lm import LMConfig, block_key

TP = "tp"  # the tensor-parallel mesh axis

_SPECS = {
    # attention, column-parallel over the head axis
    "wq": P(None, TP, None), "wk": P(None, TP, None), "wv": P(None, TP, None),
    "bq": P(TP, None), "bk": P(TP, None), "bv": P(TP, None),
    # attention out-projection, row-parallel over heads
    "wo": P(TP, None, None),
    # MLP, column-parallel then row-parallel over hidden units
    "w_gate": P(None, TP), "w_up": P(None, TP), "b_gate": P(TP), "b_up": P(TP),
    "w_down": P(TP, None),
    # BERT's MLP (core.models.bert): the same split under its names
    "w_in": P(None, TP), "b_in": P(TP), "w_out": P(TP, None),
}


def check_tp_size(cfg: Any, tp: int) -> None:
  """Raises a clear error unless every device can hold whole query heads, an equal MLP
  slice, and either whole KV heads or (TP a multiple of the KV heads) one replicated KV
  head whose query heads it holds (see ``tp_config``)."""
  if tp < 1:
    raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
  problems = [f"{name}={n}" for name, n in (("n_heads", cfg.n_heads), ("d_ff", cfg.d_ff))
              if n % tp]
  k = cfg.kv_heads
  if k % tp and tp % k:
    problems.append(f"n_kv_heads={k} (nor is TP a multiple of it)")
  if problems:
    raise ValueError(f"TP size {tp} does not divide {', '.join(problems)}: every device "
                     f"must hold whole heads, whole or replicated KV heads and an equal MLP "
                     "slice")


def kv_replicas(cfg: LMConfig, tp: int) -> int:
  """How many devices share each KV head: 1 unless TP exceeds the KV heads."""
  check_tp_size(cfg, tp)
  return max(1, tp // cfg.kv_heads)


def tp_config(cfg: LMConfig, tp: int) -> LMConfig:
  """The config the devices run: with TP > KV heads, each KV head is replicated on the
  ``tp / K`` devices whose query heads read it (as Megatron-LM and vLLM do), which is the
  same function as a model with ``tp`` KV heads, copy j of KV head j // r."""
  r = kv_replicas(cfg, tp)
  return cfg if r == 1 else dataclasses.replace(cfg, n_kv_heads=cfg.kv_heads * r)


def replicate_kv_block(p: dict, cfg: LMConfig, tp: int) -> dict:
  """One block's params in ``tp_config``'s layout (KV projections repeated per replica)."""
  r = kv_replicas(cfg, tp)
  if r == 1:
    return p
  a = dict(p["attn"])
  for name, axis in (("wk", 1), ("wv", 1), ("bk", 0), ("bv", 0)):
    if name in a:
      a[name] = jax.numpy.repeat(a[name], r, axis=axis)
  return dict(p, attn=a)


def replicate_kv(params: Any, cfg: LMConfig, tp: int) -> Any:
  """Every block's params in ``tp_config``'s layout (a new pytree; others shared)."""
  out = dict(params)
  for i in range(cfg.n_layers):
    key = block_key(i)
    out[key] = replicate_kv_block(params[key], cfg, tp)
  return out


def param_spec(path: tuple, leaf: Any) -> P:
  """PartitionSpec of one LM parameter, from its path in the pytree."""
  name = getattr(path[-1], "key", None)
  if len(path) >= 2 and getattr(path[-2], "key", None) in ("attn", "mlp") and name in _SPECS:
    return _SPECS[name]
  return P()


def param_specs(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(param_spec, params)


def cache_specs(cache: Any) -> Any:
  """KV caches (B, S, K, Dh) are split over KV heads, like wk/wv."""
  return jax.tree_util.tree_map(lambda _: P(None, None, TP, None), cache)


def make_mesh(tp: int, devices: list | None = None) -> Mesh:
  """A 1-D mesh over the first ``tp`` devices (Auto axis type, for shard_map)."""
  devices = jax.devices() if devices is None else devices
  if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) or tp < 1:
    raise ValueError(f"TP size must be an integer >= 1, got {tp!r}")
  if tp > len(devices):
    raise ValueError(f"TP size {tp} needs {tp} devices; only {len(devices)} are visible")
  return Mesh(np.array(devices[:tp]), (TP,))


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
  # make_array_from_callback works when the mesh spans several processes
  # (each process fills only its own devices from its identical host copy).
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_params(params: Any, mesh: Mesh) -> Any:
  """Places ``params`` on ``mesh`` according to ``param_specs``."""
  return jax.tree_util.tree_map(lambda x, s: _put(x, NamedSharding(mesh, s)),
                                params, param_specs(params))


def shard_cache(cache: Any, mesh: Mesh) -> Any:
  return jax.tree_util.tree_map(lambda x, s: _put(x, NamedSharding(mesh, s)),
                                cache, cache_specs(cache))


def place(x: Any, mesh: Mesh, spec: P) -> jax.Array:
  """A host value (identical on every process) as a global array laid out by ``spec``."""
  return _put(x, NamedSharding(mesh, spec))


def replicate(x: Any, mesh: Mesh) -> jax.Array:
  """A host value as a replicated global array (needed when the mesh spans processes)."""
  return place(x, mesh, P())


def _device_axis(name: str) -> int | None:
  spec = _SPECS.get(name)
  return None if spec is None else list(spec).index(TP)


def device_stack(params: Any, n: int) -> tuple[Any, Any]:
  """Every parameter as ``n`` devices hold it, for ``jax.vmap(..., axis_name=TP)``:
  sharded leaves (``param_spec``) split along their TP axis and stacked on a new
  leading axis, the rest as they are; returns (stacked params, vmap in_axes: 0 or
  None per leaf). Lets one device run the shard_map body of N, psums included."""
  def one(path, x):
    axis = _device_axis(getattr(path[-1], "key", None)) if param_spec(path, x) != P() else None
    if axis is None:
      return x, None
    if x.shape[axis] % n:
      raise ValueError(f"{jax.tree_util.keystr(path)}: axis {axis} of size {x.shape[axis]} "
                       f"does not split over {n} devices")
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    return jax.numpy.moveaxis(x.reshape(shape), axis, 0), 0
  pairs = jax.tree_util.tree_map_with_path(one, params)
  is_pair = lambda t: isinstance(t, tuple) and len(t) == 2 and not isinstance(t[0], tuple)
  return (jax.tree_util.tree_map(lambda t: t[0], pairs, is_leaf=is_pair),
          jax.tree_util.tree_map(lambda t: t[1], pairs, is_leaf=is_pair))


def split_for_devices(sub: dict, n: int) -> dict:
  """Stacks the per-device shards of an ``attn`` or ``mlp`` param dict along a
  new leading axis of size ``n`` (the layout ``param_specs`` would place on a
  mesh of ``n``), keeping only the sharded leaves. Lets one device emulate N."""
  out = {}
  for name, x in sub.items():
    spec = _SPECS.get(name)
    if spec is None:
      continue  # replicated (row-parallel output biases): added once by the caller
    axis = list(spec).index(TP)
    shape = x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:]
    out[name] = jax.numpy.moveaxis(x.reshape(shape), axis, 0)
  return out
