"""Megatron-style tensor-parallel LM forward with droppable attention syncs (SPD).

A block normally has two sync points, one all-reduce (``psum``) after the
row-parallel attention out-projection and one after the row-parallel MLP down
projection. An *SPD block* drops the first: device i keeps its partial
attention output O_i, forms Y_i = X + O_i locally, runs its MLP shard on
Norm(Y_i), and a single all-reduce carries both partial sums:

    out = X + psum_i(O_i + Z_i) + b_o + b_down          (residual="sum")
    out = psum_i((X + O_i) / N + Z_i) + b_o + b_down    (residual="mean", ablation)

The attention contribution to the residual stream stays exact; only the MLP's
input is approximate. Row-parallel biases are added once, after the psum.

Shapes inside shard_map are per-device: H/N heads, K/N KV heads, F/N MLP units.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from core.models import check_params, layers, lm
from spd_jax import compress
from spd_jax import heads as heads_lib
from spd_jax import sharding
from spd_jax.sharding import TP

RESIDUAL_MODES = ("sum", "mean")


PLAIN = "plain"  # a sync sent as a plain float psum
# Per-block actions of a plan: the attention sync may be kept, dropped or compressed;
# the MLP sync only kept or compressed (dropping it would let the devices' residual
# streams diverge). Integer codes feed the single-device emulation as traced values.
ATTN_ACTIONS = ("keep", "drop") + compress.CODECS
MLP_ACTIONS = ("keep",) + compress.CODECS
ACTION_CODES = {"keep": 0, "drop": 1, **{c: 2 + i for i, c in enumerate(compress.CODECS)}}


@dataclasses.dataclass(frozen=True)
class SyncPlan:
  """Per block: True where the attention all-reduce is dropped (an SPD block), and
  the payload of each kept sync: ``PLAIN`` or a ``compress`` codec (default all plain).
  A dropped block's one remaining sync (attention + MLP partials) uses ``mlp_codec``."""
  drop_attn: tuple[bool, ...]
  attn_codec: tuple[str, ...] | None = None
  mlp_codec: tuple[str, ...] | None = None

  def __post_init__(self):
    n = len(self.drop_attn)
    object.__setattr__(self, "drop_attn", tuple(bool(d) for d in self.drop_attn))
    for name in ("attn_codec", "mlp_codec"):
      codecs = getattr(self, name)
      codecs = (PLAIN,) * n if codecs is None else tuple(codecs)
      if len(codecs) != n:
        raise ValueError(f"{name} has {len(codecs)} entries for {n} blocks")
      bad = sorted({c for c in codecs if c != PLAIN and c not in compress.CODECS})
      if bad:
        raise ValueError(f"unknown compression codec(s) {bad} in {name}; choose "
                         f"{PLAIN!r} or one of {compress.CODECS}")
      object.__setattr__(self, name, codecs)
    both = [i for i in range(n) if self.drop_attn[i] and self.attn_codec[i] != PLAIN]
    if both:
      raise ValueError(f"blocks {both} drop their attention sync and also compress it")

  @classmethod
  def dense(cls, n_layers: int) -> "SyncPlan":
    return cls((False,) * n_layers)

  @classmethod
  def drop_blocks(cls, n_layers: int, blocks: Sequence[int]) -> "SyncPlan":
    bad = [b for b in blocks if not 0 <= b < n_layers]
    if bad:
      raise ValueError(f"block indices {bad} out of range for {n_layers} blocks")
    return cls(tuple(i in set(blocks) for i in range(n_layers)))

  @classmethod
  def drop_last(cls, n_layers: int, k: int) -> "SyncPlan":
    """Drops the attention syncs of the last ``k`` blocks (the paper's order)."""
    if not 0 <= k <= n_layers:
      raise ValueError(f"cannot drop {k} of {n_layers} blocks")
    return cls.drop_blocks(n_layers, range(n_layers - k, n_layers))

  @classmethod
  def drop_fraction(cls, n_layers: int, fraction: float) -> "SyncPlan":
    return cls.drop_last(n_layers, int(round(fraction * n_layers)))

  @classmethod
  def from_actions(cls, attn: Sequence[str], mlp: Sequence[str] | None = None) -> "SyncPlan":
    """A plan from per-block actions: attention in ``ATTN_ACTIONS``, MLP in ``MLP_ACTIONS``."""
    mlp = ("keep",) * len(attn) if mlp is None else tuple(mlp)
    if len(mlp) != len(attn):
      raise ValueError(f"plan has {len(attn)} attention actions but {len(mlp)} MLP actions")
    if "drop" in mlp:
      raise ValueError("an MLP sync cannot be dropped (the devices' residual streams would "
                       f"diverge); MLP actions are {MLP_ACTIONS}")
    for what, acts, allowed in (("attention", attn, ATTN_ACTIONS), ("MLP", mlp, MLP_ACTIONS)):
      bad = sorted({a for a in acts if a not in allowed})
      if bad:
        raise ValueError(f"unknown {what} action(s) {bad}; choose from {allowed}")
    plain = lambda a: PLAIN if a in ("keep", "drop") else a
    return cls(tuple(a == "drop" for a in attn), tuple(map(plain, attn)), tuple(map(plain, mlp)))

  @property
  def attn_actions(self) -> tuple[str, ...]:
    return tuple("drop" if d else "keep" if c == PLAIN else c
                 for d, c in zip(self.drop_attn, self.attn_codec))

  @property
  def mlp_actions(self) -> tuple[str, ...]:
    return tuple("keep" if c == PLAIN else c for c in self.mlp_codec)

  def codes(self) -> tuple[np.ndarray, np.ndarray]:
    """(attention, MLP) action codes per block (``ACTION_CODES``), for ``emulate``."""
    return (np.array([ACTION_CODES[a] for a in self.attn_actions], np.int32),
            np.array([ACTION_CODES[a] for a in self.mlp_actions], np.int32))

  @property
  def n_layers(self) -> int:
    return len(self.drop_attn)

  @property
  def n_dropped(self) -> int:
    return sum(self.drop_attn)

  @property
  def all_reduces(self) -> int:
    """Syncs per forward pass: two per block, minus one per SPD block."""
    return 2 * self.n_layers - self.n_dropped


