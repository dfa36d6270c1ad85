"""Per-layer bitwidth search under a hardware budget: CodeX's RL-inspired
search as REINFORCE, against uniform bitwidths, a greedy per-layer
sensitivity search and random search, all counting *distinct evaluated
configurations* (an evaluation is the expensive part; a repeated sample is
answered from the cache and costs nothing).

A search sees a ``Problem``: ``knobs`` integer choices in 1..8 (per layer:
weight bits, then activation bits), ``evaluate(bits) -> accuracy`` (validation
accuracy in points) and ``cost(bits)`` against ``budget``. It returns the best
*feasible* configuration it evaluated (cost <= budget), never an infeasible
one, with the trace of every evaluation for learning curves.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np

from accel.codex.encoding import MAX_BITS

Bits = tuple[int, ...]
CHOICES = np.arange(1, MAX_BITS + 1)


@dataclasses.dataclass
class Problem:
  knobs: int
  evaluate: Callable[[Bits], float]
  cost: Callable[[Bits], float]
  budget: float
  penalty: float = 100.0   # reward points lost per unit of relative budget excess

  def __post_init__(self):
    if self.knobs < 1:
      raise ValueError(f"a search needs at least one knob, got {self.knobs}")
    if not self.budget > 0:
      raise ValueError(f"the budget must be positive, got {self.budget}")
    cheapest = self.cost((1,) * self.knobs)
    if cheapest > self.budget:
      raise ValueError(f"no configuration meets the budget: even 1 bit everywhere costs "
                       f"{cheapest:.4g} > budget {self.budget:.4g}")
    self._seen: dict[Bits, float] = {}
    self.trace: list[dict] = []

  def feasible(self, bits: Bits) -> bool:
    return self.cost(bits) <= self.budget

  def reward(self, bits: Bits, acc: float) -> float:
    excess = max(0.0, self.cost(bits) / self.budget - 1.0)
    return acc - self.penalty * excess

  def __call__(self, bits: Bits) -> float:
    """Accuracy of ``bits`` (evaluated once; later calls read the cache)."""
    bits = tuple(int(b) for b in bits)
    if len(bits) != self.knobs or not all(1 <= b <= MAX_BITS for b in bits):
      raise ValueError(f"a configuration is {self.knobs} widths in 1..{MAX_BITS}, got {bits}")
    if bits not in self._seen:
      acc = float(self.evaluate(bits))
      self._seen[bits] = acc
      self.trace.append({"bits": list(bits), "acc": acc, "cost": float(self.cost(bits)),
                         "feasible": self.feasible(bits)})
    return self._seen[bits]

  @property
  def evaluations(self) -> int:
    return len(self._seen)

  def best(self) -> dict | None:
    ok = [t for t in self.trace if t["feasible"]]
    # Ties in accuracy go to the cheaper configuration.
    return max(ok, key=lambda t: (t["acc"], -t["cost"])) if ok else None


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
  samples: int = 8          # configurations drawn per policy update
  lr: float = 0.3           # Adam step on each knob's mean and log-spread
  init_std: float = 2.0
  min_std: float = 0.3
  baseline_decay: float = 0.8
  max_updates: int = 400    # also stops a policy that keeps drawing seen configurations


def reinforce(p: Problem, evaluations: int, cfg: ReinforceConfig = ReinforceConfig(),
              seed: int = 0) -> dict | None:
  """REINFORCE with a Gaussian policy per knob over the ordinal widths (as HAQ
  acts in a continuous space and rounds to bits): a ~ N(mu, sigma), width =
  clip(round(a), 1, 8). Reward = accuracy - penalty x relative budget excess,
  advantage = reward - moving-average baseline, normalised per batch; Adam
  updates on (mu, log sigma). Starts at the middle of the range, wide."""
  rng = np.random.default_rng(seed)
  theta = np.concatenate([np.full(p.knobs, (1 + MAX_BITS) / 2),
                          np.full(p.knobs, np.log(cfg.init_std))])
  m, v = np.zeros_like(theta), np.zeros_like(theta)
  baseline = None
  for t in range(1, cfg.max_updates + 1):
    if p.evaluations >= evaluations:
      break
    mu, sigma = theta[:p.knobs], np.maximum(np.exp(theta[p.knobs:]), cfg.min_std)
    acts = mu + sigma * rng.standard_normal((cfg.samples, p.knobs))
    rewards = []
    for a in acts:
      bits = tuple(int(b) for b in np.clip(np.rint(a), 1, MAX_BITS))
      if bits not in p._seen and p.evaluations >= evaluations:
        break
      rewards.append(p.reward(bits, p(bits)))
    if not rewards:
      break
    acts, r = acts[:len(rewards)], np.asarray(rewards)
    baseline = r.mean() if baseline is None else (
        cfg.baseline_decay * baseline + (1 - cfg.baseline_decay) * r.mean())
    adv = (r - baseline) / (r.std() + 1e-8)
    z = (acts - mu) / sigma
    # Gradient of E[adv * log N(a; mu, sigma)] in (mu, log sigma).
    grad = np.concatenate([np.mean(adv[:, None] * z / sigma, 0),
                           np.mean(adv[:, None] * (z ** 2 - 1), 0)])
    m = 0.9 * m + 0.1 * grad
    v = 0.999 * v + 0.001 * grad ** 2
    theta += cfg.lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    theta[:p.knobs] = np.clip(theta[:p.knobs], 0.5, MAX_BITS + 0.5)
  return p.best()


def random_search(p: Problem, evaluations: int, seed: int = 0) -> dict | None:
  """Uniform samples until ``evaluations`` distinct configurations are seen."""
  rng = np.random.default_rng(seed)
  tries = 0
  while p.evaluations < evaluations and tries < 100 * evaluations:
    p(tuple(rng.integers(1, MAX_BITS + 1, p.knobs)))
    tries += 1
  return p.best()


def uniform(p: Problem) -> dict | None:
  """The same width on every knob, 1..8 (8 evaluations)."""
  for b in CHOICES:
    p((int(b),) * p.knobs)
  return p.best()


def greedy(p: Problem, evaluations: int, path_share: float = 0.25,
           widths: tuple[int, ...] = (2, 4, 1, 3, 6, 5, 7)) -> dict | None:
  """Per-knob sensitivity, a greedy descent on it, then local refinement.

  Sensitivity: each knob alone at widths below 8 (the others at 8), in the
  order ``widths`` while (1 - ``path_share``) of the evaluations last;
  unmeasured widths are interpolated, and no knob goes below ``min(widths)``
  (many knobs and few evaluations: probe the widths that matter, e.g.
  (4, 3, 6, 5) for MiniLM's 96, where 1-2 bits only ever collapse it). The descent predicts a
  configuration's accuracy loss as the sum of its knobs' losses and walks from
  all-8, lowering one bit at a time the knob with the smallest predicted loss
  per unit of cost saved, until the budget is met (no evaluations: the cost is
  known); that configuration is evaluated. What is left is spent on moves that
  raise one knob and lower another while staying feasible, best predicted
  first, kept when the measured accuracy improves."""
  top = (MAX_BITS,) * p.knobs
  base = p(top)
  measured = [{MAX_BITS: 0.0} for _ in range(p.knobs)]
  probe_budget = max(1, int(evaluations * (1 - path_share)))
  floor = min(widths)
  if floor < 1 or max(widths) >= MAX_BITS:
    raise ValueError(f"probe widths must lie in 1..{MAX_BITS - 1}, got {widths}")
  for b in widths:
    for k in range(p.knobs):
      if p.evaluations >= probe_budget:
        break
      cfg = list(top)
      cfg[k] = b
      measured[k][b] = max(0.0, base - p(tuple(cfg)))
  drop = np.zeros((p.knobs, MAX_BITS + 1))
  for k in range(p.knobs):
    xs = sorted(measured[k])
    drop[k, 1:] = np.interp(CHOICES, xs, [measured[k][x] for x in xs])
  pred = lambda c: base - sum(drop[k, b] for k, b in enumerate(c))
  cur = list(top)
  while not p.feasible(tuple(cur)):      # walk on the prediction: no evaluations
    moves = []
    for k in range(p.knobs):
      if cur[k] > floor:
        nxt = cur.copy()
        nxt[k] -= 1
        saved = p.cost(tuple(cur)) - p.cost(tuple(nxt))
        moves.append(((drop[k, nxt[k]] - drop[k, cur[k]]) / max(saved, 1e-12), nxt))
    if not moves:
      raise ValueError(f"the budget {p.budget:.4g} is out of reach with every knob at "
                       f">= {floor} bits (cost {p.cost(tuple(cur)):.4g})")
    cur = min(moves, key=lambda m: m[0])[1]
  cur = tuple(cur)
  p(cur)
  # Local refinement with what is left: one knob up, another down, staying
  # feasible, best predicted first; move when the measured accuracy improves.
  improved = True
  while improved and p.evaluations < evaluations:
    improved = False
    cands = []
    for i, j in itertools.permutations(range(p.knobs), 2):
      if cur[i] < MAX_BITS and cur[j] > floor:
        c = list(cur)
        c[i] += 1
        c[j] -= 1
        c = tuple(c)
        if p.feasible(c) and c not in p._seen:
          cands.append((pred(c), c))
    for _, c in sorted(cands, reverse=True):
      if p.evaluations >= evaluations:
        break
      if p(c) > p(cur):
        cur, improved = c, True
        break
  return p.best()


def brute_force(p: Problem) -> dict | None:
  """Every configuration (only for small constructed problems)."""
  for bits in itertools.product(CHOICES, repeat=p.knobs):
    p(tuple(int(b) for b in bits))
  return p.best()
