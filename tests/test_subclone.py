"""Weight subcloning on LM param pytrees: identity, validity, index consistency,
scaling, errors, checkpoints; the speed-up study's plumbing."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import checkpoint
from core.models import bert, lm, vit
from subclone import importance, surgery

CFG = lm.LMConfig(vocab_size=256, d_model=32, n_layers=4, n_heads=4, d_ff=48, max_seq_len=16)
GQA = lm.LMConfig(vocab_size=256, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48,
                  max_seq_len=16, use_bias=True)
apply = jax.jit(lm.apply, static_argnums=2)


def _parent(cfg):
  params = lm.init(jax.random.key(0), cfg)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 256)
  return params, tokens, importance.lm_importance(params, tokens, cfg)


@pytest.mark.parametrize("cfg", [CFG, GQA])
def test_identity_subclone_returns_the_parent(cfg):
  params, tokens, imp = _parent(cfg)
  spec = surgery.ChildSpec(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers)
  child, ccfg = surgery.subclone_lm(params, cfg, imp, spec, order="first")
  assert ccfg == cfg
  chex.assert_trees_all_equal(child, params)
  # Importance order at full size is a consistent permutation: same function.
  perm, _ = surgery.subclone_lm(params, cfg, imp, spec)
  np.testing.assert_allclose(apply(perm, tokens, cfg), apply(params, tokens, cfg), atol=1e-4)


@pytest.mark.parametrize("cfg", [CFG, GQA])
def test_child_is_a_valid_model_of_its_own_config(cfg):
  params, tokens, imp = _parent(cfg)
  child, ccfg = surgery.subclone_lm(params, cfg, imp, surgery.ChildSpec(16, 2, 24, 3))
  chex.assert_trees_all_equal_shapes_and_dtypes(child, lm.init(jax.random.key(0), ccfg))
  out = apply(child, tokens, ccfg)
  chex.assert_shape(out, (4, 16, 256))
  chex.assert_tree_all_finite(out)


def test_known_important_neurons_heads_and_units_are_kept():
  params, tokens, _ = _parent(CFG)
  params = jax.tree_util.tree_map(lambda x: x, params)
  # Residual neurons 3 and 7 carry large embeddings; head 2 of block 1 has a
  # large value projection; MLP unit 5 of block 0 a large up projection.
  params["embed"]["embedding"] = params["embed"]["embedding"].at[:, jnp.array([3, 7])].mul(20.0)
  params["block_1"]["attn"]["wv"] = params["block_1"]["attn"]["wv"].at[:, 2].mul(20.0)
  params["block_0"]["mlp"]["w_up"] = params["block_0"]["mlp"]["w_up"].at[:, 5].mul(20.0)
  imp = importance.lm_importance(params, tokens, CFG)
  assert set(importance.ranking(imp.residual)[:2]) == {3, 7}
  assert importance.ranking(imp.heads[1])[0] == 2
  assert importance.ranking(imp.mlp[0])[0] == 5
  child, _ = surgery.subclone_lm(params, CFG, imp, surgery.ChildSpec(16, 2, 24, 4), scale=False)
  emb = np.asarray(params["embed"]["embedding"])
  np.testing.assert_array_equal(child["embed"]["embedding"][:, :2], emb[:, importance.ranking(imp.residual)[:2]])
  d_idx = importance.ranking(imp.residual)[:16]
  np.testing.assert_array_equal(child["block_1"]["attn"]["wv"][:, 0],
                                np.asarray(params["block_1"]["attn"]["wv"])[d_idx, 2])
  np.testing.assert_array_equal(child["block_0"]["mlp"]["w_up"][:, 0],
                                np.asarray(params["block_0"]["mlp"]["w_up"])[d_idx, 5])


def test_scaling_applies_to_residual_reading_weights_not_norms_or_biases():
  params, _, imp = _parent(GQA)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if path[-1].key.startswith("b") or path[-1].key == "scale" else x,
      params)
  spec = surgery.ChildSpec(16, 2, 24, 4)
  scaled, _ = surgery.subclone_lm(params, GQA, imp, spec)
  plain, _ = surgery.subclone_lm(params, GQA, imp, spec, scale=False)
  s = np.sqrt(32 / 16)
  for path in [("block_0", "attn", "wq"), ("block_2", "mlp", "w_up"), ("unembed", "kernel")]:
    get = lambda t: np.asarray(t[path[0]][path[1]][path[2]] if len(path) == 3 else t[path[0]][path[1]])
    np.testing.assert_allclose(get(scaled), s * get(plain), rtol=1e-6)
  for path in [("block_0", "attn", "wo"), ("block_1", "mlp", "w_down"), ("block_0", "attn", "bq"),
               ("block_3", "mlp", "b_down"), ("block_1", "attn_norm", "scale")]:
    np.testing.assert_array_equal(scaled[path[0]][path[1]][path[2]], plain[path[0]][path[1]][path[2]])
  np.testing.assert_array_equal(scaled["final_norm"]["scale"], plain["final_norm"]["scale"])


def test_middle_blocks_are_removed_by_default():
  assert surgery.kept_blocks(8, 6) == [0, 1, 2, 5, 6, 7]
  assert surgery.kept_blocks(8, 5, remove="last") == [0, 1, 2, 3, 4]
  assert surgery.kept_blocks(8, 2, remove="first") == [6, 7]
  assert surgery.kept_blocks(8, 2, keep=[7, 0]) == [0, 7]
  params, _, imp = _parent(CFG)
  child, _ = surgery.subclone_lm(params, CFG, imp, surgery.ChildSpec(32, 4, 48, 2), order="first")
  chex.assert_trees_all_equal(child["block_1"], params["block_3"])


@pytest.mark.parametrize("spec,match", [
    (surgery.ChildSpec(64, 8, 48, 4), "d_model=64"),
    (surgery.ChildSpec(16, 4, 48, 4), "head_dim"),
    (surgery.ChildSpec(32, 4, 48, 0), "n_layers=0"),
])
def test_invalid_targets_are_rejected(spec, match):
  params, _, imp = _parent(CFG)
  with pytest.raises(ValueError, match=match):
    surgery.subclone_lm(params, CFG, imp, spec)


def test_gqa_heads_must_keep_whole_groups_and_bad_options_fail():
  params, _, imp = _parent(GQA)
  with pytest.raises(ValueError, match="KV group"):
    surgery.subclone_lm(params, GQA, imp, surgery.ChildSpec(8, 1, 24, 2))
  with pytest.raises(ValueError, match="unknown order"):
    surgery.subclone_lm(params, GQA, imp, surgery.ChildSpec(16, 2, 24, 2), order="best")
  with pytest.raises(ValueError, match="distinct"):
    surgery.kept_blocks(4, 2, keep=[1, 1])


def test_child_restores_from_orbax(tmp_path):
  params, _, imp = _parent(CFG)
  child, _ = surgery.subclone_lm(params, CFG, imp, surgery.ChildSpec(16, 2, 24, 3))
  checkpoint.save_pytree(str(tmp_path / "child"), child)
  chex.assert_trees_all_equal(checkpoint.load_pytree(str(tmp_path / "child"), like=child), child)


VIT = vit.ViTConfig(input_shape=(8, 8, 1), patch=4, d_model=32, n_layers=3, n_heads=4, d_ff=48)


def _vit_parent():
  params = vit.init(jax.random.key(0), VIT)
  params["head"]["kernel"] = jax.random.normal(jax.random.key(2), params["head"]["kernel"].shape)
  images = jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))
  return params, images, importance.vit_importance(params, images, VIT)


def test_vit_identity_and_permuted_subclone_keep_the_function():
  params, images, imp = _vit_parent()
  spec = surgery.ChildSpec(32, 4, 48, 3)
  same, ccfg = surgery.subclone_vit(params, VIT, imp, spec, order="first")
  assert ccfg == VIT
  chex.assert_trees_all_equal(same, params)
  perm, _ = surgery.subclone_vit(params, VIT, imp, spec)
  vit_apply = jax.jit(vit.apply, static_argnums=2)
  np.testing.assert_allclose(vit_apply(perm, images, VIT), vit_apply(params, images, VIT),
                             atol=1e-4)


BERT = bert.BertConfig(vocab_size=60, d_model=32, n_layers=2, n_heads=4, d_ff=48,
                       max_positions=16)


def _bert_parent():
  # Random LayerNorm parameters, so a wrong LN subsampling cannot hide behind ones/zeros.
  params = jax.tree_util.tree_map(
      lambda x: x + 0.2 * jax.random.normal(jax.random.key(7), x.shape),
      bert.init(jax.random.key(0), BERT))
  ids = jax.random.randint(jax.random.key(1), (4, 12), 1, 60)
  mask = jnp.asarray(np.arange(12)[None] < np.array([12, 9, 5, 12])[:, None], jnp.int32)
  return params, ids, mask, importance.bert_importance(params, ids, mask, BERT)


def test_bert_identity_and_permuted_subclone_keep_the_function():
  """Post-LN surgery: the identity spec returns the parent; an importance-ordered
  full-size child (a permutation of the residual neurons, heads and units) is the
  same function, its sentence embedding the parent's permuted."""
  params, ids, mask, imp = _bert_parent()
  spec = surgery.ChildSpec(32, 4, 48, 2)
  same, ccfg = surgery.subclone_bert(params, BERT, imp, spec, order="first")
  assert ccfg == BERT
  chex.assert_trees_all_equal(same, params)
  perm, _ = surgery.subclone_bert(params, BERT, imp, spec)
  d_idx = importance.ranking(imp.residual)
  assert not np.array_equal(d_idx, np.arange(32))   # a real permutation
  emb = jax.jit(bert.sentence_embedding, static_argnums=(3, 4))
  want = emb(params, ids, mask, BERT, False)[:, d_idx]
  np.testing.assert_allclose(emb(perm, ids, mask, BERT, False), want, atol=2e-5)


