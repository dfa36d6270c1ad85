"""Ladder Residual: the unsharded model against a NumPy ladder written from the
paper's equations, the TP forward against the unsharded one (with an SPD drop and a
KV cache), and what the compiled HLO does with the all-reduces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import recipes
from core.models import ladder, lm
from spd_jax import ladder as ladder_tp
from spd_jax import sharding, tp
from tests import np_reference as ref

CFG = lm.LMConfig(d_model=32, n_layers=3, n_heads=4, d_ff=64, max_seq_len=16, vocab_size=50)


def _np_ladder(params, tokens, cfg, drop):
  """x += a_{i-1}; a_i = Attn(norm x); x += m_{i-1}; m_i = MLP(norm x); a dropped block's
  attention output joins its MLP output (added before the next MLP, not the next attention)."""
  p = ref.to_np(params)
  out = []
  for seq in np.asarray(tokens):
    x = p["embed"]["embedding"][seq]
    prev_a = prev_m = 0.0
    for i in range(cfg.n_layers):
      b = p[f"block_{i}"]
      x = x + prev_a
      a = ref.attention_heads(b, ref.np_rms(x, b["attn_norm"]["scale"]), range(cfg.n_heads), cfg)
      x = x + prev_m
      m = ref.mlp_units(b, ref.np_rms(x, b["mlp_norm"]["scale"]), np.arange(cfg.d_ff))
      prev_a, prev_m = (0.0, a + m) if drop[i] else (a, m)
    out.append(ref.np_rms(x + prev_a + prev_m, p["final_norm"]["scale"]) @ p["unembed"]["kernel"])
  return np.stack(out)


def test_ladder_matches_numpy_and_tp_matches_unsharded():
  params = lm.init(jax.random.key(0), CFG)
  tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
  drop = (False, True, False)
  for d in ((False,) * 3, drop):
    np.testing.assert_allclose(ladder.apply(params, tokens, CFG, d),
                               _np_ladder(params, tokens, CFG, d), atol=2e-4, rtol=1e-4)
  assert np.abs(ladder.apply(params, tokens, CFG) - lm.apply(params, tokens, CFG)).max() > 0.1
  for n in (2, 4):
    mesh = sharding.make_mesh(n)
    sp = tp.prepare_params(params, CFG, mesh)
    f = ladder_tp.make_forward(CFG, mesh, drop)
    np.testing.assert_allclose(f(sp, tokens), ladder.apply(params, tokens, CFG, drop),
                               atol=1e-5, rtol=1e-5)
    # XLA:CPU emits no async all-reduce pairs; its combiner merges the ladder's
    # independent all-reduces into tuple ops: 2 L - dropped tensors in fewer ops.
    hlo = ladder_tp.async_overlap(f.lower(sp, tokens).compile().as_text())
    assert hlo["tensors"] == 2 * 3 - 1 and hlo["ops"] <= hlo["tensors"]
  fc = ladder_tp.make_forward(CFG, mesh, with_cache=True)
  cache = tp.init_cache(CFG, mesh, 2, 16)
  _, cache = fc(sp, tokens[:, :5], cache, jnp.int32(0))
  step, _ = fc(sp, tokens[:, 5:6], cache, jnp.int32(5))
  np.testing.assert_allclose(step[:, 0], ladder.apply(params, tokens[:, :6], CFG)[:, 5],
                             atol=1e-5, rtol=1e-5)


def test_ladder_bad_inputs_raise():
  with pytest.raises(ValueError, match="sync plan has 2 blocks, model has 3"):
    ladder_tp.make_forward(CFG, sharding.make_mesh(2), (True, False))
  with pytest.raises(ValueError, match="does not divide"):
    ladder_tp.make_forward(CFG, sharding.make_mesh(3))
  with pytest.raises(ValueError, match="architecture must be one of"):
    recipes.train_lm(CFG, recipes.TrainConfig(steps=1, warmup_steps=0), architecture="parallel")


def test_ladder_latency_model_by_hand():
  from spd_jax import latency_model as lat
  m = lat.LLAMA2["7b"]
  hw = lat.PRESETS["a100-nvlink"]
  kw = dict(batch=1, new_tokens=64, context=1024)
  r0 = lat.ladder_latency(m, hw, 8, overlap=0.0, **kw)
  assert r0["ladder"] == pytest.approx(r0["standard"])   # nothing hidden
  assert r0["standard"] == pytest.approx(lat.forward_latency(m, hw, 8, **kw)["total"], rel=0.02)
  t_attn, t_mlp = lat.module_times(m, hw, 8, 64, 1024, 1)
  t_ar = lat.allreduce_time(64 * m.d_model * 2, 8, hw.alpha, hw.link_bw)
  r = lat.ladder_latency(m, hw, 8, **kw)
  # By hand: 2L modules alternate attention and MLP; each all-reduce but the last hides
  # behind the next module, exposing max(0, t_AR - t_next).
  exposed = (m.n_layers * max(0.0, t_ar - t_mlp) + (m.n_layers - 1) * max(0.0, t_ar - t_attn)
             + t_ar)
  assert r["exposed_comm"] == pytest.approx(exposed)
  assert r["ladder"] == pytest.approx(r["compute"] + exposed)
  assert r["standard"] == pytest.approx(r["compute"] + 2 * m.n_layers * t_ar)
  spd = lat.ladder_latency(m, hw, 8, dropped=[True] * m.n_layers, **kw)
  assert spd["comm"] == pytest.approx(m.n_layers * t_ar)  # one sync per block
  with pytest.raises(ValueError, match="overlap must lie in"):
    lat.ladder_latency(m, hw, 8, overlap=1.5)
  with pytest.raises(ValueError, match="32 blocks; got 2 drop flags"):
    lat.ladder_latency(m, hw, 8, dropped=[True, False])


def test_ladder_section_shows_the_records(tmp_path):
  from spd_jax import ladder_study
  res = {"standard": {"perplexity": 3.5}, "ladder": {"perplexity": 3.52}, "n_layers": 16,
         "spd_on_ladder": {"ppl": [3.52 + 0.01 * k for k in range(17)], "k_within_budget": 3,
                           "order": list(range(16)), "isolated": [0.0] * 16}}
  md = ladder_study.render(res, str(tmp_path), k_standard=14).body
  assert "ladder 3.520, standard 3.500 (+0.57%; target within 1%: met)" in md
  rows = ladder_study.latency_rows(16, 14, 3)
  r = next(x for x in rows if x["hardware"] == "h100-nvlink" and x["phase"] == "decode")
  line = next(l for l in md.splitlines() if l.startswith("| h100-nvlink | decode |"))
  cells = [c.strip() for c in line.split("|")[1:-1]]
  assert cells[4:] == [f"{100 * r['spd']:.1f}%", f"{100 * r['ladder']:.1f}%",
                       f"{100 * r['ladder_spd']:.1f}%"]
  assert r["ladder_spd"] >= r["ladder"] - 1e-12  # dropping syncs never adds modelled time
