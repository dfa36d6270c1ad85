"""The persistent compilation cache (``core.compile_cache``): a second process
loads what the first compiled; another JAX version, another XLA flag or the
cache switched off compiles afresh. Each run is a fresh interpreter, as a
second ``make reproduce`` would be."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax
if sys.argv[3] != "-":
  jax.__version__ = sys.argv[3]          # stands in for an upgraded JAX
from core import compile_cache
events = []
jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))
path = (compile_cache.enable(sys.argv[1]) if sys.argv[2] == "on" else
        compile_cache.enable() if sys.argv[2] == "default" else compile_cache.disable())
f = jax.jit(lambda x: jax.numpy.tanh(x @ x.T).sum())
f(jax.numpy.ones((64, 32))).block_until_ready()
print(json.dumps({"path": path,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(root, mode="on", version="-", xla_flags="", inherit=None):
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=ROOT)
  for k in [k for k in env if k.startswith(("JAX_COMPILATION_CACHE", "JAX_ENABLE_COMPILATION",
                                              "JAX_PERSISTENT_CACHE"))]:
    del env[k]
  if inherit:
    env["JAX_COMPILATION_CACHE_DIR"] = str(inherit)
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(root), mode, version], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _entries(path):
  return sorted(os.listdir(path)) if path and os.path.isdir(path) else []


def test_second_run_hits_and_a_new_version_flag_or_off_switch_does_not(tmp_path):
  first = _run(tmp_path)
  assert first["hits"] == 0 and first["misses"] >= 1
  assert os.path.dirname(first["path"]) == str(tmp_path) and _entries(first["path"])
  second = _run(tmp_path)
  assert second["hits"] >= 1 and second["misses"] == 0 and second["path"] == first["path"]
  # Another JAX version gets its own folder and compiles afresh.
  other = _run(tmp_path, version="0.0.1.test")
  assert other["path"] != first["path"] and "0.0.1.test" in other["path"]
  assert other["hits"] == 0 and other["misses"] >= 1
  # Another XLA flag is another key in JAX's own hash: a miss, in the same folder.
  before = _entries(first["path"])
  flagged = _run(tmp_path, xla_flags="--xla_backend_optimization_level=1")
  assert flagged["path"] == first["path"] and flagged["hits"] == 0
  assert len(_entries(first["path"])) > len(before)
  # Off: nothing read, nothing written.
  written = _entries(first["path"])
  off = _run(tmp_path, mode="off")
  assert off["path"] is None and off["hits"] == 0 and off["misses"] == 0
  assert _entries(first["path"]) == written


def test_default_folder_is_the_one_a_parent_process_named(tmp_path):
  # A binary launched by the test session (or by another binary) writes where its
  # parent's cache is, not into the clone's .jax_cache, so a fresh clone's test
  # run and a reused clone's see the same (empty) cache.
  parent = tmp_path / "parent"
  got = _run(tmp_path, mode="default", inherit=parent)
  assert got["path"] == str(parent) and _entries(parent)
  assert _run(tmp_path, mode="default", inherit=parent)["hits"] >= 1
