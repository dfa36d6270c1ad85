"""Orbax checkpointing: a step-indexed manager for resumable training, and
single-pytree save/load for finished params (e.g. a distilled or subcloned model).

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import logging
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
    """(step, state) of ``step``, shaped like ``like`` (None: as saved, with
    NumPy leaves); None if there is no checkpoint. Without ``step``: the newest
    checkpoint that reads back -- a corrupted newer one is reported and skipped,
    and the error is raised only if none can be read."""
    target = _abstract(like) if like is not None else None
    read = lambda s: (s, self._mngr.restore(s, args=ocp.args.StandardRestore(target)))
    if step is not None:
      return read(step)
    steps = sorted(self._mngr.all_steps(), reverse=True)
    errors = []
    for s in steps:
      try:
        out = read(s)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        errors.append((s, e))
        logging.warning("checkpoint step %d under %s cannot be read (%s: %s); trying an "
                        "earlier one", s, self.directory, type(e).__name__, e)
        continue
      if errors:
        self._set_aside([e[0] for e in errors])
        logging.warning("resumed from checkpoint step %d; newer step(s) %s were unreadable "
                        "and are kept beside it as <step>.unreadable", s, [e[0] for e in errors])
      return out
    if errors:
      raise RuntimeError(f"no checkpoint under {self.directory} can be read: "
                         + "; ".join(f"step {s}: {type(e).__name__}: {e}" for s, e in errors)
                         ) from errors[0][1]
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step folders out of the manager's view (kept, not
    deleted), so training can write those steps again."""
    for s in steps:
      src = os.path.join(self.directory, str(s))
      dst = f"{src}.unreadable"
      n = 1
      while os.path.exists(dst):
        dst, n = f"{src}.unreadable{n}", n + 1
      os.replace(src, dst)
    self._mngr.reload()

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
