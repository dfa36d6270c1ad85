"""The CLEANN shield: analyzers combined through calibrated p-values,
thresholds from a benign validation split, label recovery by a chain of
reconstructions that stops where the trigger is gone.

Analyzers (modules): the input analyzer (DCT patch dictionary, worst patch;
``analyzers``), the pixel envelope (image-wide evidence; ``envelope``) and one
latent dictionary per analyzed hidden layer. Each module's benign validation
scores calibrate its p-value (``secure.combine``); the rule (OR: one common
per-module level; Fisher: evidence adds up) and its threshold at the target
FPR are set on the same validation images, so the validation FPR holds by
construction and no analyzer's low-FPR lead is capped by another's scale
(the issue-11 shield divided scores by a benign percentile and took the
larger: one weak analyzer's tail then set the threshold for both).

Recovery, per flagged input, a chain of reconstructions, each taken only where
the one before did not remove the trigger (the victim still gives the flagged
input's label): the patch reconstruction (excises what the patch dictionary
cannot explain), then the envelope-clipped image, then the latent side
(``purify``: down the latent dictionary's residual, from the last input-side
reconstruction), so recovery does not rest on the analyzer that failed.
Chosen on the seed-0 development victims over routing by which analyzer fired
(the patch one at the OR level: on Fashion-MNIST the latent modules fire
first on most patch-triggered images and the clipped image kept the trigger,
RA 64.8% vs 83.2%) and over the reconstruction the shield scores lowest. (A
re-check by the shield itself was tried first: on Fashion-MNIST blend the
clipped images' latent scores fall below the threshold while 85% still carry
the backdoor's label.) The chain does not depend on the FPR.
``recover_paths`` gives every path's labels, so the study reports RA per
path.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Hashable

import jax
import numpy as np

from secure import combine, detection, sparse
from secure.classifier import Classifier
from secure.cleann import analyzers, envelope, purify

FPRS = (0.01, 0.05)
PATHS = ("patch", "envelope", "purify", "envelope+purify", "routed")


@dataclasses.dataclass(frozen=True)
class ShieldConfig:
  patch: analyzers.PatchConfig = analyzers.PatchConfig(size=8, stride=4)
  input_dict: sparse.DictConfig = sparse.DictConfig(n_atoms=128, n_nonzero=4, iters=10)
  latent_dict: sparse.DictConfig | None = sparse.DictConfig(n_atoms=128, n_nonzero=12, iters=10)
  latent_layers: tuple[Hashable, ...] | None = None   # None: every hidden layer the model names
  envelope: envelope.EnvelopeConfig | None = envelope.EnvelopeConfig()
  rule: str = "or"
  purify: purify.PurifyConfig | None = purify.PurifyConfig()
  purify_layer: Hashable = -2     # falls back to the last analyzed layer if absent
  recovery_tol: float | None = 0.6  # squared DCT-patch residual at which recovery's OMP stops
  fit_fraction: float = 1 / 2     # of the defender's images; the rest set thresholds
  # Chosen on the development victims (seed 0; docs/RESULTS.md): 128 latent atoms
  # at sparsity 12 and recovery_tol 0.6 (issue 11); the envelope, the purification
  # layer and radius, the OR (mnist5k blend/SIG tie at 100% TPR at 1% FPR;
  # Fashion-MNIST blend 100% vs 15%, SIG 89% vs 20%: the uninformative modules'
  # evidence dilutes the one that sees the trigger) and the 1/2 split (issue 24:
  # at 1% FPR, 200 validation images put the threshold at their third largest score).

  def __post_init__(self):
    if self.rule not in combine.RULES:
      raise ValueError(f"unknown rule {self.rule!r}; have {combine.RULES}")
    if not 0 < self.fit_fraction < 1:
      raise ValueError(f"fit_fraction must lie in (0, 1), got {self.fit_fraction}")


@functools.lru_cache(maxsize=None)
def jit_apply(clf: Classifier):
  return jax.jit(clf.apply)


@functools.lru_cache(maxsize=None)
def _jit_features(clf: Classifier, layer: Hashable):
  return jax.jit(functools.partial(layer_features, clf, layer))


def layer_features(clf: Classifier, layer: Hashable, params, x) -> jax.Array:
  """``clf``'s features at ``layer``, flattened per image (traceable: the latent
  dictionaries, purification and the adaptive attacker differentiate through it)."""
  return clf.features(params, x, layer).reshape(x.shape[0], -1)


@dataclasses.dataclass(frozen=True)
class Model:
  """The shielded classifier: any ``secure.classifier.Classifier`` and params."""
  classifier: Classifier
  params: Any

  def predict(self, x, batch: int = 1000) -> np.ndarray:
    x = np.asarray(x, np.float32)
    f = jit_apply(self.classifier)
    return (np.concatenate([np.asarray(f(self.params, x[i:i + batch])).argmax(-1)
                            for i in range(0, len(x), batch)]) if len(x) else np.zeros(0, int))

  def features(self, x, layer: Hashable, batch: int = 1000) -> np.ndarray:
    x = np.asarray(x, np.float32)
    f = _jit_features(self.classifier, layer)
    return np.concatenate([np.asarray(f(self.params, x[i:i + batch]))
                           for i in range(0, len(x), batch)])


@dataclasses.dataclass(frozen=True)
class Shield:
  input: analyzers.InputAnalyzer
  envelope: envelope.EnvelopeAnalyzer | None
  latents: dict                           # layer -> analyzers.LatentAnalyzer
  model: Model
  by_rule: dict                           # rule -> target FPR -> combine.Combiner
  cfg: ShieldConfig

  @property
  def combiners(self) -> dict:
    """Target FPR -> the configured rule's combiner."""
    return self.by_rule[self.cfg.rule]

  @property
  def modules(self) -> tuple[str, ...]:
    return (("input",) + (("envelope",) if self.envelope else ())
            + tuple(f"latent{l}" for l in self.latents))

  @property
  def thresholds(self) -> dict[float, float]:
    return {f: c.threshold for f, c in self.combiners.items()}

  def module_scores(self, x) -> np.ndarray:
    """(N, modules) raw scores, columns in ``modules`` order."""
    x = _check(x, self.input)
    cols = [self.input.score(x)]
    if self.envelope is not None:
      cols.append(self.envelope.score(x))
    cols += [an.score(self.model.features(x, l)) for l, an in self.latents.items()]
    return np.stack(cols, axis=1)

  def scores(self, x, s_NxM: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per image: each module's -log p and the combined statistic."""
    s = self.module_scores(x) if s_NxM is None else s_NxM
    c = next(iter(self.combiners.values()))
    q = np.asarray(c.neg_log_p(s))
    return {**dict(zip(self.modules, q.T)), "combined": np.asarray(c.statistic(s))}

  def _purify(self, x) -> np.ndarray:
    layer = (self.cfg.purify_layer if self.cfg.purify_layer in self.latents
             else list(self.latents)[-1])
    an = self.latents[layer]
    return purify.purify(functools.partial(layer_features, self.model.classifier, layer),
                         self.model.params, an.dictionary, an.n_nonzero, x, self.cfg.purify)

  def recover_paths(self, x, paths=PATHS) -> dict[str, np.ndarray]:
    """Recovered labels of every recovery path in ``paths``; ``routed`` is
    the shield's chain (module docstring)."""
    x = _check(x, self.input)
    routed = "routed" in paths
    need = set(paths) | ({"patch", "envelope"} if routed else set())
    can_purify = bool(self.latents) and self.cfg.purify is not None
    images = {}
    if "patch" in need:
      images["patch"] = self.input.reconstruct(x, tol=self.cfg.recovery_tol)
    if self.envelope is not None and need & {"envelope", "envelope+purify"}:
      images["envelope"] = self.envelope.reconstruct(x)
    if can_purify and "purify" in need:
      images["purify"] = self._purify(x)
    if can_purify and "envelope+purify" in need:
      images["envelope+purify"] = self._purify(images.get("envelope", x))
    labels = {k: self.model.predict(v) for k, v in images.items()}
    out = {k: v for k, v in labels.items() if k in paths}
    if routed:
      out["routed"] = self._route(images, labels, self.model.predict(x))
    return out

  def _route(self, images: dict, labels: dict, flagged_label: np.ndarray) -> np.ndarray:
    """The chain: patch reconstruction, else the envelope's, else purified."""
    rec, label = images["patch"].copy(), labels["patch"].copy()
    if "envelope" in images:
      same = label == flagged_label
      rec[same], label[same] = images["envelope"][same], labels["envelope"][same]
    same = label == flagged_label
    if same.any() and self.latents and self.cfg.purify is not None:
      label[same] = self.model.predict(self._purify(rec[same]))
    return label

  def recover(self, x) -> np.ndarray:
    """The recovered label of each input (the routed chain)."""
    return self.recover_paths(x, paths=("routed",))["routed"]

  def __call__(self, x, fpr: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(final labels, flagged): flagged inputs get the recovered label."""
    if fpr not in self.combiners:
      raise ValueError(f"no threshold for FPR {fpr}; have {sorted(self.combiners)}")
    x = _check(x, self.input)
    s = self.module_scores(x)
    flagged = self.combiners[fpr].flags(s)
    labels = self.model.predict(x)
    if flagged.any():
      labels[flagged] = self.recover(x[flagged])
    return labels, flagged


def _check(x, an: analyzers.InputAnalyzer) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 4 or x.shape[-1] != 1:
    raise ValueError(f"the shield takes single-channel images (N, H, W, 1), got {x.shape}")
  if not np.isfinite(x).all():
    raise ValueError("images contain NaN or inf")
  return x


def split(x: np.ndarray, fit_fraction: float = ShieldConfig.fit_fraction
          ) -> tuple[np.ndarray, np.ndarray]:
  """(images that fit the dictionaries, images that set the thresholds)."""
  n_fit = int(round(fit_fraction * len(x)))
  if not 1 <= n_fit < len(x) or len(x) - n_fit < 10:
    raise ValueError(f"{len(x)} defender images cannot be split {fit_fraction:.2f} / rest "
                     "(the thresholds need at least 10)")
  return x[:n_fit], x[n_fit:]


def fit_model(classifier: Classifier, params, defender_x, cfg: ShieldConfig = ShieldConfig(),
              fprs=FPRS) -> Shield:
  """Fits every analyzer on the first part of the defender's benign,
  unlabelled images and calibrates the combination on the rest."""
  x = np.asarray(defender_x, np.float32)
  x_fit, x_val = split(x, cfg.fit_fraction)
  model = Model(classifier, params)
  inp = analyzers.fit_input_analyzer(x_fit, cfg.patch, cfg.input_dict)
  env = envelope.fit(x_fit, cfg.envelope) if cfg.envelope is not None else None
  latents = {}
  if cfg.latent_dict is not None:
    layers = classifier.layers if cfg.latent_layers is None else cfg.latent_layers
    n_atoms = min(cfg.latent_dict.n_atoms, len(x_fit))
    dcfg = dataclasses.replace(cfg.latent_dict, n_atoms=n_atoms,
                               n_nonzero=min(cfg.latent_dict.n_nonzero, n_atoms))
    for layer in layers:
      classifier.check_layer(layer)
      latents[layer] = analyzers.fit_latent_analyzer(model.features(x_fit, layer), dcfg)
  raw = Shield(inp, env, latents, model, {}, cfg)
  s_val = raw.module_scores(x_val)
  return dataclasses.replace(raw, by_rule={r: {f: combine.fit(s_val, r, f) for f in fprs}
                                           for r in combine.RULES})


def fit(victim, cfg: ShieldConfig = ShieldConfig(), fprs=FPRS,
        defender_x: np.ndarray | None = None) -> Shield:
  """The shield of a ``victims.Victim`` (its defender images, or ``defender_x``)."""
  return fit_model(victim.classifier, victim.params,
                   victim.defender_x if defender_x is None else defender_x, cfg, fprs)


def evaluate(sh: Shield, x_clean, y_clean, x_trig, y_trig, target: int,
             return_scores: bool = False):
  """Shield metrics in percent on held-out images: clean ones and triggered
  non-target ones, BackdoorBench's C-Acc / ASR / R-Acc after the shield (the
  shield relabels what it flags; R-Acc = RA), every recovery path's RA, both
  rules (the configured one is the headline), ms per image."""
  t0 = time.perf_counter()
  s_trig = sh.module_scores(x_trig)
  detect_ms = 1e3 * (time.perf_counter() - t0) / len(x_trig)
  s_clean = sh.module_scores(x_clean)
  out = {"n_clean": len(x_clean), "n_attack": len(x_trig), "detect_ms_per_image": detect_ms}
  pred_t, pred_c = sh.model.predict(x_trig), sh.model.predict(x_clean)
  out |= {"asr_before": 100 * float(np.mean(pred_t == target)),
          "c_acc_before": 100 * float(np.mean(pred_c == y_clean))}
  out["roc"] = {m: detection.roc(s_clean[:, i], s_trig[:, i]) for i, m in enumerate(sh.modules)}
  t0 = time.perf_counter()
  rec_t = sh.recover_paths(x_trig)
  out["recover_ms_all_paths"] = 1e3 * (time.perf_counter() - t0) / len(x_trig)
  out["paths"] = {p: 100 * float(np.mean(l == y_trig)) for p, l in rec_t.items()}
  stats_c = {(r, f): np.asarray(c.statistic(s_clean)) for r, by_fpr in sh.by_rule.items()
             for f, c in by_fpr.items()}
  any_c = np.any([t > sh.by_rule[r][f].threshold for (r, f), t in stats_c.items()], axis=0)
  rec_c = pred_c.copy()    # clean images any rule flags at any FPR, recovered once
  if any_c.any():
    rec_c[any_c] = sh.recover(x_clean[any_c])
  for f in sh.combiners:
    for r, by_fpr in sh.by_rule.items():
      c = by_fpr[f]
      stat_t, stat_c = np.asarray(c.statistic(s_trig)), stats_c[r, f]
      out["roc"].setdefault(r, detection.roc(stat_c, stat_t))
      ft, fc = stat_t > c.threshold, stat_c > c.threshold
      final_c = np.where(fc, rec_c, pred_c)
      final_t = np.where(ft, rec_t["routed"], pred_t)
      out[f"{r}{f:g}"] = {
          "tpr": 100 * float(np.mean(ft)), "fpr_test": 100 * float(np.mean(fc)),
          "ra": 100 * float(np.mean(final_t == y_trig)),
          "asr_after": 100 * float(np.mean(final_t == target)),
          "c_acc_after": 100 * float(np.mean(final_c == y_clean))}
  # What deployment costs per image: the analyzers, then the routed recovery alone
  # (timed on a second call: the first compiles the shapes its subsets take).
  sub = x_trig[:256]
  sh.recover(sub)
  t0 = time.perf_counter()
  sh.recover(sub)
  out["recover_ms"] = 1e3 * (time.perf_counter() - t0) / len(sub)
  out["ms_per_image"] = detect_ms + out["recover_ms"]
  return (out, s_clean, s_trig) if return_scores else out


def warm_up(sh: Shield, x: np.ndarray) -> None:
  """Compiles the shield's functions for ``x``'s shape (so timings are warm)."""
  sh.module_scores(x)
  sh.recover_paths(x)