def _reducer(codec: str, no_sync: bool, algorithm: str = "two_shot"
             ) -> Callable[[jax.Array], jax.Array]:
  if no_sync:
    return lambda a: a
  if codec == PLAIN:
    return functools.partial(jax.lax.psum, axis_name=TP)
  return functools.partial(compress.compressed_psum, codec=codec, axis_name=TP,
                           algorithm=algorithm)


def tp_block(p: dict, x_BxLxD: jax.Array, pos: jax.Array, cfg: lm.LMConfig,
             kv: dict | None, *, drop_attn_sync: bool, residual: str = "sum",
             no_sync: bool = False, attn_codec: str = PLAIN, mlp_codec: str = PLAIN,
             compressed_algorithm: str = "two_shot") -> tuple[jax.Array, dict | None]:
  """One block on one device's shard (call inside shard_map over ``TP``).

  ``*_codec``: each sync's payload (``PLAIN`` psum or a ``compress`` codec; a
  dropped block's one sync uses ``mlp_codec``), sent by ``compressed_algorithm``.
  ``no_sync`` removes every psum: wrong output, used only as the latency lower bound.
  """
  sync_attn, sync_mlp = (_reducer(c, no_sync, compressed_algorithm)
                         for c in (attn_codec, mlp_codec))
  bo = p["attn"].get("bo", 0.0)
  b_down = p["mlp"].get("b_down", 0.0)
  h = layers.rms_norm(x_BxLxD, p["attn_norm"]["scale"], cfg.norm_eps)
  o_i, new_kv = lm.attention_partial(p["attn"], h, pos, cfg, kv)
  if not drop_attn_sync:
    y = x_BxLxD + sync_attn(o_i) + bo
    z_i = lm.mlp_partial(p["mlp"], layers.rms_norm(y, p["mlp_norm"]["scale"], cfg.norm_eps))
    return y + sync_mlp(z_i) + b_down, new_kv
  y_i = x_BxLxD + o_i + bo  # this device's heads only: the SPD approximation
  z_i = lm.mlp_partial(p["mlp"], layers.rms_norm(y_i, p["mlp_norm"]["scale"], cfg.norm_eps))
  if residual == "sum":
    return x_BxLxD + sync_mlp(o_i + z_i) + bo + b_down, new_kv
  n = jax.lax.axis_size(TP)
  return sync_mlp((x_BxLxD + o_i) / n + z_i) + bo + b_down, new_kv


