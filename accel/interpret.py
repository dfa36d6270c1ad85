"""Runs a traced model (``accel.graph.Graph``) with every linear op handed to
a datapath: a jaxpr interpreter that evaluates each equation as JAX would,
except ``dot_general`` / ``conv_general_dilated``, which go to ``on_linear``
with the op's stable name and its two operands.

Nested calls (jit, custom_jvp/vjp, remat) are entered, so their linear ops are
seen; a ``scan`` is rebuilt around an interpreted body (its linear ops keep one
name for every iteration, so they share a codebook across iterations). A
``cond``, ``while`` or ``shard_map`` is run as it is when it holds no linear
op and refused, by name, when it does: its ops are not mapped.

Everything here is traceable: ``run`` jits the whole interpreted program, and
``operands`` records what each linear op multiplies (calibration).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from accel.graph import Graph
from accel.kmeans import nearest_sorted
from core import jaxpr_ops

# on_linear(name, eqn, lhs, rhs) -> (output, record or None)
OnLinear = Callable[[str, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]

# Primitives whose single body is the call's forward computation, its inputs the call's inputs.
_CALLS = ("pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "checkpoint", "remat")
# Products that are linear ops but that no datapath here maps.
_UNMAPPED = ("ragged_dot_general", "ragged_dot", "sparse_dot_general")


@dataclasses.dataclass(frozen=True, eq=False)
class Encoding:
  """Codebooks for a model's linear ops: {op name: {'lhs'|'rhs': sorted
  centroids}} (an operand without one stays float), for the model whose graph
  has ``fingerprint`` (``accel.codebooks`` builds them)."""
  fingerprint: str
  books: dict
  label: str = ""


class UnmappedOpError(NotImplementedError):
  """A model holds a linear op the interpreter cannot put on a datapath."""


def bind(eqn, invals: list) -> list:
  """Evaluates one equation as JAX would (``jax.core.eval_jaxpr``'s step)."""
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _eval(graph: Graph, jaxpr, consts, args, on_linear: OnLinear, records: dict) -> list:
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    prim = eqn.primitive.name
    subs = jaxpr_ops.sub_jaxprs(eqn)
    if prim in jaxpr_ops.LINEAR:
      name = graph.names[id(eqn)]
      out, rec = on_linear(name, eqn, invals[0], invals[1])
      outs = [out]
      if rec is not None:
        records[name] = rec
    elif prim in _UNMAPPED:
      raise UnmappedOpError(f"the model runs a '{prim}', a product no datapath here maps "
                            "(only dot_general and conv_general_dilated are)")
    elif not any(jaxpr_ops.has_linear(s) for s in subs):
      outs = bind(eqn, invals)
    elif prim == "scan":
      outs = _scan(graph, eqn, invals, on_linear, records)
    elif prim in _CALLS and len(subs) == 1 and len(_open(subs[0]).invars) == len(invals):
      outs = _eval(graph, _open(subs[0]), getattr(subs[0], "consts", []), invals, on_linear,
                   records)
    else:
      raise UnmappedOpError(f"the model runs linear ops inside a '{prim}', which the datapath "
                            "interpreter does not enter (it maps them at top level, in nested "
                            "calls and in scans); move them out of it")
    for v, val in zip(eqn.outvars, outs):
      env[v] = val
  return [read(v) for v in jaxpr.outvars]


def _open(jaxpr):
  return getattr(jaxpr, "jaxpr", jaxpr)


def _scan(graph, eqn, invals, on_linear, records) -> list:
  p = eqn.params
  nc, ncar = p["num_consts"], p["num_carry"]
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  body = p["jaxpr"]

  def step(carry, x):
    rec: dict = {}
    outs = _eval(graph, body.jaxpr, body.consts, [*consts, *carry, *x], on_linear, rec)
    return outs[:ncar], (outs[ncar:], rec)

  carry, (ys, rec) = jax.lax.scan(step, init, xs, length=p["length"], reverse=p["reverse"],
                                  unroll=p["unroll"])
  records.update(rec)   # stacked over iterations
  return [*carry, *ys]


def evaluate(graph: Graph, params: Any, x: Any, on_linear: OnLinear) -> tuple[Any, dict]:
  """``apply(params, x)`` with every linear op computed by ``on_linear``;
  returns the output pytree and {op name: record} for ops that returned one."""
  leaves = _leaves(graph, params, x)
  records: dict = {}
  outs = _eval(graph, graph.closed.jaxpr, graph.closed.consts, leaves, on_linear, records)
  return jax.tree.unflatten(graph.out_tree, outs), records


def _leaves(graph: Graph, params, x) -> list:
  _structure(graph, params, x)
  p, xl = jax.tree.leaves(params), jax.tree.leaves(x)
  want = [v.aval for v in graph.closed.jaxpr.invars]
  for v, a in zip(p + xl, want):
    if tuple(np.shape(v)) != tuple(a.shape):
      raise ValueError(f"an input of shape {tuple(np.shape(v))} where the traced model had "
                       f"{tuple(a.shape)}: trace the model at this shape (batch included)")
  return p + xl


def snap(v: jax.Array, centroids_sorted: jax.Array) -> jax.Array:
  """Every value replaced by its nearest codebook entry (the encode-decode of
  a datapath; +inf entries pad a codebook and are never chosen)."""
  c = centroids_sorted.astype(v.dtype)
  return c[nearest_sorted(v, c)]



def _recording(name, eqn, lhs, rhs):
  return bind(eqn, [lhs, rhs])[0], (lhs, rhs)


@functools.partial(jax.jit, static_argnums=0)
def _operands(graph, params, x):
  return evaluate(graph, params, x, _recording)[1]


def operands(graph: Graph, params: Any, x_calib: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{op: (lhs, rhs)}: what every linear op multiplies on a calibration batch
  in the float model -- what codebooks are fitted on. Ops inside a scan come
  stacked over its iterations."""
  out = _operands(at(graph, params, x_calib), params, x_calib)
  return {k: (np.asarray(a), np.asarray(b)) for k, (a, b) in out.items()}


def at(graph: Graph, params, x) -> Graph:
  """The graph at ``x``'s shapes (another batch: re-traced, same op names)."""
  _structure(graph, params, x)
  g = graph.at(params, x)
  _leaves(g, params, x)
  return g


def _structure(graph, params, x) -> None:
  if jax.tree.structure(params) != graph.params_tree:
    raise ValueError("params do not have the structure of the traced model's params")
  if jax.tree.structure(x) != graph.x_tree:
    raise ValueError("the input does not have the structure of the traced model's input")


def _encoded(books: dict) -> OnLinear:
  def on_linear(name, eqn, lhs, rhs):
    book = books.get(name, {})
    if "lhs" in book:
      lhs = snap(lhs, book["lhs"])
    if "rhs" in book:
      rhs = snap(rhs, book["rhs"])
    return bind(eqn, [lhs, rhs])[0], None
  return on_linear


@functools.partial(jax.jit, static_argnums=0)
def _run(graph, params, x, books):
  return evaluate(graph, params, x, _encoded(books))[0]


def run(graph: Graph, params: Any, x: Any, enc: Encoding) -> Any:
  """The model with each op's operands encoded to their codebooks and
  multiplied decoded: CodeX's decode-multiply datapath, and RAPIDNN's lookup
  datapath with float accumulation (a table entry is the product of two
  centroids, so the looked-up sum equals the decoded one up to summation
  order). Jitted: one compilation per codebook shape set and input shape;
  any batch size (the graph is re-traced, its op names kept)."""
  if enc.fingerprint != graph.fingerprint:
    raise ValueError(f"these codebooks ({enc.label or 'an encoding'}) were fitted for another "
                     f"model (fingerprint {enc.fingerprint}, this model's {graph.fingerprint})")
  graph.check_ops(enc.books, "codebooks")
  return _run(at(graph, params, x), params, x, enc.books)


def float_run(graph: Graph, params: Any, x: Any) -> Any:
  """The interpreted model with every op in float: equals ``apply(params, x)``."""
  return _run(at(graph, params, x), params, x, {})