def test_bert_importance_ignores_padding_and_the_half_width_child_is_valid():
  params, ids, mask, imp = _bert_parent()
  # Padded positions carry no weight: other tokens under the padding change nothing
  # (same shapes, so no new compilation), while unmasking them does.
  other = jnp.where(mask > 0, ids, (ids * 7 + 3) % 60)
  assert not np.array_equal(other, ids)
  same = importance.bert_importance(params, other, mask, BERT)
  np.testing.assert_allclose(same.residual, imp.residual, rtol=1e-5)
  np.testing.assert_allclose(same.mlp[1], imp.mlp[1], rtol=1e-5)
  unmasked = importance.bert_importance(params, other, jnp.ones_like(mask), BERT)
  assert np.abs(unmasked.residual - imp.residual).max() > 1e-3
  child, ccfg = surgery.subclone_bert(params, BERT, imp, surgery.ChildSpec(16, 2, 24, 1))
  chex.assert_trees_all_equal_shapes_and_dtypes(child, bert.init(jax.random.key(0), ccfg))
  kept = surgery.kept_blocks(2, 1)
  d_idx = importance.ranking(imp.residual)[:16]
  # A reader of the stream is scaled by sqrt(32/16); LN parameters only subsampled.
  np.testing.assert_allclose(child["block_0"]["mlp"]["w_in"][:, 0],
                             params[f"block_{kept[0]}"]["mlp"]["w_in"][
                                 d_idx, importance.ranking(imp.mlp[kept[0]])[0]] * np.sqrt(2),
                             rtol=1e-6)
  np.testing.assert_array_equal(child["block_0"]["mlp_norm"]["scale"],
                                params[f"block_{kept[0]}"]["mlp_norm"]["scale"][d_idx])
  out = bert.sentence_embedding(child, ids, mask, ccfg)
  chex.assert_shape(out, (4, 16))
  chex.assert_tree_all_finite(out)


