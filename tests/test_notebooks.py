"""Every notebook's code cells run top to bottom in a fresh interpreter, so the
notebooks cannot silently rot as the library changes."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  with open(path) as f:
    nb = json.load(f)
  code = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
  env = dict(os.environ, JAX_THREEFRY_PARTITIONABLE="false")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
