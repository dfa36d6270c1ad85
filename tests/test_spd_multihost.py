"""The sharded LM across real processes: 2 processes x 2 devices (TP=4, gloo)
give the same logits as one process with 4 fake devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import multiprocess
from core.models import lm
from spd_jax import sharding, tp

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("drop", [(False, False), (True, False)])
def test_two_processes_match_one_process_tp4(drop):
  cfg = lm.LMConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
                    d_ff=64, max_seq_len=16)
  params = jax.device_get(lm.init(jax.random.key(0), cfg))
  tokens = np.random.default_rng(0).integers(0, 256, (2, 10)).astype(np.int32)
  mesh = sharding.make_mesh(4)
  local = tp.make_forward(cfg, mesh, tp.SyncPlan(drop))(
      tp.prepare_params(params, cfg, mesh), jnp.asarray(tokens))
  results = multiprocess.launch(
      "tests.mp_workers:tp_logits", 2, local_devices=2, timeout=180,
      args={"params": params, "tokens": tokens, "cfg_kwargs": dataclasses.asdict(cfg),
            "drop": drop, "decode_from": 6})
  for r in results:
    assert r["devices"] == 4
    np.testing.assert_allclose(r["prefill"], local, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(r["decode"], local, atol=1e-5, rtol=1e-5)
