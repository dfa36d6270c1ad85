"""Bytes each device sends per token for a sync plan: read from the compiled HLO of
the TP forward (prefill and decode separately), and by formula (what the planner
minimises; a test pins the formula to the HLO and both to a hand count).

Per block and token, with hidden size D, N devices and the ring accounting of
``tp.bytes_sent`` (an all-reduce sends 2 (N - 1) / N of its payload, an all-to-all
or all-gather (N - 1) / N of its result):

* a plain float32 sync: 2 (N - 1) / N * 4 D (``bf16`` accounting: 2 D bytes, what a
  bf16 model would send; our model computes in float32);
* a codec sync, two-shot: an all-to-all and an all-gather of the encoded vector,
  2 (N - 1) / N * D * ``compress.payload_bytes_per_element``; one-shot: one
  all-gather of all N encoded vectors, (N - 1) * D * bytes per element;
* a dropped attention sync: nothing (its block's one remaining sync is the MLP's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from core.models import lm
from spd_jax import compress, sharding, tp
from spd_jax.tp import PLAIN, SyncPlan

PLAIN_ACCOUNTING = {"f32": 4, "bf16": 2}  # bytes per value of a plain sync


def sync_bytes(d_model: int, n_devices: int, codec: str, algorithm: str = "two_shot",
               plain_bytes: int = 4) -> float:
  """Bytes one device sends for one token's sync (module docstring)."""
  n = n_devices
  if n == 1:
    return 0.0
  if codec == PLAIN:
    return 2 * (n - 1) / n * plain_bytes * d_model
  bpe = compress.payload_bytes_per_element(codec, d_model // n)
  if algorithm == "one_shot":
    return (n - 1) * d_model * bpe
  compress.check_algorithm(algorithm)
  return 2 * (n - 1) / n * d_model * bpe


def per_token(cfg: lm.LMConfig, plan: SyncPlan, n_devices: int, algorithm: str = "two_shot",
              plain: str = "f32") -> float:
  """Bytes each device sends per token under ``plan`` (formula). ``plain``: how a plain
  sync is counted, ``f32`` (what runs) or ``bf16`` (what a bf16 model would send)."""
  if plan.n_layers != cfg.n_layers:
    raise ValueError(f"sync plan has {plan.n_layers} blocks, model has {cfg.n_layers}")
  if plain not in PLAIN_ACCOUNTING:
    raise ValueError(f"plain accounting must be one of {list(PLAIN_ACCOUNTING)}, got {plain!r}")
  b = lambda c: sync_bytes(cfg.d_model, n_devices, c, algorithm, PLAIN_ACCOUNTING[plain])
  return sum((0.0 if drop else b(a)) + b(m)
             for drop, a, m in zip(plan.drop_attn, plan.attn_codec, plan.mlp_codec))


def measured(cfg: lm.LMConfig, plan: SyncPlan, n_devices: int, *, batch: int = 2,
             prompt_len: int = 16, algorithm: str = "two_shot") -> dict:
  """Bytes each device sends per token, read from the compiled HLO of the cached TP
  forward: ``prefill`` (a ``prompt_len`` prompt) and ``decode`` (one generated token),
  each divided by the tokens the step processes. Needs ``n_devices`` devices."""
  mesh = sharding.make_mesh(n_devices)
  f = tp.make_forward(cfg, mesh, plan, with_cache=True, compressed_algorithm=algorithm)
  params = tp.prepare_params(lm.init(jax.random.key(0), cfg), cfg, mesh)
  cache = tp.init_cache(cfg, mesh, batch, prompt_len + 1)
  out = {}
  for phase, length, pos in (("prefill", prompt_len, 0), ("decode", 1, prompt_len)):
    text = f.lower(params, jnp.zeros((batch, length), jnp.int32), cache,
                   jnp.int32(pos)).compile().as_text()
    out[phase] = tp.bytes_sent(tp.collective_payloads(text), n_devices) / (batch * length)
  return out
