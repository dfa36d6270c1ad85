"""A zero-shot multiple-choice cloze test for byte LMs, built from held-out text.

Each item: the ``context_len`` bytes before a word, the true word, and three
distractor words of the same length (drawn from the same text's word
occurrences, capitalised like the answer), so summed log-likelihood has no
length bias. The model picks the candidate it assigns the highest
log-probability after the context. Chance is 1 / n_choices.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

_WORD = re.compile(rb"[A-Za-z]+")


@dataclasses.dataclass(frozen=True)
class ClozeSet:
  contexts: np.ndarray     # (n, context_len) int32
  candidates: np.ndarray   # (n, n_choices, max_word) int32, zero-padded
  lengths: np.ndarray      # (n, n_choices) int32
  answers: np.ndarray      # (n,) int32, index of the true word

  @property
  def chance(self) -> float:
    return 1.0 / self.candidates.shape[1]

  def __len__(self) -> int:
    return len(self.answers)


def _match_case(word: bytes, like: bytes) -> bytes:
  if like.isupper() and len(like) > 1:
    return word.upper()
  if like[:1].isupper():
    return word[:1].upper() + word[1:].lower()
  return word.lower()


def build(text: np.ndarray, n_items: int = 500, context_len: int = 64, min_len: int = 4,
          max_len: int = 10, n_choices: int = 4, seed: int = 0) -> ClozeSet:
  """Builds ``n_items`` items from the byte array ``text`` (fixed by ``seed``)."""
  raw = bytes(text)
  words = [(m.start(), m.group()) for m in _WORD.finditer(raw)]
  by_len: dict[int, list[bytes]] = {}
  for _, w in words:
    by_len.setdefault(len(w), []).append(w.lower())
  eligible = [(s, w) for s, w in words
              if min_len <= len(w) <= max_len and s >= context_len and raw[s - 1:s] == b" "
              and len(set(by_len[len(w)])) >= n_choices]
  if len(eligible) < n_items:
    raise ValueError(f"only {len(eligible)} eligible words for {n_items} cloze items")
  rng = np.random.default_rng(seed)
  picks = rng.choice(len(eligible), n_items, replace=False)
  ctx = np.zeros((n_items, context_len), np.int32)
  cand = np.zeros((n_items, n_choices, max_len), np.int32)
  lens = np.zeros((n_items, n_choices), np.int32)
  answers = rng.integers(0, n_choices, n_items).astype(np.int32)
  for i, j in enumerate(picks):
    start, word = eligible[j]
    ctx[i] = np.frombuffer(raw[start - context_len:start], np.uint8)
    pool, chosen = by_len[len(word)], {word.lower()}
    options = []
    while len(options) < n_choices - 1:
      w = pool[rng.integers(len(pool))]
      if w not in chosen:
        chosen.add(w)
        options.append(_match_case(w, word))
    options.insert(int(answers[i]), word)
    for c, w in enumerate(options):
      cand[i, c, :len(w)] = np.frombuffer(w, np.uint8)
      lens[i, c] = len(w)
  return ClozeSet(ctx, cand, lens, answers)


@functools.lru_cache(maxsize=32)  # one compile per model function and item shape
def _scorer(logits_fn, k: int, w: int, c: int):
  @jax.jit
  def score(params, ctx_BxC, cand_BxKxW, len_BxK):
    b = ctx_BxC.shape[0]
    seq = jnp.concatenate([jnp.repeat(ctx_BxC[:, None], k, 1), cand_BxKxW], -1).reshape(b * k, c + w)
    logp = jax.nn.log_softmax(logits_fn(params, seq[:, :-1]).astype(jnp.float32), -1)
    # Candidate byte t sits at position c + t and is predicted at position c + t - 1.
    lp = jnp.take_along_axis(logp[:, c - 1:], seq[:, c:, None], -1)[..., 0].reshape(b, k, w)
    mask = jnp.arange(w)[None, None] < len_BxK[..., None]
    return jnp.sum(lp * mask, -1)
  return score


def candidate_logprobs(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                       cloze: ClozeSet, batch_items: int = 32,
                       vocab_size: int = 256) -> np.ndarray:
  """(n, n_choices) summed log-probability of each candidate after its context.
  Every byte of the set must be a token id in [0, vocab_size)."""
  for name in ("contexts", "candidates"):
    a = np.asarray(getattr(cloze, name))
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
      raise ValueError(f"cloze {name} hold token ids from {a.min()} to {a.max()}, outside "
                       f"[0, {vocab_size})")
  if batch_items < 1:
    raise ValueError(f"batch_items must be >= 1, got {batch_items}")
  n, k, w = cloze.candidates.shape
  score = _scorer(logits_fn, k, w, cloze.contexts.shape[1])
  out = []
  for s in range(0, n, batch_items):
    sl = slice(s, s + batch_items)
    chunk = [cloze.contexts[sl], cloze.candidates[sl], cloze.lengths[sl]]
    pad = batch_items - len(chunk[0])
    if pad:
      chunk = [np.concatenate([a, np.repeat(a[:1], pad, 0)]) for a in chunk]
    out.append(np.asarray(score(params, *chunk))[:batch_items - pad])
  return np.concatenate(out)


def accuracy(logits_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
             cloze: ClozeSet, batch_items: int = 32, vocab_size: int = 256) -> float:
  """Fraction of items whose true word gets the highest log-probability."""
  lp = candidate_logprobs(logits_fn, params, cloze, batch_items, vocab_size)
  return float(np.mean(np.argmax(lp, -1) == cloze.answers))
