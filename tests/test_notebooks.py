"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), as a
person opening it would run it, and the values it prints are checked: a
notebook that runs but shows wrong numbers fails too."""

import glob
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def _run(path: str) -> str:
  """Executes the notebook in a fresh kernel (cwd = repo root); returns its stdout."""
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.get("output_type") == "stream")


def _floats(pattern: str, text: str) -> list[float]:
  found = [float(x) for x in re.findall(pattern, text)]
  assert found, f"the notebook printed nothing matching {pattern!r}:\n{text}"
  return found


def _check_spd_tour(out: str) -> None:
  assert _floats(r"max \|TP - dense\| = ([\d.e+-]+)", out)[0] < 1e-4
  counts = re.findall(r"dropped (\d+): (\d+) all-reduces", out)
  assert [int(n) for _, n in counts] == [2 * 4 - int(k) for k, _ in counts]  # 2L - dropped
  # The paper reports ~20% on 8 GPUs; the model's presets land around that.
  assert all(5 < r < 45 for r in _floats(r"modelled latency reduction: ([\d.]+)%", out))
  assert _floats(r"TP=8 over 4 KV heads: max \|TP - dense\| = ([\d.e+-]+)", out)[0] < 1e-4
  assert 0 < _floats(r"max \|int8 - dense\| = ([\d.e+-]+)", out)[0] < 0.1
  plain, int8 = map(float, re.search(r"plain ([\d.]+) kB, int8 ([\d.]+) kB", out).groups())
  assert int8 < 0.35 * plain  # int8 + scales vs float32
  planned, dropped = map(float, re.search(r"planner ([\d.]+) ms vs drop-only ([\d.]+) ms",
                                          out).groups())
  assert planned <= dropped
  assert _floats(r"perplexity ([+-][\d.]+)% vs budget", out)[0] <= 0.1
  # By hand, 8 syncs (4 blocks) at TP=4, D=128: int4 2 * 3/4 * 128 * (1/2 + 4/16) = 144 B
  # each, float32 2 * 3/4 * 128 * 4 = 768 B each.
  assert re.search(r"int4: 1152 B/token by formula, 1152 from the decode HLO", out)
  assert re.search(r"float32: 6144 B/token by formula, 6144 from the decode HLO", out)
  bert_lines = re.findall(r"BERT TP=4, (\d) dropped: (\d+) all-reduces, max \|TP - dense\| = ([\d.e+-]+)", out)
  assert [(k, n) for k, n, _ in bert_lines] == [("0", "4"), ("2", "2")]
  assert float(bert_lines[0][2]) < 1e-5 and float(bert_lines[1][2]) > 0
  assert _floats(r"ladder TP=4: max \|TP - unsharded\| = ([\d.e+-]+)", out)[0] < 1e-4
  assert 10 < _floats(r"modelled ladder latency reduction, 70B decode on 8 H100: ([\d.]+)%", out)[0] < 60


def _check_rapidnn_tour(out: str) -> None:
  float_acc = _floats(r"float accuracy ([\d.]+)%", out)[0]
  assert float_acc > 90  # digits MLP; chance is 10%
  assert _floats(r"max \|emulator - reference\| = ([\d.e+-]+)", out)[0] < 1e-3
  assert _floats(r"after retraining: ([\d.]+)%", out)[0] > float_acc - 5


def _check_subclone_tour(out: str) -> None:
  m = re.search(r"step 0: subcloned ([\d.]+), random ([\d.]+)", out)
  sub, rand = float(m.group(1)), float(m.group(2))
  assert sub < rand - 1.0  # the subcloned child starts far below a random init
  after = dict(re.findall(r"after 80 steps: (\w+) ([\d.]+)", out))
  assert float(after["subcloned"]) < float(after["random"])


def _check_cleann_tour(out: str) -> None:
  c_acc, asr = map(float, re.search(r"clean accuracy ([\d.]+)%, attack success rate ([\d.]+)%",
                                    out).groups())
  assert asr > 90 and c_acc > 85                 # the backdoor works before any defence
  tpr5, ra5 = map(float, re.search(r"at 5% FPR: TPR ([\d.]+)%, recovery accuracy ([\d.]+)%",
                                   out).groups())
  assert tpr5 > 95 and ra5 > 80
  through, before = map(float, re.search(r"at 5% FPR: .* clean accuracy through the shield "
                                         r"([\d.]+)% \(victim ([\d.]+)%\)", out).groups())
  assert through > before - 3
  fired, recovered = map(int, re.search(r"the victim says 0 on (\d+); recovery gives the true "
                                         r"label on (\d+)", out).groups())
  assert fired >= 9 and recovered >= 7               # backdoor fires; recovery gets it back
  asr, flagged, rec = map(float, re.search(
      r"SIG: ASR before ([\d.]+)%, flagged at 5% FPR ([\d.]+)%, recovered ([\d.]+)%", out).groups())
  assert asr > 90 and flagged > 90 and rec > 80      # an image-wide trigger: seen and undone
  assert 0 <= _floats(r"STRIP TPR at 5% FPR: ([\d.]+)%", out)[0] <= 100


def _check_curtail_tour(out: str) -> None:
  assert _floats(r"victim test accuracy ([\d.]+)%", out)[0] > 90
  rows = {(a, d): (float(s), float(auc), float(res)) for a, s, d, auc, res in re.findall(
      r"(\w+): success (\d+)%, (\w+) AUC ([\d.]+), TPR [\d.]+% at 5% FPR \(clean test FPR "
      r"[\d.]+%\), residual ([\d.]+)%", out)}
  assert len(rows) == 6
  s, auc, res = rows[("deepfool", "curtail")]
  assert s > 95 and auc > 0.95 and res < 10      # minimal perturbations: caught
  for (a, d), (s, auc, res) in rows.items():
    assert res <= s                               # residual counts a subset of the successes
  assert _floats(r"true label back on (\d+)%", out)[0] > 80
  diff = _floats(r"max \|sharded - in turn\| = ([\d.e+-]+)", out)[0]
  assert diff < 1e-5 * _floats(r"scores up to (\d+)", out)[0]   # float32 reassociation only
  sweep = re.findall(r"PGD eps ([\d.]+): success (\d+)%, curtail residual ([\d.]+)%.*"
                     r"CuRTAIL module AUCs (.*)\n", out)
  assert [float(e) for e, *_ in sweep] == [0.05, 0.1, 0.2, 0.3]
  for eps, succ, cur, mods in sweep:
    auc = {m: float(a) for m, a in re.findall(r"([\w-]+) ([\d.]+)", mods)}
    assert float(cur) <= 10 and auc["residual"] > 0.95   # the label-free module sees every one
  # the overshoot at 0.3 looks *more* typical to the class-conditional input module
  assert float(sweep[-1][1]) > 95 and auc["input"] < 0.5
  # knowing the defence, the attacker does at least as well as PGD not knowing it
  adaptive = _floats(r"residual attack success (\d+)% against CuRTAIL", out)[0]
  assert float(sweep[1][2]) - 5 <= adaptive <= 100


def _check_codex_tour(out: str) -> None:
  float_acc = _floats(r"float accuracy ([\d.]+)%", out)[0]
  assert float_acc > 90
  assert _floats(r"max \|datapath - reference\| = ([\d.e+-]+)", out)[0] < 1e-4
  uni = dict(re.findall(r"uniform (\d)-bit codebooks: ([\d.]+)%", out))
  assert abs(float(uni["8"]) - float_acc) < 3 and float(uni["1"]) < float_acc - 10
  for used, budget in re.findall(r"bits (\d+) <= budget (\d+)", out):
    assert int(used) <= int(budget)
  ratios = _floats(r"modelled/published = ([\d.]+)", out)
  assert abs(ratios[0] - 1) < 0.05 and 0.5 <= ratios[1] <= 2       # fit, then the check
  assert _floats(r"ratio ([\d.]+)x \(model\)", out)[0] > 1        # fewer activation bits


CHECKS = {"spd_tour": _check_spd_tour, "rapidnn_tour": _check_rapidnn_tour,
          "codex_tour": _check_codex_tour,
          "subclone_tour": _check_subclone_tour, "cleann_tour": _check_cleann_tour,
          "curtail_tour": _check_curtail_tour}


def test_every_notebook_has_checks():
  assert {os.path.basename(p)[:-len(".ipynb")] for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_a_kernel_and_prints_the_expected_values(path, monkeypatch):
  monkeypatch.setenv("JAX_THREEFRY_PARTITIONABLE", "false")  # the kernel inherits it
  CHECKS[os.path.basename(path)[:-len(".ipynb")]](_run(path))
