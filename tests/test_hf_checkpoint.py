"""Hugging Face safetensors checkpoints: our loaders against NumPy forwards that
read the HF tensors in HF semantics (tests/np_reference.py), round trips, and
the errors a wrong checkpoint gets."""

import json
import os

import jax
import numpy as np
import pytest

from core import hf_checkpoint
from core.models import bert, lm
from tests import np_reference

BERT = bert.BertConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=4, d_ff=24,
                       max_positions=12)
LLAMA_GQA = lm.LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24,
                        max_seq_len=16, rope_theta=500.0, norm_eps=1e-5)
LLAMA_TIED_BIAS = lm.LMConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=20,
                              max_seq_len=16, use_bias=True, tie_embeddings=True)


def _jitter(params, seed=0, scale=0.3):
  """Random values in every leaf (init's unit norms and zero biases would hide a
  swapped scale/bias or a dropped bias)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: np.asarray(x) + scale * rng.standard_normal(x.shape)
                                .astype(np.float32), params)


def _written_and_loaded(tmp_path, cfg, family, init):
  """Jittered params saved in HF layout and loaded back: (params, loaded, HF config
  dict, HF tensors). The loaded config must be the one written."""
  params = _jitter(init(jax.random.key(1), cfg))
  d = hf_checkpoint.save(str(tmp_path / family), params, cfg, family)
  loaded, lcfg = hf_checkpoint.load(d, family)
  assert lcfg == cfg
  with open(os.path.join(d, "config.json")) as f:
    hf = json.load(f)
  return params, loaded, hf, hf_checkpoint.read_tensors(d)


@pytest.mark.parametrize("cfg", [LLAMA_GQA, LLAMA_TIED_BIAS], ids=["gqa", "tied+bias"])
def test_llama_loader_matches_a_numpy_llama_reading_the_hf_tensors(tmp_path, cfg):
  params, loaded, hf, tensors = _written_and_loaded(tmp_path, cfg, "llama", lm.init)
  tokens = np.array([[3, 17, 0, 39, 5, 8, 21]], np.int32)
  want = np_reference.hf_llama_logits(tensors, hf, tokens[0])
  got = np.asarray(lm.apply(loaded, tokens, cfg)[0], np.float64)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)
  # Round trip: the loaded pytree is the one written, leaf for leaf.
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_bert_loader_matches_a_numpy_bert_reading_the_hf_tensors_with_padding(tmp_path):
  params, loaded, hf, tensors = _written_and_loaded(tmp_path, BERT, "bert", bert.init)
  cfg = BERT
  ids = np.array([[1, 7, 33, 4, 2, 0, 0], [1, 9, 2, 0, 0, 0, 0]], np.int32)
  mask = (ids > 0).astype(np.int32)
  mask[:, 0] = 1
  got = np.asarray(bert.encode(loaded, ids, mask, cfg), np.float64)
  for b in range(2):
    want = np_reference.hf_bert_hidden(tensors, hf, ids[b], mask[b])
    n = mask[b].sum()   # padded positions' states are not used by anyone
    np.testing.assert_allclose(got[b, :n], want[:n], atol=2e-4, rtol=2e-4)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  # Padding does not change the real tokens' states or the mean-pooled embedding.
  short = bert.sentence_embedding(loaded, ids[1:, :3], mask[1:, :3], cfg)
  np.testing.assert_allclose(bert.sentence_embedding(loaded, ids, mask, cfg)[1], short[0],
                             atol=1e-5)


def test_task_head_prefix_buffers_and_strictness(tmp_path):
  params = bert.init(jax.random.key(0), BERT)
  t = {f"bert.{k}": v for k, v in hf_checkpoint.to_hf(params, BERT, "bert").items()}
  t["bert.embeddings.position_ids"] = np.arange(12)[None]   # a buffer, ignored
  t["cls.predictions.bias"] = np.zeros(50, np.float32)      # BertForMaskedLM's head
  with pytest.raises(ValueError, match=r"cls\.predictions\.bias.*strict=False"):
    hf_checkpoint.from_hf(t, BERT, "bert")
  loaded = hf_checkpoint.from_hf(t, BERT, "bert", strict=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)


def test_missing_unexpected_and_misshapen_keys_are_named():
  t = hf_checkpoint.to_hf(lm.init(jax.random.key(0), LLAMA_GQA), LLAMA_GQA, "llama")
  missing = dict(t)
  del missing["model.layers.1.self_attn.k_proj.weight"]
  with pytest.raises(ValueError, match=r"lacks 1 key.*model\.layers\.1\.self_attn\.k_proj\.weight"):
    hf_checkpoint.from_hf(missing, LLAMA_GQA, "llama")
  extra = dict(t, **{"model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]})
  with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
    hf_checkpoint.from_hf(extra, LLAMA_GQA, "llama")
  # A checkpoint with 4 KV heads read under a 2-KV-head config: named, with both shapes.
  wrong = dict(t, **{"model.layers.0.self_attn.v_proj.weight": np.zeros((16, 16), np.float32)})
  with pytest.raises(ValueError, match=r"v_proj\.weight' has shape \(16, 16\); the config needs "
                                       r"\(8, 16\)"):
    hf_checkpoint.from_hf(wrong, LLAMA_GQA, "llama")
  # A tied model whose file repeats the embedding as lm_head: accepted; a different head: refused.
  tied = hf_checkpoint.to_hf(lm.init(jax.random.key(0), LLAMA_TIED_BIAS), LLAMA_TIED_BIAS, "llama")
  hf_checkpoint.from_hf(tied | {"lm_head.weight": tied["model.embed_tokens.weight"]},
                        LLAMA_TIED_BIAS, "llama")
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    hf_checkpoint.from_hf(tied | {"lm_head.weight": tied["model.embed_tokens.weight"] + 1},
                          LLAMA_TIED_BIAS, "llama")
  with pytest.raises(ValueError, match="unknown checkpoint family 'gpt2'"):
    hf_checkpoint.from_hf(t, LLAMA_GQA, "gpt2")


def test_unsupported_hf_configs_are_refused(tmp_path):
  d = tmp_path / "m"
  d.mkdir()
  base = hf_checkpoint.FAMILIES["llama"].config_to_hf(LLAMA_GQA)
  for bad, msg in (({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
                   ({"hidden_act": "gelu"}, "hidden_act")):
    (d / "config.json").write_text(json.dumps(base | bad))
    with pytest.raises(ValueError, match=msg):
      hf_checkpoint.load(str(d), "llama")
  with pytest.raises(FileNotFoundError, match="no .safetensors"):
    (d / "config.json").write_text(json.dumps(base))
    hf_checkpoint.load(str(d), "llama")
