"""The MiniLM study's pieces that need no checkpoint: retrieval agreement
against scikit-learn's nearest neighbours, and the renderer on records with
known answers (the study itself runs in full mode, `experiments.subclone --minilm`)."""

import math

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from subclone import minilm, section


def _sk_neighbours(e, k):
  nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(e)
  idx = nn.kneighbors(e, return_distance=False)
  return np.array([[j for j in row if j != i][:k] for i, row in enumerate(idx)])


def test_retrieval_agreement_matches_scikit_learn_neighbours():
  rng = np.random.default_rng(0)
  parent = rng.standard_normal((60, 8))
  child = parent + 0.6 * rng.standard_normal((60, 8))
  r = minilm.retrieval(child, parent, k=5)
  c, p = _sk_neighbours(child, 5), _sk_neighbours(parent, 5)
  assert r["top1"] == pytest.approx(np.mean(c[:, 0] == p[:, 0]))
  assert r["top5_overlap"] == pytest.approx(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(c, p)]))
  assert 0 < r["top1"] < 1 and r["top1_se"] == pytest.approx(math.sqrt(r["top1"] * (1 - r["top1"]) / 60))
  same = minilm.retrieval(3.0 * parent, parent, k=5)   # cosine: scale does not matter
  assert same["top1"] == 1.0 and same["top5_overlap"] == 1.0


def test_render_minilm_reads_the_records(tmp_path):
  budgets, seeds = [50, 100, 200], [1, 2]
  loss = {"random init": {1: [0.40, 0.30, 0.20], 2: [0.42, 0.32, 0.22]},
          "subcloned": {1: [0.30, 0.20, 0.15], 2: [0.30, 0.21, 0.15]}}
  from subclone import isoloss
  sp = {"subcloned": {s: isoloss.speedup_curve((budgets, loss["random init"][s]),
                                               (budgets, loss["subcloned"][s]),
                                               loss["random init"][s]) for s in seeds}}
  ret = lambda t: [{"budget": b, "top1": t + 0.1 * i, "top10_overlap": 0.5} for i, b in enumerate(budgets)]
  res = {"iso": {"budgets": budgets, "seeds": seeds, "final_loss": loss, "speedup": sp},
         "retrieval": {"random init": {1: ret(0.2), 2: ret(0.2)},
                       "subcloned": {1: ret(0.3), 2: ret(0.5)}},
         "n_retrieval": 100, "initial_retrieval": {"random init": {"top1": 0.01},
                                                   "subcloned": {"top1": 0.2}},
         "initial_loss": {"random init": 1.0, "subcloned": 0.5},
         "parent_config": {"d_model": 384, "n_layers": 6, "n_heads": 12, "d_ff": 1536},
         "child_config": {"d_model": 192, "n_layers": 4, "n_heads": 6, "d_ff": 768},
         "n_train": 10, "n_val": 5, "plan": {"sweep_seed": 0, "budgets": budgets},
         "sweep": {"random init": {"0.001": 0.3}}, "chosen_lr": {"random init": 0.001}}
  body = section.render_minilm(res, str(tmp_path)).body
  # Budget 200: random 0.21 (0.20-0.22), subcloned top-1 mean 0.6 -> 60.0 +- 4.9 over 100 verses.
  assert "| 200 | 0.210 (0.200-0.220) | 0.150 (0.150-0.150) | 40.0 +- 4.9 | 60.0 +- 4.9 |" in body
  # Random's 200-step losses: 0.20 (seed 1) is subcloning's at exactly 100 steps; 0.22
  # (seed 2) lies between its 50- and 100-step losses (0.30, 0.21), in log-budget.
  s2 = 200 / (50 * 2 ** ((0.30 - 0.22) / (0.30 - 0.21)))
  assert f"with >= 4x fewer steps): 2.00x, {s2:.2f}x over seeds 1, 2." in body
  assert "subcloned higher at budgets 50, 100, 200 of 50, 100, 200" in body
