"""Today's test-time backdoor detectors, CLEANN's peers: each asks whether the
victim's prediction stays put under a transformation that moves a benign
input's prediction. All detect and reject (nothing is relabelled); all take
the user's model as ``apply(params, x) -> logits`` and flag high scores.

* SCALE-UP (Guo et al., ICLR 2023), data-free: the share of pixel-value
  amplifications ``clip(n x)``, n in ``factors``, whose prediction equals
  the input's (scaled prediction consistency).
* TeCo (Liu et al., CVPR 2023): for each image corruption, the severity at
  which the prediction first changes (``severities + 1`` if never); the score
  is the standard deviation of those severities over corruption types (a
  trigger is robust to some corruptions and fragile to others). Corruptions
  follow Hendrycks & Dietterich's definitions for grayscale images; the blur
  and pixelate severities are scaled to 28x28 images (their constants are for
  224x224; our choice).
* IBD-PSC (Hou et al., ICML 2024): the mean softmax probability of the
  input's predicted label under copies of the model whose last k scaled
  layers (k = 1..K) are multiplied by ``factor`` (parameter-oriented scaling
  consistency). The paper scales batch-norm parameters; our CNN has no batch
  norm, so the default scales the *kernels* (not the biases) of the last
  hidden layers, which keeps it non-trivial: scaling a ReLU layer's kernel
  and bias together would scale every downstream logit and change nothing.
  ``scaled_leaves`` picks other leaves (e.g. a batch-norm model's scales).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from secure import detection

Apply = Callable[[Any, Any], Any]


def _labels(apply: Apply, params, x, batch: int = 1000) -> np.ndarray:
  return np.concatenate([np.asarray(apply(params, x[i:i + batch])).argmax(-1)
                         for i in range(0, len(x), batch)])


def _thresholds(scores: np.ndarray, fprs) -> dict[float, float]:
  return {f: detection.threshold_for_fpr(scores, f) for f in fprs}


@dataclasses.dataclass(frozen=True)
class ScaleUp:
  apply: Apply
  params: Any
  factors: tuple[float, ...] = (3, 5, 7, 9, 11)
  thresholds: dict = dataclasses.field(default_factory=dict)

  def scores(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    y = _labels(self.apply, self.params, x)
    same = [_labels(self.apply, self.params, np.clip(n * x, 0, 1)) == y for n in self.factors]
    return np.mean(same, axis=0)


def _blur(x, s):
  return scipy.ndimage.gaussian_filter(x, sigma=(0, s, s, 0))


def _pixelate(x, c):
  h, w = x.shape[1:3]
  small = jax.image.resize(jnp.asarray(x), (x.shape[0], max(1, int(h * c)), max(1, int(w * c)),
                                            x.shape[3]), "linear")
  return np.asarray(jax.image.resize(small, x.shape, "nearest"))


# (name, severity constants, function(x, c, rng)) for five severities each.
CORRUPTIONS: tuple = (
    ("gaussian_noise", (.08, .12, .18, .26, .38), lambda x, c, r: x + r.normal(0, c, x.shape)),
    ("shot_noise", (60, 25, 12, 5, 3), lambda x, c, r: r.poisson(x * c) / c),
    ("impulse_noise", (.03, .06, .09, .17, .27),
     lambda x, c, r: np.where(r.random(x.shape) < c, r.integers(0, 2, x.shape), x)),
    ("gaussian_blur", (.5, .75, 1., 1.5, 2.), lambda x, c, r: _blur(x, c)),
    ("contrast", (.4, .3, .2, .1, .05),
     lambda x, c, r: (x - x.mean((1, 2, 3), keepdims=True)) * c
     + x.mean((1, 2, 3), keepdims=True)),
    ("brightness", (.1, .2, .3, .4, .5), lambda x, c, r: x + c),
    ("pixelate", (.6, .5, .4, .3, .25), lambda x, c, r: _pixelate(x, c)),
)


@dataclasses.dataclass(frozen=True)
class TeCo:
  apply: Apply
  params: Any
  corruptions: tuple = CORRUPTIONS
  seed: int = 0
  thresholds: dict = dataclasses.field(default_factory=dict)

  def flip_severity(self, x) -> np.ndarray:
    """(N, corruption types): the first severity (1-based) that changes the
    prediction, or the number of severities + 1 if none does."""
    x = np.asarray(x, np.float32)
    y = _labels(self.apply, self.params, x)
    rng = np.random.default_rng(self.seed)
    out = []
    for _, levels, fn in self.corruptions:
      first = np.full(len(x), len(levels) + 1)
      for s, c in reversed(list(enumerate(levels, 1))):
        xc = np.clip(fn(x, c, rng), 0, 1).astype(np.float32)
        first = np.where(_labels(self.apply, self.params, xc) != y, s, first)
      out.append(first)
    return np.stack(out, axis=1)

  def scores(self, x) -> np.ndarray:
    return self.flip_severity(x).std(axis=1)


def last_kernels(params, n: int = 3) -> list[tuple]:
  """Paths of the kernels of the last ``n`` layers before the output layer
  (a param pytree of named layers, each with a 'kernel'; the default choice
  of scaled leaves for a model without batch norm)."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]
           if getattr(p[-1], "key", None) == "kernel"]
  if len(paths) < 2:
    raise ValueError("IBD-PSC needs at least one hidden layer's kernel to scale")
  return paths[:-1][-n:]


@dataclasses.dataclass(frozen=True)
class IbdPsc:
  apply: Apply
  params: Any
  scaled_leaves: Sequence[tuple] = ()    # paths (input side first); default last_kernels
  factor: float = 1.5
  thresholds: dict = dataclasses.field(default_factory=dict)

  def scaled_params(self) -> list:
    leaves = list(self.scaled_leaves) or last_kernels(self.params)
    out = []
    for k in range(1, len(leaves) + 1):
      chosen = {jax.tree_util.keystr(p) for p in leaves[-k:]}
      out.append(jax.tree_util.tree_map_with_path(
          lambda p, a: a * self.factor if jax.tree_util.keystr(p) in chosen else a, self.params))
    return out

  def scores(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    y = _labels(self.apply, self.params, x)
    probs = [np.asarray(jax.nn.softmax(self.apply(p, x)))[np.arange(len(x)), y]
             for p in self.scaled_params()]
    return np.mean(probs, axis=0)


def fit(detector, x_val, fprs=(0.01, 0.05)):
  """The detector with thresholds set on the defender's benign validation images."""
  return dataclasses.replace(detector, thresholds=_thresholds(detector.scores(x_val), fprs))
