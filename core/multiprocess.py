"""Launch N real JAX processes on 127.0.0.1 and collect what each returns.

Each worker calls ``jax.distributed.initialize`` against a localhost
coordinator, with gloo CPU collectives and ``local_devices`` CPU devices of
its own -- the same code path that runs across machines. The launcher enforces
a timeout and, as soon as one worker fails, kills every worker's process group
and raises with that worker's error, so a dead peer never hangs a test or a
benchmark.

``target`` is ``"package.module:function"``; the function is called in every
worker with the keyword ``args`` and returns something picklable (convert JAX
arrays with ``np.asarray``).
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any


class WorkerError(RuntimeError):
  """A worker process exited with an error (its stderr tail is in the message)."""


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, n: int = 3000) -> str:
  try:
    with open(path, errors="replace") as f:
      return f.read()[-n:]
  except OSError:
    return ""


def _kill_all(procs: list[subprocess.Popen]) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  for p in procs:
    p.wait()


# What a coordinator says when its port was taken between free_port() and its bind.
_PORT_TAKEN = ("Failed to add port to server", "Failed to start RPC server",
               "Address already in use")


class PortTakenError(WorkerError):
  """The coordinator could not bind its port (another process took it first)."""


def launch(target: str, num_processes: int, *, local_devices: int = 1,
           args: dict | None = None, timeout: float = 120.0,
           extra_env: dict[str, str] | None = None, port_attempts: int = 3,
           cpus: list[set[int]] | None = None) -> list[Any]:
  """Runs ``target(**args)`` in ``num_processes`` coordinated JAX processes and
  returns their results in process order. Raises WorkerError on the first
  failure and TimeoutError past ``timeout`` seconds, killing all workers. A
  port taken between choosing it and binding it is retried with a fresh one
  (``port_attempts`` in all); the temporary folder (pickled arguments,
  results, logs) is removed afterwards."""
  if num_processes < 1 or local_devices < 1:
    raise ValueError(f"need num_processes >= 1 and local_devices >= 1, got "
                     f"{num_processes}, {local_devices}")
  if ":" not in target:
    raise ValueError(f"target must be 'module:function', got {target!r}")
  if cpus is not None:
    have = os.sched_getaffinity(0)
    if len(cpus) != num_processes or any(not c or not set(c) <= have for c in cpus):
      raise ValueError(f"cpus must give each of the {num_processes} workers a non-empty set "
                       f"of this machine's cores {sorted(have)}, got {cpus}")
  if port_attempts < 1:
    raise ValueError(f"port_attempts must be >= 1, got {port_attempts}")
  tmp = tempfile.mkdtemp(prefix="mp_launch_")
  try:
    args_path = os.path.join(tmp, "args.pkl")
    with open(args_path, "wb") as f:
      pickle.dump(args or {}, f)
    for attempt in range(port_attempts):
      try:
        return _launch_once(target, num_processes, local_devices, args_path, timeout,
                            extra_env, free_port(), os.path.join(tmp, f"try{attempt}"), cpus)
      except PortTakenError:
        if attempt == port_attempts - 1:
          raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  raise AssertionError("unreachable")


def _launch_once(target: str, num_processes: int, local_devices: int, args_path: str,
                 timeout: float, extra_env: dict[str, str] | None, port: int,
                 tmp: str, cpus: list[set[int]] | None = None) -> list[Any]:
  os.makedirs(tmp)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs, logs = [], []
  for i in range(num_processes):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]), **(extra_env or {}))
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    log = os.path.join(tmp, f"worker_{i}.log")
    logs.append(log)
    cmd = [sys.executable, "-m", "core.multiprocess", target, f"127.0.0.1:{port}",
           str(num_processes), str(i), str(local_devices), args_path,
           os.path.join(tmp, f"result_{i}.pkl")]
    with open(log, "w") as out:
      if cpus:
        env[_CPUS_ENV] = ",".join(map(str, sorted(cpus[i])))
      procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=root, start_new_session=True))
  deadline = time.monotonic() + timeout
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i = failed[0]
        tail = _tail(logs[i])
        err = PortTakenError if i == 0 and any(m in tail for m in _PORT_TAKEN) else WorkerError
        raise err(f"worker {i} of {num_processes} exited with code {codes[i]}:\n{tail}")
      if all(c == 0 for c in codes):
        break
      if time.monotonic() > deadline:
        alive = [i for i, c in enumerate(codes) if c is None]
        raise TimeoutError(f"workers {alive} still running after {timeout:.0f}s; "
                           f"worker {alive[0]} log:\n{_tail(logs[alive[0]])}")
      time.sleep(0.05)
  finally:
    _kill_all(procs)
  results = []
  for i in range(num_processes):
    with open(os.path.join(tmp, f"result_{i}.pkl"), "rb") as f:
      results.append(pickle.load(f))
  return results


_CPUS_ENV = "CORE_MULTIPROCESS_CPUS"


def _worker_main(target: str, coordinator: str, num_processes: str, process_id: str,
                 local_devices: str, args_path: str, result_path: str) -> None:
  import importlib
  if os.environ.get(_CPUS_ENV):
    # Before JAX starts any thread, so XLA's thread pools inherit the affinity.
    os.sched_setaffinity(0, {int(c) for c in os.environ[_CPUS_ENV].split(",")})

  import jax
  jax.config.update("jax_num_cpu_devices", int(local_devices))
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator,
                             num_processes=int(num_processes),
                             process_id=int(process_id))
  module_name, fn_name = target.split(":")
  fn = getattr(importlib.import_module(module_name), fn_name)
  with open(args_path, "rb") as f:
    args = pickle.load(f)
  result = fn(**args)
  tmp = result_path + ".tmp"
  with open(tmp, "wb") as f:
    pickle.dump(result, f)
  os.replace(tmp, result_path)
  jax.distributed.shutdown()


if __name__ == "__main__":
  try:
    _worker_main(*sys.argv[1:])
  except BaseException:  # pylint: disable=broad-except
    import traceback
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip atexit: jax.distributed's shutdown barrier would wait for the very
    # peers that are now stuck waiting for us.
    os._exit(1)
