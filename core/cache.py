"""A JSON file of finished runs, so an interrupted study resumes where it
stopped instead of recomputing (used by the subcloning and RAPIDNN studies)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable


class RunCache:
  """Finished runs in one JSON file, rewritten atomically after each run, so an
  interrupted study resumes where it stopped instead of retraining."""

  def __init__(self, path: str | None, meta: Any = None):
    """``meta`` (JSON-able) describes the study; a file saved under other meta is ignored."""
    self.path, self.meta, self.runs = path, json.loads(json.dumps(meta, default=str)), {}
    if path and os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      if saved.get("meta") == self.meta:
        self.runs = saved["runs"]

  def get(self, key: str, fn: Callable[[], dict]) -> dict:
    if key not in self.runs:
      self.runs[key] = fn()
      if self.path:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
          json.dump({"meta": self.meta, "runs": self.runs}, f, indent=1, default=float)
        os.replace(tmp, self.path)
    return self.runs[key]
