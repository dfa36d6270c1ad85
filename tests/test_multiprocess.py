"""The multi-process harness: real jax.distributed processes on 127.0.0.1 with
gloo collectives; failures and hangs end fast with the worker's own error."""

import os
import socket
import time

import numpy as np
import pytest

from core import multiprocess

pytestmark = pytest.mark.multiprocess


def test_psum_across_two_processes_with_two_devices_each():
  values = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
  results = multiprocess.launch("tests.mp_workers:psum_rows", 2, local_devices=2,
                                args={"values": values}, timeout=120)
  assert [r["process_index"] for r in results] == [0, 1]
  for r in results:
    assert r["device_count"] == 4
    np.testing.assert_allclose(r["sum"][0], values.sum(0), rtol=1e-5)


def test_a_failing_worker_fails_the_launch_fast_with_its_error():
  t0 = time.monotonic()
  with pytest.raises(multiprocess.WorkerError, match=r"(?s)worker 1 of 2.*deliberate failure"):
    multiprocess.launch("tests.mp_workers:fail_on", 2, local_devices=2,
                        args={"process": 1, "values": np.ones((4, 2), np.float32)},
                        timeout=120)
  assert time.monotonic() - t0 < 30  # not the gloo/coordination timeouts


def test_a_hanging_worker_is_killed_at_the_timeout():
  t0 = time.monotonic()
  with pytest.raises(TimeoutError, match="still running"):
    multiprocess.launch("tests.mp_workers:hang", 2, args={"seconds": 600}, timeout=8)
  assert time.monotonic() - t0 < 20


def test_bad_launch_arguments():
  with pytest.raises(ValueError, match="module:function"):
    multiprocess.launch("tests.mp_workers", 2)
  with pytest.raises(ValueError, match="num_processes"):
    multiprocess.launch("tests.mp_workers:psum_rows", 0)


def test_a_port_taken_before_the_coordinator_binds_is_retried(monkeypatch):
  # Hold a port, hand it to the first launch attempt, then free ones: the race
  # free_port() cannot exclude (another process binding the port first).
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  taken.listen()
  ports = iter([taken.getsockname()[1]])
  real = multiprocess.free_port
  monkeypatch.setattr(multiprocess, "free_port", lambda: next(ports, None) or real())
  values = np.arange(6, dtype=np.float32).reshape(2, 3)
  results = multiprocess.launch("tests.mp_workers:psum_rows", 2, args={"values": values},
                                timeout=120)
  np.testing.assert_allclose(results[0]["sum"][0], values.sum(0))
  with pytest.raises(multiprocess.PortTakenError):
    monkeypatch.setattr(multiprocess, "free_port", lambda: taken.getsockname()[1])
    multiprocess.launch("tests.mp_workers:psum_rows", 2, args={"values": values},
                        timeout=120, port_attempts=2)
  taken.close()


def test_launch_removes_its_temporary_folder(monkeypatch, tmp_path):
  monkeypatch.setattr(multiprocess.tempfile, "tempdir", str(tmp_path))
  multiprocess.launch("tests.mp_workers:psum_rows", 1,
                      args={"values": np.ones((1, 2), np.float32)}, timeout=120)
  with pytest.raises(multiprocess.WorkerError):
    multiprocess.launch("tests.mp_workers:fail_on", 1,
                        args={"process": 0, "values": np.ones((1, 2), np.float32)},
                        timeout=120)
  assert not [p for p in os.listdir(tmp_path) if p.startswith("mp_launch_")]
