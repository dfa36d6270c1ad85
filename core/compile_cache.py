"""A persistent XLA compilation cache for the binaries and the main job, so a
second run of the same study loads its executables instead of compiling them.

One folder per JAX and jaxlib version under a project-local root (``.jax_cache``
at the repository root, ignored by git): a new JAX never reads an old JAX's
entries. Within a folder JAX's own key covers the computation, the compile
options, the backend and the ``XLA_FLAGS``, so a changed flag compiles afresh.
Every compilation is cached (JAX's default keeps only those over one second;
ours are mostly shorter, and many of them).
"""

from __future__ import annotations

import os

import jax
import jaxlib

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")


def version_dir(root: str = ROOT) -> str:
  """The folder this JAX version reads and writes under ``root``."""
  return os.path.join(root, f"jax-{jax.__version__}_jaxlib-{jaxlib.__version__}")


def enable(root: str | None = None) -> str:
  """Turns the persistent cache on (call before the first compilation);
  returns the folder in use: this JAX version's folder under ``root``; with
  ``root`` None, the folder a parent process named in ``JAX_COMPILATION_CACHE_DIR``
  (a binary launching workers, a test session launching binaries, as JAX itself
  would read it), else this version's folder under ``ROOT``."""
  inherited = os.environ.get("JAX_COMPILATION_CACHE_DIR") if root is None else None
  path = inherited or version_dir(ROOT if root is None else root)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # Worker processes this one launches (multi-process benchmarks) read the same
  # settings from the environment.
  os.environ.update(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=path,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return path


def disable() -> None:
  """Turns it off: every compilation happens in this process."""
  jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_compilation_cache_dir", None)
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
