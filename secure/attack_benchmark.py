"""Our JAX attacks against foolbox 3's on the same model, images and
iterations, interleaved: cold (first call, compile included) and warm
(median of ``reps``) seconds, success rates and median perturbation norms.
Foolbox is optional (a test extra): without it the record says so.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from secure import attacks


def _foolbox_attack(fb, name: str, kw: dict):
  """(foolbox attack, epsilons) doing the same work as ours."""
  if name == "fgsm":
    return fb.attacks.FGSM(), kw["eps"]
  if name == "bim":
    steps = kw.get("steps", 10)
    return fb.attacks.LinfBasicIterativeAttack(abs_stepsize=kw["eps"] / steps * 2.5,
                                               steps=steps), kw["eps"]
  if name == "pgd":
    steps = kw.get("steps", 40)
    cls = fb.attacks.L2PGD if kw.get("norm") == "l2" else fb.attacks.LinfPGD
    return cls(abs_stepsize=kw["eps"] / steps * 2.5, steps=steps, random_start=True), kw["eps"]
  if name == "deepfool":
    return fb.attacks.L2DeepFoolAttack(steps=kw.get("steps", 50), overshoot=0.02), None
  if name == "cw_l2":
    return fb.attacks.L2CarliniWagnerAttack(binary_search_steps=kw.get("binary_steps", 6),
                                            steps=kw.get("steps", 200), stepsize=0.01,
                                            initial_const=1.0), None
  raise ValueError(f"no foolbox counterpart for {name!r}")


def run(logits_fn: Callable, x, y, specs: dict[str, tuple[str, dict]], reps: int = 3) -> dict:
  """For each ``label -> (attack, kwargs)``: ours and foolbox's, interleaved."""
  try:
    import foolbox as fb
  except ImportError:
    return {"skipped": "foolbox is not installed (pip install foolbox): no comparison"}
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  model = fb.JAXModel(logits_fn, bounds=(0, 1))
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  out = {"n_images": len(x), "reps": reps}
  for label, (name, kw) in specs.items():
    ours_fn = lambda: attacks.get(name)(logits_fn, x, y, **kw)
    fb_attack, eps = _foolbox_attack(fb, name, kw)
    theirs_fn = lambda: fb_attack(model, xj, yj, epsilons=eps)
    times = {"ours": [], "foolbox": []}
    jax.clear_caches()              # cold = compile included, even if the study ran it
    cold = {}
    res = {}
    for i in range(reps + 1):       # interleaved; the first round is the cold one
      for side, fn in (("ours", ours_fn), ("foolbox", theirs_fn)):
        t0 = time.perf_counter()
        r = jax.block_until_ready(fn()) if side == "foolbox" else fn()
        dt = time.perf_counter() - t0
        if i == 0:
          cold[side], res[side] = dt, r
        else:
          times[side].append(dt)
    ours = res["ours"]
    _, adv, ok = res["foolbox"]
    ok = np.asarray(ok)
    d = np.asarray(adv - xj).reshape(len(x), -1)
    l2, linf = np.linalg.norm(d, axis=1), np.abs(d).max(1)
    med = lambda a, m: float(np.median(a[m])) if m.any() else None
    out[label] = {
        "ours": {"cold_s": cold["ours"], "warm_s": float(np.median(times["ours"])),
                 "success": 100 * float(ours.success.mean()),
                 "median_l2": med(ours.l2, ours.success),
                 "median_linf": med(ours.linf, ours.success)},
        "foolbox": {"cold_s": cold["foolbox"], "warm_s": float(np.median(times["foolbox"])),
                    "success": 100 * float(ok.mean()), "median_l2": med(l2, ok),
                    "median_linf": med(linf, ok)}}
    out[label]["speedup_warm"] = out[label]["foolbox"]["warm_s"] / out[label]["ours"]["warm_s"]
    out[label]["speedup_cold"] = out[label]["foolbox"]["cold_s"] / out[label]["ours"]["cold_s"]
  return out