def test_vit_half_width_child_is_valid():
  params, images, imp = _vit_parent()
  child, ccfg = surgery.subclone_vit(params, VIT, imp, surgery.ChildSpec(16, 2, 24, 2))
  chex.assert_trees_all_equal_shapes_and_dtypes(child, vit.init(jax.random.key(0), ccfg))
  out = jax.jit(vit.apply, static_argnums=2)(child, images, ccfg)
  chex.assert_shape(out, (6, 10))
  chex.assert_tree_all_finite(out)
  with pytest.raises(ValueError, match="head_dim"):
    surgery.subclone_vit(params, VIT, imp, surgery.ChildSpec(16, 4, 24, 2))


def test_weight_selection_takes_evenly_spaced_indices_and_first_layers():
  from subclone import peers
  params, _, _ = _parent(CFG)
  child, ccfg = peers.weight_selection(params, CFG, surgery.ChildSpec(16, 2, 24, 2))
  d_idx = np.arange(0, 32, 2)  # every other neuron: 16 of 32
  np.testing.assert_array_equal(child["embed"]["embedding"],
                                np.asarray(params["embed"]["embedding"])[:, d_idx])
  np.testing.assert_array_equal(child["block_1"]["mlp"]["w_down"],
                                np.asarray(params["block_1"]["mlp"]["w_down"])[np.arange(0, 48, 2)][:, d_idx])
  assert ccfg.n_layers == 2


def test_block_influence_finds_an_identity_block():
  from subclone import peers
  params, tokens, _ = _parent(CFG)
  params = jax.tree_util.tree_map(lambda x: x, params)
  params["block_2"]["attn"]["wo"] = jnp.zeros_like(params["block_2"]["attn"]["wo"])
  params["block_2"]["mlp"]["w_down"] = jnp.zeros_like(params["block_2"]["mlp"]["w_down"])
  bi = peers.block_influence(params, tokens, CFG)
  np.testing.assert_allclose(bi[2], 0.0, atol=1e-6)
  assert (np.delete(bi, 2) > 1e-4).all()
  assert peers.blocks_by_influence(bi, 3) == [0, 1, 3]


