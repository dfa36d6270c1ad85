"""The CuRTAIL study end to end on a tiny digits MLP: records are complete and
consistent with an independent recomputation (residual success against TPR,
the sweep's success against epsilon, the Tramer check against its inputs),
the rule is chosen on validation images, the rendered Markdown shows the
recorded values, a second run resumes from the cache without retraining, and
the binary refuses unknown attacks and victims."""

import re

import pytest

from secure.curtail import adaptive, pool, section, study
from tests import curtail_tiny

PLAN = study.Plan(
    victims=(("digits", "mlp"),), steps={"digits": 300}, n_attack=40, n_jsma=10, n_clean=200,
    attacks={"fgsm": ("fgsm", {"eps": 0.2}), "deepfool": ("deepfool", {"steps": 20}),
             "jsma": ("jsma", {"gamma": 0.2})},
    sweep=study.Sweep(eps_linf=(0.05, 0.2), eps_l2=(1.0,), kappas=(0.0, 5.0), pgd_steps=10,
                      cw=(("binary_steps", 2), ("steps", 20))),
    defences=curtail_tiny.CONFIG,
    adaptive=adaptive.AdaptiveConfig(steps=10, restarts=1, penalties=(1.0,),
                                     gradients=("exact",)),
    adaptive_eps={"mlp": (0.1, 0.2)}, adaptive_on=(("digits", "mlp"),), n_adaptive=20,
    pool=pool.PoolConfig(latent_seeds=1, latent_per_draw=1, input_seeds=1, residual_seeds=2),
    pool_on=(("digits", "mlp"),), pool_eps=(0.2,), pool_known_draws=1,
    throughput_images=0, bench_attacks=(), seed=0,   # seed 0: the rule's development victim
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
  assert res["rule"] == res["rule_choice"]["rule"] in ("or", "fisher")
  assert set(res["rule_choice"]["mean_tpr"]) == {"or", "fisher"}
  for lbl, a in section.settings(r):
    assert set(a["defences"]) == set(PLAN.defence_names)
    for d in a["defences"].values():
      for rule in ("or", "fisher"):
        x = d[rule]
        # residual = attacked images that fool the victim and pass: at most the success rate
        assert x["residual"] <= a["success"] + 1e-9
        if "tpr" in x:   # and, recomputed from the TPR over successful examples
          assert x["residual"] == pytest.approx(a["success"] * (1 - x["tpr"] / 100), abs=1e-6)
          assert 0 <= x["auc"] <= 1
  assert r["attacks"]["deepfool"]["success"] > 90      # DeepFool always crosses a boundary
  sweep = [p["success"] for p in r["sweep"]["pgd_linf"]]
  assert sweep == sorted(sweep)                          # stronger epsilon, no fewer successes
  assert [p["strength"] for p in r["sweep"]["cw_kappa"]] == [0.0, 5.0]
  # the adaptive attacker: at every epsilon, every defence, a Tramer check from its numbers
  assert set(r["adaptive"]) == {"0.1", "0.2"}
  for eps, per in r["adaptive"].items():
    for a in per.values():
      t = a["tramer"]
      assert t["eps_half"] == float(eps) / 2 and 0 <= t["implied"] <= r["accuracy"]
      assert a["residual"] <= 100 * a["n_success"] / a["n_attacked"] + 1e-9
  p = r["pool"]
  assert p["n_draws"] == 4 and 0 <= p["0.2"]["known"] <= 100 and 0 <= p["0.2"]["unknown_eot"] \
      <= 100


def test_rendered_report_shows_the_records(result):
  out, res = result
  md = section.render(res, out).body
  (r,) = res["runs"]
  rule = res["rule"]
  d = r["attacks"]["fgsm"]["defences"]["curtail"][rule]
  row = next(l for l in md.splitlines() if l.startswith("| fgsm |") and " / " in l)
  assert row.split("|")[2].strip() == f"{d['auc']:.3f} / {d['tpr']:.1f}"
  means = next(l for l in md.splitlines() if l.startswith("| digits/mlp |"))
  assert [float(v) for v in means.split("|")[2:4]] == pytest.approx(
      [section.mean_auc(r, n, rule) for n in PLAN.defence_names], abs=5e-4)
  a = r["adaptive"]["0.2"]["curtail"]
  row = next(l for l in md.splitlines() if l.startswith("| 0.2 | CuRTAIL"))
  assert f"{a['tramer']['implied']:.1f} ± {a['tramer']['se']:.1f}" in row
  assert f"Combination rule: **{rule}**" in md
  rs = res["fpr_resplits"]["digits_mlp_s0"]
  assert set(rs) == {"curtail"} and rs["curtail"][rule]["n_val"] == 500
  row = next(l for l in md.splitlines() if l.startswith("| digits/mlp |") and "±" in l)
  assert f"{rs['curtail'][rule]['mean']:.1f} ± {rs['curtail'][rule]['sd']:.1f}" in row
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
