"""The project's hot paths as timed units of work, each with the FLOPs or bytes
it must do, so ``bench.study`` can set its achieved rate against this machine's
roof (``bench.roofline``).

A hot path is built once (inputs made, function compiled: ``cold_s``) and then
called repeatedly by the study, interleaved with the roofline probes. FLOPs
are matmul/conv FLOPs counted from the path's jaxpr (``bench.flops``) unless a
while loop hides the trip count (k-means: one iteration's count times the
iterations run). Bytes are XLA's own estimate of one call's memory traffic
(``cost_analysis()['bytes accessed']``), for the paths that do no matmul work.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import flops as flops_lib
from bench import roofline


@dataclasses.dataclass
class HotPath:
  name: str
  run: Callable[[], object]     # one unit of work; outputs are blocked on by the timer
  flops: float                  # matmul/conv FLOPs per call (0: judged by bytes)
  bytes: float                  # XLA's bytes accessed per call
  roof: str                     # "matmul" or "memory": which roof judges it
  unit: str                     # what one call is, in words
  cold_s: float = 0.0           # first call, compilation included
  note: str = ""
  # the function and arguments whose jaxpr the FLOPs were counted from: the
  # study times its matmuls alone (``roofline.linear_ops_alone``), the path's ceiling
  traced: tuple[Callable, tuple] | None = None


def _bytes(jitted, *args) -> float:
  ca = jitted.lower(*args).compile().cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float((ca or {}).get("bytes accessed", 0.0))


def lm_train_step(batch: int = 16) -> HotPath:
  """One AdamW step of the 16-block SPD study model (``spd_jax.study.DEEP``'s
  recipe: d=128, 8 heads, SwiGLU 384, sequences of 128 bytes)."""
  from core import train as train_lib
  from core.models import lm
  from spd_jax import study
  cfg = study.DEEP.model
  params = lm.init(jax.random.key(0), cfg)
  step = train_lib.make_train_step(functools.partial(lm.loss, cfg=cfg), has_clip=True)
  state = {"params": params, "opt_state": train_lib._layout(True).init(params),
           "step": jnp.int32(0)}
  tokens = jax.random.randint(jax.random.key(1), (batch, cfg.max_seq_len + 1), 0, 256)
  b = {"tokens": tokens}
  hp = {"lr": np.float32(1e-3), "wd": np.float32(0.01), "clip": np.float32(1.0)}
  n = flops_lib.flops(step, state, b, hp)
  cold = roofline.timed(lambda: step(state, b, hp))
  return HotPath("LM training step", lambda: step(state, b, hp), n, _bytes(step, state, b, hp),
                 "matmul", f"{batch} x {cfg.max_seq_len} tokens, 16 blocks d=128", cold,
                 traced=(step, (state, b, hp)))


def tp_forward(tp: int = 2, batch: int = 8) -> HotPath | None:
  """The shard_map TP forward (dense plan) of the same model over ``tp`` devices
  of this process; FLOPs are the whole forward's (all devices share the cores)."""
  if jax.device_count() < tp:
    return None
  from core.models import lm
  from spd_jax import sharding, study
  from spd_jax import tp as tp_lib
  cfg = study.DEEP.model
  mesh = sharding.make_mesh(tp)
  params = tp_lib.prepare_params(lm.init(jax.random.key(0), cfg), cfg, mesh)
  tokens = sharding.replicate(np.zeros((batch, cfg.max_seq_len), np.int32), mesh)
  fwd = tp_lib.make_forward(cfg, mesh)
  n = flops_lib.flops(functools.partial(lm.apply, cfg=cfg), lm.init(jax.random.key(0), cfg),
                      jnp.zeros((batch, cfg.max_seq_len), jnp.int32))
  cold = roofline.timed(lambda: fwd(params, tokens))
  return HotPath(f"TP forward (TP={tp}, fake devices)", lambda: fwd(params, tokens), n, 0.0,
                 "matmul", f"{batch} x {cfg.max_seq_len} tokens", cold,
                 note="the devices share this machine's cores (no ceiling: its devices run at "
                      "once, a one-op-at-a-time replay is not its limit)")


