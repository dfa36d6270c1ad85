"""The victim's vulnerability profile: how small the minimal (DeepFool, CW)
perturbations are, and where adversarial points land relative to the benign
class densities of CuRTAIL's last latent module."""

from __future__ import annotations

import jax
import numpy as np

from secure.curtail import modules, victims
from secure.curtail.defences import Defence


def _quantiles(a) -> dict:
  a = np.asarray(a, float)
  return {f"q{q}": float(np.quantile(a, q / 100)) for q in (10, 25, 50, 75, 90)} if len(a) \
      else {}


def profile(v: victims.Victim, cur: Defence, minimal: dict) -> dict:
  """Minimal perturbations (DeepFool, CW) and where adversarial points land
  relative to the benign class densities (last latent module)."""
  spec, arr = cur.spec, cur.params
  lat, layer = arr["latent"][-1], spec.latent_layers[-1]
  nll = jax.jit(lambda xx, ll: modules.latent_score(spec, lat, layer, xx, ll))
  nll_np = lambda xx, ll: np.concatenate([np.asarray(nll(xx[i:i + 500], ll[i:i + 500]))
                                          for i in range(0, len(xx), 500)])
  train = np.sort(nll_np(v.x_train, v.y_train))
  place = {}
  for lbl, (xa, ya, _) in minimal.items():
    if not len(xa):
      continue
    pred = v.predict(xa)
    s_pred, s_true = nll_np(xa, pred), nll_np(xa, ya)
    # % of benign training images less typical of their own class than the
    # adversarial point is of the class it now claims
    pct = 100 * (1 - np.searchsorted(train, s_pred) / len(train))
    place[lbl] = {"median_train_percentile": float(np.median(pct)),
                  "below_1pct": 100 * float(np.mean(pct < 1)),
                  "closer_to_true_class": 100 * float(np.mean(s_true < s_pred)), "n": len(xa)}
  return {"latent_placement": place,
          "minimal": {k: _quantiles(minimal[k][2]) for k in ("deepfool", "cw_l2")
                      if k in minimal},
          "minimal_l2": {k: np.round(np.asarray(minimal[k][2]), 4).tolist()
                         for k in ("deepfool", "cw_l2") if k in minimal}}
