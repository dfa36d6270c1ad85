"""The CuRTAIL study end to end on a tiny digits MLP: records are complete and
consistent with an independent recomputation, the rendered Markdown shows
the recorded values, a second run resumes from the cache without
retraining, and the binary refuses unknown attacks and victims."""

import dataclasses
import re

import numpy as np
import pytest

from secure import sparse
from secure.cleann import analyzers
from secure.curtail import adaptive, defences, input_defender, latent, section, study

PLAN = study.Plan(
    victims=(("digits", "mlp"),), steps={"digits": 300}, n_attack=40, n_jsma=10, n_clean=200,
    eps_linf=(0.05, 0.2), eps_l2=(1.0,), n_profile=30,
    attacks={"fgsm": ("fgsm", {"eps": 0.2}), "deepfool": ("deepfool", {"steps": 20}),
             "jsma": ("jsma", {"gamma": 0.2})},
    defences=defences.CurtailConfig(
        latent=latent.LatentConfig(steps=50),
        input=input_defender.InputDefenderConfig(
            patch=analyzers.PatchConfig(size=4, stride=4), images_per_class=30,
            dictionary=sparse.DictConfig(n_atoms=16, n_nonzero=3, iters=2)),
    ),
    adaptive=adaptive.AdaptiveConfig(eps=0.2, steps=10, step_size=0.03, penalties=(1.0,),
                                     gradients=("exact",)),
    adaptive_on=(("digits", "mlp"),), n_adaptive=20, throughput_images=0, bench_attacks=(),
    defence_names=("curtail", "feature_squeezing"))   # the trained peers cost the most time


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("curtail"))
  res = study.run(PLAN, out, "test", progress=False)
  return out, res


def test_records_are_complete_and_consistent(result):
  _, res = result
  (r,) = res["runs"]
  assert set(r["attacks"]) == {"fgsm", "deepfool", "jsma"}
  for lbl, a in r["attacks"].items():
    assert set(a["defences"]) == set(PLAN.defence_names)
    for d in a["defences"].values():
      # residual = attacked images that fool the victim and pass: at most the success rate
      assert d["residual"] <= a["success"] + 1e-9
      if "tpr" in d:   # and, recomputed from the TPR over successful examples
        assert d["residual"] == pytest.approx(a["success"] * (1 - d["tpr"] / 100), abs=1e-6)
        assert 0 <= d["auc"] <= 1
  assert r["attacks"]["deepfool"]["success"] > 90      # DeepFool always crosses a boundary
  assert {"fgsm"} <= set(r["profile"]["eps_sweep"]) and r["adaptive"]
  sweep = [p["success"] for p in r["profile"]["eps_sweep"]["fgsm"]]
  assert sweep == sorted(sweep)                          # stronger epsilon, no fewer successes


def test_rendered_report_shows_the_records(result):
  out, res = result
  md = section.render(res, out).body
  (r,) = res["runs"]
  d = r["attacks"]["fgsm"]["defences"]["curtail"]
  row = next(l for l in md.splitlines() if l.startswith("| fgsm |") and " / " in l)
  assert row.split("|")[2].strip().startswith(f"{d['auc']:.3f} / {d['tpr']:.1f} ±")
  means = next(l for l in md.splitlines() if l.startswith("| digits/mlp |"))
  assert [float(v) for v in means.split("|")[2:4]] == pytest.approx(
      [section.mean_auc(r, n) for n in PLAN.defence_names], abs=5e-4)
  assert re.search(r"Defender throughput: not in this plan", md)


def test_second_run_resumes_without_retraining(result, monkeypatch):
  out, res = result
  monkeypatch.setattr(study, "victim_run", lambda *a, **k: pytest.fail("retrained"))
  again = study.run(PLAN, out, "test", progress=False)
  assert again["runs"] == res["runs"]


def test_binary_refuses_unknown_attacks_and_victims():
  from absl import app, flags
  from experiments import curtail
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["curtail", "--attacks=fgsm,nope"])
  with pytest.raises(app.UsageError, match="unknown attacks"):
    curtail.main([])
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["curtail", "--victims=mnist5k/resnet"])
  with pytest.raises(app.UsageError, match="victims"):
    curtail.main([])
  flags.FLAGS.unparse_flags()