def omp(n: int = 4096, features: int = 64, atoms: int = 256, n_nonzero: int = 8) -> HotPath:
  """CLEANN's batched OMP (``secure.sparse``): ``n`` signals, fixed sparsity."""
  from secure import sparse
  rng = np.random.default_rng(0)
  d = rng.standard_normal((atoms, features)).astype(np.float32)
  d = jnp.asarray(d / np.linalg.norm(d, axis=1, keepdims=True))
  x = jnp.asarray(rng.standard_normal((n, features)), jnp.float32)
  tol = jnp.float32(-1.0)
  f = functools.partial(sparse._omp, n_nonzero=n_nonzero)
  traced = (lambda x, d, t: sparse.omp_traced(x, d, n_nonzero, t), (x, d, tol))
  cnt = flops_lib.flops(traced[0], *traced[1])
  cold = roofline.timed(lambda: f(x, d, tol=tol))
  return HotPath("batched OMP (CLEANN)", lambda: f(x, d, tol=tol), cnt, 0.0, "matmul",
                 f"{n} signals, {features} features, {atoms} atoms, {n_nonzero} nonzeros", cold,
                 traced=traced)


def kmeans(n: int = 20000, dim: int = 16, k: int = 64) -> HotPath:
  """``accel.kmeans`` on ``n`` points in ``dim`` dimensions; FLOPs: the
  assignment matmul (2 N k D per iteration, N padded as the kernel runs it)
  times the iterations run, seeding left out."""
  from accel import kmeans as km
  x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
  t0 = time.perf_counter()
  iters = km.kmeans(x, k, seed=0).n_iter    # returns host arrays: finished when it returns
  cold = time.perf_counter() - t0
  n_pad = max(4096, 1 << (n - 1).bit_length())
  return HotPath("k-means (multi-D)", lambda: km.kmeans(x, k, seed=0).centroids,
                 2.0 * n_pad * k * dim * (iters + 1), 0.0, "matmul",
                 f"{n} x {dim}, k={k}, {iters} iterations", cold,
                 note="seeding and host transfers included in the time, not the FLOPs")


def pgd(batch: int = 256, steps: int = 20) -> HotPath:
  """``secure.attacks.pgd`` on the project's MNIST CNN (random weights: the work
  does not depend on them): ``steps`` gradient steps on ``batch`` images."""
  from core.models import cnn
  from secure import attacks
  cfg = cnn.CNNConfig(input_shape=(28, 28, 1), num_classes=10)
  params = cnn.init(jax.random.key(0), cfg)
  logits_fn = jax.tree_util.Partial(lambda x, p: cnn.apply(p, x, cfg), p=params)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, 28, 28, 1)), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  attack = lambda x: attacks._pgd(logits_fn, x, y, 0.1, 0.01, steps, "linf", jax.random.key(0))
  cnt = flops_lib.flops(attack, x)
  cold = roofline.timed(lambda: attack(x))
  return HotPath("PGD attack (CNN)", lambda: attack(x), cnt, 0.0, "matmul",
                 f"{batch} images x {steps} steps", cold, traced=(attack, (x,)))


def _cnn_codebook(batch: int):
  """The MNIST CNN (random weights: the work does not depend on them), its op
  list, a 16 x 16-cluster codebook fitted on ``batch`` uniform images, and them."""
  from accel import program, rapidnn as rp
  from core.models import cnn
  cfg = cnn.CNNConfig(input_shape=(28, 28, 1), num_classes=10)
  params = cnn.init(jax.random.key(0), cfg)
  ops = program.program("cnn", cfg)
  x = np.random.default_rng(0).uniform(size=(batch, 28, 28, 1)).astype(np.float32)
  cb = rp.build(params, ops, x, rp.RapidConfig(u=16, w=16, calib_points=4096))
  return cfg, params, ops, cb, jnp.asarray(x)


def rapidnn(batch: int = 64) -> HotPath:
  """RAPIDNN's lookup datapath on the MNIST CNN (16 x 16 clusters): no
  multiplies, so it is judged by its memory traffic (XLA's estimate)."""
  from accel import rapidnn as rp
  from core.models import cnn
  cfg, params, ops, cb, xj = _cnn_codebook(batch)
  fn = lambda: rp._emulate(cb, xj, ops, None, 4)
  nbytes = _bytes(jax.jit(lambda cb, x: rp._emulate(cb, x, ops, None, 4)), cb, xj)
  cold = roofline.timed(fn)
  macs = flops_lib.flops(lambda x: cnn.apply(params, x, cfg), xj) / 2
  return HotPath("RAPIDNN lookup emulator (CNN)", fn, 0.0, nbytes, "memory",
                 f"{batch} images, {macs / batch / 1e6:.2f} M lookups each", cold)


