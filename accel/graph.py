"""The linear operations of any JAX model, found in its jaxpr: every
``dot_general`` and ``conv_general_dilated`` that ``apply(params, x)`` runs,
with a stable name, its shapes, its multiplies, and whether one operand is a
stored weight (it depends on ``params`` alone) or both are activations
(attention's Q.K^T and P.V). This is what a datapath replaces and what its
multiply accounting counts (issue 25's first step; ``accel.program``'s hand
op lists cover two model types).

Names are ``<order>_<dot|conv>_<lhs shape>_<rhs shape>`` (order: the op's
place in the traced program, nested calls flattened; shapes at the traced
input): the same for the same model code and input shape, so configurations
and codebooks can refer to them. A graph re-traced at another batch keeps its
names (``Graph.at``); its fingerprint (primitives and stored-weight shapes, in
order) tells one model's configurations from another's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import jax
import numpy as np

from core import jaxpr_ops


@dataclasses.dataclass(frozen=True)
class LinearOp:
  name: str
  primitive: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  multiplies: int           # multiply-accumulates per call, times how often it runs
  weight: bool              # an operand depends on params alone (else activation x activation)
  weight_side: str | None = None   # which operand is the stored weight: 'lhs', 'rhs' or None


def _shape(s) -> str:
  return "x".join(map(str, s)) or "scalar"


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
  """A traced model: its (dead-code-free) jaxpr at one input shape, its linear
  ops in program order, and which equation each op name belongs to. Built by
  ``trace``; ``accel.interpret`` runs it with the ops on a datapath, and
  ``at`` re-traces it for another input shape (another batch) keeping the
  names, so codebooks fitted at one batch serve every batch."""
  apply: Callable
  closed: Any                      # jax ClosedJaxpr of apply(params, x)
  ops: tuple[LinearOp, ...]
  names: dict                      # id(eqn) -> op name
  params_tree: Any
  x_tree: Any
  out_tree: Any
  fingerprint: str                 # of the ops' primitives and stored-weight shapes, batch-free
  _shapes: dict = dataclasses.field(default_factory=dict, repr=False)   # at()'s re-traces

  def check_ops(self, names, what: str) -> None:
    """A clear error when ``names`` (of codebooks, widths) hold ops this graph lacks."""
    known = {o.name for o in self.ops}
    unknown = sorted(set(names) - known)
    if unknown:
      raise ValueError(f"{what} for ops this model does not have: {unknown[:3]} (it has "
                       f"{len(known)} linear ops, e.g. {sorted(known)[:2]}): made for another "
                       "model, or for this one traced at another shape?")

  def at(self, params: Any, x: Any) -> "Graph":
    """This graph re-traced at ``x``'s shapes (cached), its ops keeping this
    graph's names; refused if the model's ops differ there (other than in
    activation shapes)."""
    key = tuple((tuple(np.shape(v)), str(getattr(v, "dtype", ""))) for v in jax.tree.leaves(x))
    if key == tuple((tuple(v.aval.shape), str(v.aval.dtype))
                    for v in self.closed.jaxpr.invars[len(jax.tree.leaves(params)):]):
      return self
    if key not in self._shapes:
      other = trace(self.apply, params, x)
      if other.fingerprint != self.fingerprint:
        raise ValueError("at this input shape the model runs other linear ops (not only other "
                         "activation shapes): trace it at this shape")
      rename = dict(zip((o.name for o in other.ops), (o.name for o in self.ops)))
      ops = tuple(dataclasses.replace(o, name=rename[o.name]) for o in other.ops)
      names = {k: rename[v] for k, v in other.names.items()}
      self._shapes[key] = dataclasses.replace(other, ops=ops, names=names, _shapes={})
    return self._shapes[key]


def _signature(eqn, side: str | None) -> str:
  """An op's primitive, weight side and stored-weight shape: what stays when the batch changes."""
  w = {"lhs": eqn.invars[0], "rhs": eqn.invars[1]}.get(side)
  return f"{eqn.primitive.name}:{side}:{_shape(w.aval.shape) if w is not None else ''}"


def trace(apply: Callable[[Any, Any], Any], params: Any, x: Any) -> Graph:
  """Traces ``apply(params, x)`` (not run; dead code removed, as the compiler
  would) and names its linear ops. ``x`` may be any pytree (MiniLM takes
  (ids, mask)); names carry the shapes at this ``x``."""
  params_leaves, params_tree = jax.tree.flatten(params)
  x_leaves, x_tree = jax.tree.flatten(x)
  closed = jaxpr_ops.closed_jaxpr_of(lambda p, xx: apply(jax.tree.unflatten(params_tree, p),
                                                         jax.tree.unflatten(x_tree, xx)),
                                     params_leaves, x_leaves)
  out_tree = jax.tree.structure(jax.eval_shape(apply, params, x))
  jaxpr = closed.jaxpr
  static_in = [True] * len(params_leaves) + [False] * len(x_leaves)
  ops, names, sig = [], {}, []
  for i, (eqn, times, (lhs_w, rhs_w)) in enumerate(jaxpr_ops.linear_eqns(jaxpr, static_in)):
    lhs, rhs = (tuple(v.aval.shape) for v in eqn.invars[:2])
    prim = "dot" if eqn.primitive.name == "dot_general" else "conv"
    side = "rhs" if rhs_w else "lhs" if lhs_w else None
    op = LinearOp(f"{i:03d}_{prim}_{_shape(lhs)}_{_shape(rhs)}", eqn.primitive.name,
                  lhs, rhs, tuple(eqn.outvars[0].aval.shape),
                  int(round(times * jaxpr_ops.op_flops(eqn) / 2)), lhs_w or rhs_w, side)
    ops.append(op)
    names[id(eqn)] = op.name
    sig.append(_signature(eqn, side))
  fp = hashlib.sha256("|".join(sig).encode()).hexdigest()[:12]
  return Graph(apply, closed, tuple(ops), names, params_tree, x_tree, out_tree, fp)


def linear_ops(apply: Callable[[Any, Any], Any], params: Any, x: Any) -> tuple[LinearOp, ...]:
  """Every linear op of ``apply(params, x)`` in program order."""
  return trace(apply, params, x).ops


def multiplies(ops: tuple[LinearOp, ...]) -> dict[str, int]:
  """Total multiplies: all, those against stored weights, activation x activation."""
  w = sum(o.multiplies for o in ops if o.weight)
  a = sum(o.multiplies for o in ops if not o.weight)
  return {"total": w + a, "weight": w, "activation": a}
