"""Orbax checkpointing: a step-indexed manager for resumable training, and
single-pytree save/load for finished params (e.g. a distilled or subcloned model).

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointManager:
  """Keeps the newest ``max_to_keep`` training states under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: PyTree) -> None:
    self._mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    self._mngr.wait_until_finished()

  def restore(self, like: PyTree | None, step: int | None = None
              ) -> tuple[int, PyTree] | None:
    """(step, state) of ``step`` (default: latest), shaped like ``like`` (None:
    as saved, with NumPy leaves); None if there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    target = _abstract(like) if like is not None else None
    return step, self._mngr.restore(step, args=ocp.args.StandardRestore(target))

  def close(self) -> None:
    self._mngr.close()


def save_pytree(path: str, tree: PyTree) -> None:
  """Atomically writes one pytree (e.g. final params) to the folder ``path``."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), tree, force=True)
  ckptr.wait_until_finished()


def load_pytree(path: str, like: PyTree | None = None) -> PyTree:
  """Reads a pytree written by ``save_pytree``; ``like`` fixes structure and dtypes."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  ckptr = ocp.StandardCheckpointer()
  return ckptr.restore(path, _abstract(like)) if like is not None else ckptr.restore(path)
