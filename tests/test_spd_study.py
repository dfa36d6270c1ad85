"""The SPD accuracy study end to end on a tiny model (plumbing, not numbers)."""

import json
import os

from core.models import lm
from spd_jax import strategies, study


def test_tiny_study_produces_tables_plot_and_json(tmp_path):
  cfg = study.StudyConfig(
      lm.LMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=32, max_seq_len=32), train_steps=10,
      tp_sizes=(2,), seq_len=32, train_batch=4, eval_windows=4, cloze_items=12,
      cloze_context=16, calib_seqs=8, b2b=strategies.B2BConfig(steps=3), hg_rounds=1)
  sec = study.run_study(cfg, str(tmp_path), model_dir=str(tmp_path / "lm"), progress=False)
  assert "| TP=2 | ZS+B2B+HG |" in sec.body and "Residual ablation" in sec.body
  assert os.path.getsize(tmp_path / "figures" / "spd_accuracy.png") > 1000
  res = json.load(open(tmp_path / "spd_accuracy.json"))["results"]["2"]
  assert len(res["scan"]["ZS"]) == 3 and set(res["classes"]) <= {"ISB", "SB", "ESB"}
  # k = 0 drops nothing, so every strategy starts from the same dense model.
  assert len({round(res["scan"][s][0]["ppl"], 6) for s in study.STRATEGIES}) == 1
