"""A JSON file of finished runs, so an interrupted study resumes where it
stopped instead of recomputing (used by the subcloning and RAPIDNN studies).

A cache is reused only for the same study: its ``meta`` (the configs, a
fingerprint of the parent weights, the producing module's version string) is
hashed into a fingerprint stored with the runs. A file written under another
fingerprint is moved aside, never overwritten, and the study starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

import jax
import numpy as np


def params_fingerprint(tree: Any) -> str:
  """SHA-256 of a pytree's paths, dtypes, shapes and bytes (e.g. parent weights)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def meta_fingerprint(meta: Any) -> str:
  """SHA-256 of the canonical JSON of ``meta``."""
  canon = json.dumps(meta, sort_keys=True, default=str, separators=(",", ":"))
  return hashlib.sha256(canon.encode()).hexdigest()


class RunCache:
  """Finished runs in one JSON file, rewritten atomically after each run, so an
  interrupted study resumes where it stopped instead of retraining."""

  def __init__(self, path: str | None, meta: Any = None):
    """``meta`` (JSON-able) is everything every run depends on; see the module doc."""
    self.path, self.meta, self.runs = path, json.loads(json.dumps(meta, default=str)), {}
    self.fingerprint = meta_fingerprint(self.meta)
    self.moved_aside: str | None = None
    if path and os.path.exists(path):
      try:
        with open(path) as f:
          saved = json.load(f)
        old = saved.get("fingerprint") or meta_fingerprint(saved.get("meta"))
      except (OSError, ValueError, AttributeError) as e:
        saved, old = None, f"unreadable-{type(e).__name__}"
      if saved is not None and old == self.fingerprint:
        self.runs = saved["runs"]
      else:
        stem, ext = os.path.splitext(path)
        self.moved_aside = f"{stem}.stale-{old[:12]}{ext or '.json'}"
        os.replace(path, self.moved_aside)
        logging.warning("run cache %s was written for another study (fingerprint %s, now %s); "
                        "kept it as %s and starting afresh", path, old[:12],
                        self.fingerprint[:12], self.moved_aside)

  def get(self, key: str, fn: Callable[[], dict]) -> dict:
    if key not in self.runs:
      self.runs[key] = fn()
      if self.path:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
          json.dump({"fingerprint": self.fingerprint, "meta": self.meta, "runs": self.runs},
                    f, indent=1, default=float)
        os.replace(tmp, self.path)
    return self.runs[key]
