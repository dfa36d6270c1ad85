"""The compilation-cache flags every binary shares (``core.compile_cache``):
on by default in the project's ``.jax_cache``; ``--nocompile_cache`` compiles
everything afresh."""

from absl import flags

from core import compile_cache

_ON = flags.DEFINE_bool("compile_cache", True, "Keep compiled executables in a persistent "
                        "cache, one folder per JAX version, and reuse them on the next run.")
_DIR = flags.DEFINE_string("compile_cache_dir", None,
                           "Root folder of the persistent compilation cache (default: the "
                           "folder JAX_COMPILATION_CACHE_DIR names, set by a parent process "
                           "such as the test session; else .jax_cache at the repo root).")


def setup() -> str | None:
  """Applies the flags (call at the start of ``main``); returns the folder in use."""
  if not _ON.value:
    compile_cache.disable()
    return None
  return compile_cache.enable(_DIR.value)