def codex(batch: int = 64) -> HotPath:
  """CodeX's encoded datapath on the MNIST CNN (4-bit weights and activations):
  decode, multiply-accumulate, re-encode; judged by its matmul/conv FLOPs."""
  from accel.codex import encoding
  _, _, ops, cb, xj = _cnn_codebook(batch)
  emulate = lambda x: encoding._emulate(cb, x, ops)
  cnt = flops_lib.flops(emulate, xj)
  cold = roofline.timed(lambda: emulate(xj))
  return HotPath("CodeX encoded datapath (CNN, 4 bits)", lambda: emulate(xj), cnt, 0.0, "matmul",
                 f"{batch} images", cold, traced=(emulate, (xj,)))


def _curtail(batch: int, reduced: int):
  """CuRTAIL's fused MRR defender at its defaults on the paper's MNIST MLP
  (784-300-100-10): two latent modules (the last two hidden layers, PCA to
  ``reduced`` dimensions, one Gaussian per class), the class-conditional input
  module (8x8 patches, 64 atoms, OMP with 4 nonzeros, the victim run again on
  the denoised image) and the label-free residual module (4x4 patches, 32
  atoms, 3 nonzeros), as (spec, arrays, images). Arrays are random of the
  fitted shapes: the work does not depend on their values (OMP runs a fixed
  number of steps)."""
  from core.models import mlp
  from secure.classifier import from_core
  from secure.curtail import input_defender, modules, residual
  cfg = mlp.MLPConfig(input_shape=(28, 28, 1), num_classes=10)
  clf = from_core("mlp", cfg)
  params = mlp.init(jax.random.key(0), cfg)
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  icfg, rcfg = input_defender.InputDefenderConfig(), residual.ResidualConfig()
  lats = [{"net": params, "mean": f32(w), "comps": f32(w, reduced),
           "means": f32(10, reduced), "prec": jnp.tile(jnp.eye(reduced), (10, 1, 1)),
           "logdet": f32(10)} for w in cfg.hidden]
  arr = {"victim": params, "latent": lats,
         "dicts": [unit(f32(10, icfg.dictionary.n_atoms, icfg.patch.size ** 2))],
         "residual": [{"dict": unit(f32(rcfg.dictionary.n_atoms, rcfg.patch.size ** 2)),
                       "scale": jnp.ones((28, 28, 1), jnp.float32)}]}
  spec = modules.Spec(clf, clf.layers[-2:], icfg.patch, icfg.dictionary.n_nonzero, 1, rcfg, 1)
  return spec, arr, jnp.asarray(rng.uniform(size=(batch, 28, 28, 1)), jnp.float32)


def curtail_defender(batch: int = 500, reduced: int = 64) -> HotPath:
  """CuRTAIL's fused MRR defender (``secure.curtail.modules.scores``), all
  modules in one call (``_curtail``)."""
  from secure.curtail import modules
  spec, arr, x = _curtail(batch, reduced)
  fn = lambda: modules.scores(spec, arr, x)
  traced = (lambda a, x: modules.scores_traced(spec, a, x), (arr, x))
  cnt = flops_lib.flops(traced[0], *traced[1])
  cold = roofline.timed(fn)
  return HotPath("CuRTAIL MRR defender (MNIST MLP)", fn, cnt, 0.0, "matmul",
                 f"{batch} images, {len(spec.names)} modules", cold,
                 note="OMP over 36 + 169 patches per image; random arrays of the fitted shapes",
                 traced=traced)

BUILDERS: dict[str, Callable[[], HotPath | None]] = {
    "lm_train_step": lm_train_step, "tp_forward": tp_forward, "omp": omp, "kmeans": kmeans,
    "pgd": pgd, "rapidnn": rapidnn, "codex": codex,
    "curtail_defender": curtail_defender}