def _local_forward(params, tokens_BxL, cache, pos, *, cfg, plan, residual, no_sync,
                   compressed_algorithm):
  def block_fn(i, p, x, pos, kv):
    return tp_block(p, x, pos, cfg, kv, drop_attn_sync=plan.drop_attn[i], residual=residual,
                    no_sync=no_sync, attn_codec=plan.attn_codec[i],
                    mlp_codec=plan.mlp_codec[i], compressed_algorithm=compressed_algorithm)
  x, new_cache = lm.run_blocks(params, lm.embed(params, tokens_BxL), pos, cfg, cache, block_fn)
  return lm.unembed(params, x, cfg), new_cache


def _check(cfg: lm.LMConfig, mesh: Mesh, plan: SyncPlan, residual: str) -> None:
  sharding.check_tp_size(cfg, mesh.shape[TP])
  if plan.n_layers != cfg.n_layers:
    raise ValueError(f"sync plan has {plan.n_layers} blocks, model has {cfg.n_layers}")
  if residual not in RESIDUAL_MODES:
    raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")


class TPForward:
  """The jitted TP forward behind a check of its inputs (see ``make_forward``):
  tokens (B, L) integers in [0, vocab), positions within ``max_seq_len`` or the
  cache, a cache for the same batch, and params shaped for the config. ``lower``
  is the jitted function's, for reading the compiled HLO."""

  def __init__(self, jitted: Callable[..., Any], cfg: lm.LMConfig, with_cache: bool):
    self._jitted, self._cfg, self._with_cache = jitted, cfg, with_cache

  def _check(self, params, tokens, cache=None, pos=0) -> None:
    check_params(lm.init, params, self._cfg, "tp forward")
    lm.check_inputs(tokens, self._cfg, cache, pos, "tp forward")

  def __call__(self, params, tokens, *cache_and_pos):
    if self._with_cache != bool(cache_and_pos):
      raise TypeError("this forward was made with with_cache="
                      f"{self._with_cache}: call it as f(params, tokens"
                      f"{', cache, pos' if self._with_cache else ''})")
    self._check(params, tokens, *cache_and_pos)
    return self._jitted(params, tokens, *cache_and_pos)

  def lower(self, *args):
    return self._jitted.lower(*args)


