"""Dataset loaders: documented shapes/dtypes/ranges, splits, and clear errors."""

import gzip
import os

import numpy as np
import pytest
from sklearn.datasets import load_digits

from core import data

_HAS_FASHION = os.path.exists(os.path.join(data.fashion_mnist_dir(), "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.parametrize("name,n_train,n_test,hw", [
    ("digits", 1437, 360, 8), ("mnist5k", 4000, 1000, 28),
    pytest.param("fashion_mnist", 60000, 10000, 28, marks=pytest.mark.skipif(
        not _HAS_FASHION, reason="dataset-fashion-mnist not installed (make data)")),
])
def test_image_datasets_follow_the_contract(name, n_train, n_test, hw):
  ds = data.load(name)
  assert ds.x_train.shape == (n_train, hw, hw, 1) and ds.x_test.shape == (n_test, hw, hw, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() > 0.5
  assert set(np.unique(ds.y_train)) == set(range(10)) and ds.num_classes == 10
  assert ds.input_shape == (hw, hw, 1) and not ds.is_text


def test_digits_split_is_a_seeded_partition_of_sklearn_digits():
  ref = load_digits()
  ds = data.load("digits")
  all_x = np.concatenate([ds.x_train, ds.x_test]).reshape(len(ref.images), -1) * 16
  # Every sklearn image appears exactly once across the two splits.
  order_ref = np.lexsort(ref.images.reshape(len(ref.images), -1).T)
  order_ds = np.lexsort(all_x.T)
  np.testing.assert_allclose(all_x[order_ds], ref.images.reshape(len(ref.images), -1)[order_ref])
  again = data.load("digits")
  np.testing.assert_array_equal(ds.y_test, again.y_test)
  assert not np.array_equal(ds.y_test, data.load("digits", seed=1).y_test)


def test_kjv_splits_by_book():
  ds = data.load("kjv")
  assert ds.is_text and ds.x_train.dtype == np.uint8 and ds.x_train.ndim == 1
  train, valid = bytes(ds.x_train), bytes(ds.x_test)
  assert train.startswith(b"In the beginning God created the heaven and the earth.")
  ruth_opening = b"Now it came to pass in the days when the judges ruled"
  assert valid.startswith(ruth_opening) and ruth_opening not in train
  assert b"The beginning of the gospel of Jesus Christ" in valid  # Mark 1:1
  assert 0.02 < len(valid) / (len(train) + len(valid)) < 0.06
  assert b"[" not in train and b"1. " not in train[:1000]


def _write_idx(path, arr):
  header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_from_env_dir(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  imgs = {"train": rng.integers(0, 256, (5, 28, 28)), "t10k": rng.integers(0, 256, (3, 28, 28))}
  labels = {"train": rng.integers(0, 10, 5), "t10k": rng.integers(0, 10, 3)}
  for split in ("train", "t10k"):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", imgs[split])
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
  monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path))
  ds = data.load("fashion_mnist")
  np.testing.assert_allclose(ds.x_train[..., 0] * 255, imgs["train"], atol=1e-4)
  np.testing.assert_array_equal(ds.y_test, labels["t10k"])


def test_load_names_a_wrong_keyword_and_the_accepted_ones():
  with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['sed'\]; it accepts \['seed'\]"):
    data.load("digits", sed=3)


def test_holdout_carves_disjoint_validation_images():
  ds = data.load("digits")
  rest, x_val, y_val = data.holdout(ds, 100, seed=0)
  assert len(rest.x_train) + len(x_val) == len(ds.x_train) and len(y_val) == 100
  flat = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
  assert flat(rest.x_train) | flat(x_val) == flat(ds.x_train)  # nothing lost
  assert not flat(rest.x_train) & flat(x_val) - flat(ds.x_test)  # disjoint (up to duplicates)
  np.testing.assert_array_equal(rest.x_test, ds.x_test)  # the test split is untouched
  with pytest.raises(ValueError, match="0 < n <"):
    data.holdout(ds, 0)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.load("fashion_mnist", data_dir=str(tmp_path / "nowhere"))


def test_unknown_dataset_lists_the_known_ones():
  with pytest.raises(ValueError, match="Unknown dataset 'cifar10'.*mnist5k"):
    data.load("cifar10")


def test_batches_are_pure_functions_of_seed_and_step():
  ds = data.load("digits")
  a, b = data.image_batch(ds, 16, 0, 7), data.image_batch(ds, 16, 0, 7)
  np.testing.assert_array_equal(a["x"], b["x"])
  assert not np.array_equal(a["y"], data.image_batch(ds, 16, 0, 8)["y"])
  text = np.arange(1000, dtype=np.uint8)
  t = data.text_batch(text, 4, 32, 0, 3)["tokens"]
  assert t.shape == (4, 33) and t.dtype == np.int32
  np.testing.assert_array_equal(np.diff(t, axis=1) % 256, 1)  # contiguous windows
  w = data.text_eval_windows(text, 10)
  assert w.shape == (99, 11) and w[1, 0] == 10  # consecutive windows share one byte
  with pytest.raises(ValueError, match="too short"):
    data.text_batch(text[:20], 4, 32, 0, 0)