def test_crossing_step_interpolates_between_evaluations():
  from subclone.speedup import crossing_step
  curve = [(0, 3.0), (10, 2.0), (20, 1.0), (30, 1.2)]
  assert crossing_step(curve, 1.5) == 15.0          # halfway from 2.0 to 1.0
  assert crossing_step(curve, 3.5) == 0.0
  assert crossing_step(curve, 0.5) is None


def test_speedup_is_the_ratio_of_crossing_steps():
  from subclone.speedup import speedup
  ref = {"final_loss": 1.0, "curve": [(0, 5.0), (40, 2.0), (80, 1.0)]}
  run = {"final_loss": 0.8, "curve": [(0, 2.0), (10, 1.5), (20, 1.0)]}
  r = speedup(ref, run)
  assert (r["steps_reference"], r["steps"], r["speedup"]) == (80.0, 20.0, 4.0)


def test_importance_with_the_wrong_config_names_the_mismatch():
  cfg = lm.LMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=32, max_seq_len=16)
  params = lm.init(jax.random.key(0), cfg)
  deeper = lm.LMConfig(d_model=32, n_layers=3, n_heads=4, d_ff=32, max_seq_len=16)
  with pytest.raises(ValueError, match=r"lm_importance: params do not match.*missing.*block_2"):
    importance.lm_importance(params, np.zeros((1, 8), np.int32), deeper)


def test_run_cache_resumes_and_keeps_other_studies_files(tmp_path):
  from core.cache import RunCache, params_fingerprint
  path, calls = str(tmp_path / "runs.json"), []
  make = lambda: calls.append(1) or {"final_loss": float(len(calls))}
  parent = {"w": np.arange(6.0).reshape(2, 3)}
  meta = lambda p, code="v1": {"cfg": 1, "parent_weights": params_fingerprint(p), "code": code}
  RunCache(path, meta(parent)).get("k", make)
  assert RunCache(path, meta(parent)).get("k", make) == {"final_loss": 1.0} and len(calls) == 1
  # A retrained parent with the same config: other weights, so the run is not reused...
  retrained = {"w": parent["w"] + 1e-3}
  assert params_fingerprint(retrained) != params_fingerprint(parent)
  cache = RunCache(path, meta(retrained))
  assert cache.get("k", make) == {"final_loss": 2.0} and len(calls) == 2
  # ...and the old file is kept aside, not overwritten.
  with open(cache.moved_aside) as f:
    assert json.load(f)["runs"] == {"k": {"final_loss": 1.0}}
  # A new version of the producing code invalidates too.
  RunCache(path, meta(retrained, code="v2")).get("k", make)
  assert len(calls) == 3
  assert len([p for p in os.listdir(tmp_path) if ".stale-" in p]) == 2


def test_lm_study_plumbing_on_a_tiny_parent(tmp_path):
  from core.recipes import train_lm
  from core.train import TrainConfig
  from subclone import study
  from subclone.speedup import Budget, Recipe
  pcfg = lm.LMConfig(d_model=32, n_layers=3, n_heads=4, d_ff=32, max_seq_len=32)
  train_lm(pcfg, TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=3), eval_windows=2,
           workdir=str(tmp_path), progress=False)
  parent, cfg = study.load_parent(str(tmp_path))
  assert cfg == pcfg
  scfg = study.StudyConfig(budget=Budget(steps=4, batch=2, eval_every=2),
                           random_grid=(Recipe(3e-3, 0.1),), sub_grid=(Recipe(1e-3, 0.0),),
                           seeds=(1,), ablations=("weight selection (peer)",),
                           ablation_seeds=(1,),
                           calib=2, eval_size=2, seq_len=32)
  res = study.lm_study(parent, cfg, scfg, str(tmp_path / "runs.json"), progress=False)
  assert res["child_config"]["d_model"] == 16 and res["child_config"]["n_layers"] == 2
  assert set(res["variants"]) == {"subcloned", "weight selection (peer)", "random init"}
  r = res["seeds"][1]
  assert [s for s, _ in r["subcloned"]["curve"]] == [0, 2, 4]
  # Subcloning a trained parent starts below a random init's loss (ln 256 = 5.5).
  assert r["subcloned"]["initial_loss"] < r["random"]["initial_loss"]
  # Seed 1's random and subcloned runs are shared with the report seeds: one new run.
  assert len(json.load(open(tmp_path / "runs.json"))["runs"]) == 6
  # The spread over seeds leaves out the sweep seed (it chose the recipe).
  assert {n: len(v) for n, v in res["variant_speedups"].items()} == {
      "subcloned": 1, "weight selection (peer)": 1, "random init": 1}
  np.testing.assert_equal(res["variant_speedups"]["subcloned"], [res["seeds"][1]["speedup"]])
