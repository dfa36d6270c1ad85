"""The main job's machinery: a tiny baselines run writes REPORT.md with tables
and plots; a failing section is reported in place without losing the rest."""

import os

import pytest

from core import baselines, data, report
from core.models import lm

_HAS_FASHION = os.path.exists(os.path.join(data.fashion_mnist_dir(), "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.skipif(not _HAS_FASHION, reason="dataset-fashion-mnist not installed (make data)")
def test_tiny_baselines_report(tmp_path):
  plan = baselines.BaselinePlan(
      classifier_runs=(("digits", "mlp", 20), ("fashion_mnist", "cnn", 5)),
      lm_config=lm.LMConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32),
      lm_steps=10, lm_batch=4)
  out = str(tmp_path)
  failed = report.write_report(os.path.join(out, "REPORT.md"),
                               [("baselines", lambda q, o: baselines.run_baselines(plan, o, False))],
                               quick=True, outdir=out)
  assert failed == []
  text = open(os.path.join(out, "REPORT.md")).read()
  assert "| digits | mlp |" in text and "| fashion_mnist | cnn |" in text and "val ppl" in text
  for fig in ("baselines_classifier_loss.png", "baselines_lm_loss.png"):
    path = os.path.join(out, "figures", fig)
    assert os.path.getsize(path) > 1000 and f"figures/{fig}" in text


def test_failing_section_is_reported_and_others_still_run(tmp_path):
  def boom(quick, outdir):
    raise RuntimeError("section exploded")

  ok = lambda quick, outdir: report.Section("Fine", report.markdown_table(["a"], [[1.5]]))
  path = str(tmp_path / "REPORT.md")
  assert report.write_report(path, [("bad", boom), ("good", ok)], quick=True,
                             outdir=str(tmp_path)) == ["bad"]
  text = open(path).read()
  assert "## bad (FAILED)" in text and "section exploded" in text and "| 1.5 |" in text


@pytest.mark.parametrize("value,expected", [(0.12345, "0.1235"), (12345.6, "12,346"),
                                            (7, "7"), ("x", "x")])
def test_number_formatting(value, expected):
  assert report.fmt(value) == expected


def test_heatmap_writes_a_png(tmp_path):
  path = report.heatmap(str(tmp_path / "h.png"), [[0.0, -1.0], [-0.5, 0.2]], [4, 8], [4, 8],
                        xlabel="w", ylabel="u", title="t")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