def make_forward(cfg: lm.LMConfig, mesh: Mesh, plan: SyncPlan | None = None, *,
                 residual: str = "sum", with_cache: bool = False, no_sync: bool = False,
                 compressed_algorithm: str = "two_shot") -> TPForward:
  """A jitted TP forward over ``mesh``, with its inputs checked (``TPForward``).

  Without cache: ``f(params, tokens) -> logits``. With cache:
  ``f(params, tokens, cache, pos) -> (logits, cache)`` for prefill and decode.
  ``params`` must be placed by ``prepare_params``; logits come back replicated.
  ``compressed_algorithm``: how the plan's compressed syncs travel (``compress.ALGORITHMS``).
  """
  plan = plan or SyncPlan.dense(cfg.n_layers)
  _check(cfg, mesh, plan, residual)
  compress.check_algorithm(compressed_algorithm)
  cfg = sharding.tp_config(cfg, mesh.shape[TP])  # KV heads replicated when TP > KV heads
  p_specs = sharding.param_specs(jax.eval_shape(lm.init, jax.random.key(0), cfg))
  body = functools.partial(_local_forward, cfg=cfg, plan=plan, residual=residual,
                           no_sync=no_sync, compressed_algorithm=compressed_algorithm)
  # Without syncs the logits differ per device; skip the replication check.
  check_vma = not no_sync
  if with_cache:
    c_specs = sharding.cache_specs(lm.init_cache(cfg, 1, 1))
    f = jax.shard_map(body, mesh=mesh, in_specs=(p_specs, P(), c_specs, P()),
                      out_specs=(P(), c_specs), check_vma=check_vma)
    return TPForward(jax.jit(f), cfg, with_cache)
  f = jax.shard_map(lambda prm, tok: body(prm, tok, None, jnp.asarray(0, jnp.int32))[0],
                    mesh=mesh, in_specs=(p_specs, P()), out_specs=P(), check_vma=check_vma)
  return TPForward(jax.jit(f), cfg, with_cache)


def prepare_params(params: Any, cfg: lm.LMConfig, mesh: Mesh,
                   head_perm: heads_lib.HeadPerm | None = None) -> Any:
  """Applies a head-to-device assignment (see ``heads``) and shards the params.

  A permutation of heads leaves the dense model's function unchanged; under
  SPD it decides which heads' outputs each device's MLP sees. When TP exceeds
  the KV heads, each KV head is then copied to the devices that read it.
  """
  tp = mesh.shape[TP]
  sharding.check_tp_size(cfg, tp)
  if head_perm is not None:
    params = heads_lib.permute_heads(params, cfg, head_perm)
  return sharding.shard_params(sharding.replicate_kv(params, cfg, tp), mesh)


def init_cache(cfg: lm.LMConfig, mesh: Mesh, batch: int, max_len: int | None = None) -> Any:
  """An empty KV cache split over KV heads (replicated ones included) on ``mesh``."""
  cfg = sharding.tp_config(cfg, mesh.shape[TP])
  return sharding.shard_cache(lm.init_cache(cfg, batch, max_len), mesh)


def count_all_reduces(compiled_text: str) -> int:
  """All-reduce ops in compiled HLO text (sync or async-start forms)."""
  n = 0
  for line in compiled_text.splitlines():
    if "=" in line and (" all-reduce(" in line or " all-reduce-start(" in line):
      n += 1
  return n


_COLLECTIVES = ("all-reduce", "all-to-all", "all-gather")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "u64": 8, "s32": 4,
                "u32": 4, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collective_payloads(compiled_text: str) -> list[tuple[str, int]]:
  """(op, result bytes) of every all-reduce / all-to-all / all-gather in compiled HLO
  text (start forms included, done forms skipped): how many bytes each sync moves."""
  out = []
  for line in compiled_text.splitlines():
    if "=" not in line:
      continue
    rhs = line.split("=", 1)[1]
    op = next((c for c in _COLLECTIVES if f" {c}(" in rhs or f" {c}-start(" in rhs), None)
    if op is None:
      continue
    result = rhs.split(f" {op}", 1)[0]  # the result type(s), before the op name
    out.append((op, sum(_DTYPE_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                        for t, dims in _SHAPE.findall(result))))
  return out


def bytes_sent(payloads: list[tuple[str, int]], n_devices: int) -> float:
  """Bytes each device sends for ``collective_payloads``: a ring all-reduce sends
  2 (N - 1) / N of its result, an all-to-all or all-gather (N - 1) / N of it."""
  share = {"all-reduce": 2 * (n_devices - 1) / n_devices}
  return sum(b * share.get(op, (n_devices - 1) / n_devices) for op, b in payloads)
