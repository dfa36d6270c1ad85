"""Training loop: learning happens, and resume after interruption (in-process
and a real SIGKILL of the training binary) reaches the same parameters."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core import checkpoint, data
from core.models import mlp
from core.recipes import train_classifier
from core.train import ConfigMismatchError, TrainConfig, make_optimizer, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_problem():
  ds = data.load("digits")
  cfg = mlp.MLPConfig(input_shape=(8, 8, 1), hidden=(32,))
  apply_fn = jax.jit(mlp.apply, static_argnums=2)

  def loss_fn(params, batch):
    logits = mlp.apply(params, batch["x"], cfg)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return ce, {"loss": ce}

  return ds, cfg, loss_fn, apply_fn


def test_training_learns_digits():
  tcfg = TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10)
  res = train_classifier("digits", "mlp", tcfg, progress=False, hidden=(32,))
  assert res.metrics["accuracy"] > 0.9  # chance is 0.1
  losses = [r["loss"] for r in res.history if r["split"] == "train"]
  assert losses[-1] < 0.5 * losses[0]


def test_training_learns_digits_on_the_default_prng():
  # conftest switches to the non-partitionable threefry for compile speed; users
  # run JAX's default, so one end-to-end check runs under it.
  with jax.threefry_partitionable(True):
    tcfg = TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=10, log_every=10, seed=1)
    res = train_classifier("digits", "mlp", tcfg, progress=False, hidden=(32,))
  assert res.metrics["accuracy"] > 0.9


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
  ds, cfg, loss_fn, _ = _digits_problem()
  tcfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup_steps=5, ckpt_every=10,
                     log_every=5)
  batch_fn = lambda s: data.image_batch(ds, 16, 0, s)
  p0 = mlp.init(jax.random.key(0), cfg)
  ref = train(loss_fn, p0, batch_fn, tcfg, progress=False)

  wd = str(tmp_path / "run")
  first = train(loss_fn, p0, batch_fn, tcfg, workdir=wd, progress=False, stop_after=17)
  assert first.resumed_from is None
  second = train(loss_fn, p0, batch_fn, tcfg, workdir=wd, progress=False)
  assert second.resumed_from == 10  # the last checkpoint before the stop at 17
  chex.assert_trees_all_equal(second.params, ref.params)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f]
  assert steps == sorted(steps) and len(steps) == len(set(steps)) == 6  # 5,10,...,30
  # The unfinished part of the first run did not change what the second logged.
  assert [r["loss"] for r in second.history] == pytest.approx(
      [r["loss"] for r in ref.history], rel=1e-6)


def test_resuming_a_finished_run_returns_its_params(tmp_path):
  ds, cfg, loss_fn, apply_fn = _digits_problem()
  tcfg = TrainConfig(steps=10, batch_size=8, warmup_steps=1, ckpt_every=5)
  batch_fn = lambda s: data.image_batch(ds, 8, 0, s)
  p0 = mlp.init(jax.random.key(0), cfg)
  a = train(loss_fn, p0, batch_fn, tcfg, workdir=str(tmp_path), progress=False)
  b = train(loss_fn, p0, batch_fn, tcfg, workdir=str(tmp_path), progress=False,
            eval_fn=lambda p: {"acc": jnp.mean(apply_fn(p, ds.x_test, cfg).argmax(-1) == ds.y_test)})
  assert b.resumed_from == 10 and "acc" in b.final_eval
  chex.assert_trees_all_equal(a.params, b.params)


def test_weight_decay_skips_vectors():
  tcfg = TrainConfig(steps=10, lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=0)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  opt = make_optimizer(tcfg)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  # Step 0 of the schedule has lr = peak (no warmup); only the matrix decays.
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], 0.0)


def test_bad_train_config_is_rejected():
  with pytest.raises(ValueError, match="warmup_steps"):
    TrainConfig(steps=10, warmup_steps=20)
  with pytest.raises(ValueError, match="lr"):
    TrainConfig(lr=0.0)


def test_pytree_checkpoint_roundtrip_is_bit_exact(tmp_path):
  tree = {"a": jax.random.normal(jax.random.key(0), (3, 4)), "b": {"c": jnp.arange(5)}}
  checkpoint.save_pytree(str(tmp_path / "p"), tree)
  chex.assert_trees_all_equal(checkpoint.load_pytree(str(tmp_path / "p"), like=tree), tree)
  with pytest.raises(FileNotFoundError):
    checkpoint.load_pytree(str(tmp_path / "missing"))


def _run_binary(workdir, steps=60, kill_after_ckpt=None):
  cmd = [sys.executable, "-m", "experiments.train_classifier", "--dataset=digits",
         "--model=mlp", f"--steps={steps}", "--batch_size=16", "--ckpt_every=20",
         f"--workdir={workdir}"]
  env = dict(os.environ, JAX_THREEFRY_PARTITIONABLE="false")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)
  if kill_after_ckpt is None:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()[-2000:]
    return
  ckpt = os.path.join(workdir, "checkpoints", str(kill_after_ckpt))
  deadline = time.monotonic() + 120
  while not os.path.exists(ckpt) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert os.path.exists(ckpt), "the run never wrote its first checkpoint"


def test_sigkilled_binary_resumes_to_the_same_result(tmp_path):
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  _run_binary(ref)
  _run_binary(killed, kill_after_ckpt=20)
  assert not os.path.exists(os.path.join(killed, "summary.json"))  # really cut short
  _run_binary(killed)
  (step_a, a), (step_b, b) = (checkpoint.CheckpointManager(os.path.join(d, "checkpoints"))
                              .restore(None) for d in (ref, killed))
  assert step_a == step_b == 60
  chex.assert_trees_all_equal(a["params"], b["params"])
  with open(os.path.join(ref, "summary.json")) as fa, open(os.path.join(killed, "summary.json")) as fb:
    assert json.load(fa)["metrics"]["accuracy"] == json.load(fb)["metrics"]["accuracy"]


def test_binary_refuses_a_changed_config_unless_restarted(tmp_path):
  wd = str(tmp_path / "run")
  _run_binary(wd, steps=20)
  cmd = [sys.executable, "-m", "experiments.train_classifier", "--dataset=digits", "--model=mlp",
         "--steps=10", "--batch_size=16", "--ckpt_every=20", f"--workdir={wd}"]
  env = dict(os.environ, JAX_THREEFRY_PARTITIONABLE="false")
  refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert refused.returncode != 0
  assert "train.steps: saved 20, now 10" in refused.stderr and "--restart" in refused.stderr
  ok = subprocess.run(cmd + ["--restart"], cwd=ROOT, env=env, capture_output=True, text=True,
                      timeout=120)
  assert ok.returncode == 0, ok.stderr[-2000:]
  step, _ = checkpoint.CheckpointManager(os.path.join(wd, "checkpoints")).restore(None)
  assert step == 10


def test_recipe_resumed_after_its_last_step_keeps_measured_throughput(tmp_path):
  tcfg = TrainConfig(steps=20, batch_size=16, warmup_steps=2, ckpt_every=10)
  first = train_classifier("digits", "mlp", tcfg, workdir=str(tmp_path), progress=False,
                           hidden=(16,))
  again = train_classifier("digits", "mlp", tcfg, workdir=str(tmp_path), progress=False,
                           hidden=(16,))
  assert np.isfinite(first.metrics["examples_per_sec"])
  assert again.metrics["examples_per_sec"] == first.metrics["examples_per_sec"]
  assert again.metrics["accuracy"] == first.metrics["accuracy"]


def test_resume_refuses_a_changed_config_and_restart_starts_over(tmp_path):
  ds, cfg, loss_fn, _ = _digits_problem()
  batch_fn = lambda s: data.image_batch(ds, 16, 0, s)
  p0 = mlp.init(jax.random.key(0), cfg)
  tcfg = TrainConfig(steps=20, batch_size=16, lr=1e-2, warmup_steps=2, ckpt_every=10)
  wd = str(tmp_path / "run")
  train(loss_fn, p0, batch_fn, tcfg, workdir=wd, progress=False)
  # Fewer steps would otherwise hand back the step-20 params; another lr would just continue.
  for changed, field in ((TrainConfig(steps=10, batch_size=16, lr=1e-2, warmup_steps=2), "steps"),
                         (TrainConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=2), "lr")):
    with pytest.raises(ConfigMismatchError, match=f"train.{field}: saved"):
      train(loss_fn, p0, batch_fn, changed, workdir=wd, progress=False)
  with pytest.raises(ConfigMismatchError, match="run.model: saved None, now .other."):
    train(loss_fn, p0, batch_fn, tcfg, workdir=wd, progress=False, run_meta={"model": "other"})
  # Logging cadence is bookkeeping, not identity: resuming with it changed is fine.
  same = train(loss_fn, p0, batch_fn, TrainConfig(**{**tcfg.__dict__, "log_every": 7}),
               workdir=wd, progress=False)
  assert same.resumed_from == 20
  short = TrainConfig(steps=10, batch_size=16, lr=1e-2, warmup_steps=2, ckpt_every=10)
  fresh = train(loss_fn, p0, batch_fn, short, workdir=wd, progress=False, restart=True)
  ref = train(loss_fn, p0, batch_fn, short, progress=False)
  assert fresh.resumed_from is None
  chex.assert_trees_all_equal(fresh.params, ref.params)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  ds, cfg, loss_fn, _ = _digits_problem()
  batch_fn = lambda s: data.image_batch(ds, 16, 0, s)
  p0 = mlp.init(jax.random.key(0), cfg)
  tcfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup_steps=2, ckpt_every=10)
  ref = train(loss_fn, p0, batch_fn, tcfg, progress=False)
  wd = str(tmp_path / "run")
  train(loss_fn, p0, batch_fn, tcfg, workdir=wd, progress=False, stop_after=20)
  latest = os.path.join(wd, "checkpoints", "20")
  assert os.path.isdir(latest)
  for root, _, files in os.walk(latest):  # truncate every file of the newest step
    for name in files:
      with open(os.path.join(root, name), "w") as f:
        f.write("{not json")
  with caplog.at_level("WARNING"):
    res = train(loss_fn, p0, batch_fn, tcfg, workdir=wd, progress=False)
  assert res.resumed_from == 10
  assert "step 20" in caplog.text and "cannot be read" in caplog.text
  assert os.path.isdir(latest + ".unreadable")  # set aside, not deleted
  chex.assert_trees_all_equal(res.params, ref.params)


@pytest.mark.parametrize("kwargs, match", [({"log_every": 0}, "log_every"),
                                           ({"ckpt_every": 0}, "ckpt_every"),
                                           ({"lr": float("nan")}, "lr"),
                                           ({"lr": float("inf")}, "lr"),
                                           ({"eval_every": -1}, "eval_every"),
                                           ({"grad_clip": float("nan")}, "grad_clip")])
def test_train_config_rejects_values_that_would_fail_later(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**kwargs)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_shared_compile_step_equals_the_optax_recipe(clip):
  """``train``'s step (hyperparameters traced, one compilation for every recipe)
  against ``make_optimizer``, the plain optax AdamW+clip+warmup-cosine: the same
  parameters after 6 steps with large gradients (clipping active), and the same
  optimiser-state layout, so checkpoints of either restore into the other."""
  from core import train as train_mod
  cfg = TrainConfig(steps=6, lr=0.05, warmup_steps=2, weight_decay=0.3, grad_clip=clip)
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 3, "b": jnp.ones((3,))}
  def loss_fn(p, batch):
    loss = jnp.sum((batch["x"] @ p["w"] + p["b"]) ** 2) * 50.0
    return loss, {"loss": loss}
  batch = lambda s: {"x": jnp.full((4, 2), 0.5 + s)}
  opt = make_optimizer(cfg)
  ref, ref_state = params, opt.init(params)
  for s in range(cfg.steps):
    g = jax.grad(lambda p: loss_fn(p, batch(s))[0])(ref)
    upd, ref_state = opt.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, upd)
  got = train(loss_fn, params, batch, cfg, progress=False).params
  chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-7)
  assert not np.allclose(ref["w"], params["w"])
  layout = train_mod._layout(clip > 0).init(params)
  assert jax.tree_util.tree_structure(layout) == jax.tree_util.tree_structure(opt.init(params))
  # A second recipe with the same loss function reuses the compiled step.
  n = train_mod.make_train_step(loss_fn, clip > 0)._cache_size()
  train(loss_fn, params, batch, dataclasses.replace(cfg, lr=0.01, steps=4, warmup_steps=0),
        progress=False)
  assert train_mod.make_train_step(loss_fn, clip > 0)._cache_size() == n
