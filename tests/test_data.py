"""Tests for ddpm_jax.data: the bundled subset, IDX and TFDS loaders, preprocess, batches."""

import gzip
import hashlib
import importlib.resources
import pathlib
import sys

import ml_collections
import numpy as np
import pytest

from ddpm_jax import data
from ddpm_jax.errors import UserError

# What ddpm_jax/assets/README.md documents for mnist_bundled.npz (scripts/build_bundled_mnist.py).
TRAIN_COUNTS = [801, 927, 791, 832, 780, 663, 814, 870, 744, 778]
DIGESTS = {
    "train_images": "58db4a565e836658dd97fde0abb34188f62e6922841a8f4f9c61cba546ac3eae",
    "train_labels": "363c3974abf7c253f0effbf6135cfe2d53e5f4b3ce532411ff877ef3afefe93f",
    "test_images": "680ea72f1ed25650405960f715c014718c7c94e91250837b5d57298119664375",
    "test_labels": "203f4b58ce40139ea2b88a0799846775005defaea938ff8e3871162b874e3357",
}


def _sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(source="bundled", name="mnist", dir="", channels=1))
  config.update(overrides)
  return config


# --- bundled subset ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled():
  return {split: data.load_bundled(split) for split in data.SPLITS}


def test_bundled_shapes_dtypes_and_class_balance(bundled):
  (train, train_labels), (test, test_labels) = bundled["train"], bundled["test"]
  assert train.shape == (8000, 28, 28, 1) and train.dtype == np.uint8
  assert test.shape == (2000, 28, 28, 1) and test.dtype == np.uint8
  assert train_labels.shape == (8000,) and train_labels.dtype == np.int32
  assert test_labels.shape == (2000,) and test_labels.dtype == np.int32
  assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_COUNTS
  assert np.bincount(test_labels, minlength=10).tolist() == [200] * 10


def test_bundled_matches_documented_digests(bundled):
  readme = (importlib.resources.files("ddpm_jax") / "assets" / "README.md").read_text()
  for split, (images, labels) in bundled.items():
    for key, array in ((f"{split}_images", images[..., 0]), (f"{split}_labels",
                                                             labels.astype(np.uint8))):
      assert _sha256(array) == DIGESTS[key], key
      assert DIGESTS[key] in readme, key


def test_bundled_images_are_distinct_real_digits(bundled):
  hashes = {split: [hashlib.sha256(i.tobytes()).hexdigest() for i in images]
            for split, (images, _) in bundled.items()}
  assert len(set(hashes["train"])) == 8000
  assert len(set(hashes["test"])) == 2000
  assert not set(hashes["train"]) & set(hashes["test"])
  images = bundled["train"][0]
  assert images.min() == 0 and images.max() == 255
  # MNIST digits: black background (the top row and left column are never lit here),
  # 19.1 % of pixels lit, mean 33.35 (MNIST's whole training set: 33.32).
  assert images[:, 0].max() == 0 and images[:, :, 0].max() == 0
  assert abs((images > 0).mean() - 0.1911) < 1e-4
  assert abs(images.mean() - 33.352) < 1e-3


def test_bundled_unknown_split():
  with pytest.raises(UserError, match="unknown split 'validation'"):
    data.load_bundled("validation")


# --- IDX files --------------------------------------------------------------------------


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: pathlib.Path, split: str, images: np.ndarray, labels: np.ndarray,
               gz: bool = False) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  prefix = "train" if split == "train" else "t10k"
  for name, payload in ((f"{prefix}-images-idx3-ubyte", _idx_bytes(2051, images)),
                        (f"{prefix}-labels-idx1-ubyte", _idx_bytes(2049, labels))):
    if gz:
      (folder / f"{name}.gz").write_bytes(gzip.compress(payload, mtime=0))
    else:
      (folder / name).write_bytes(payload)


def _random_split(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
          rng.integers(0, 10, n, dtype=np.uint8))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "MNIST/raw"])
def test_idx_round_trip(tmp_path, gz, layout):
  folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
  written = {"train": _random_split(0, 37), "test": _random_split(1, 11)}
  for split, (images, labels) in written.items():
    _write_idx(folder, split, images, labels, gz=gz)
  for split, (images, labels) in written.items():
    got_images, got_labels = data.load_idx(str(tmp_path), split)
    assert got_images.shape == (len(images), 28, 28, 1) and got_images.dtype == np.uint8
    assert got_labels.dtype == np.int32
    np.testing.assert_array_equal(got_images[..., 0], images)
    np.testing.assert_array_equal(got_labels, labels)


def test_idx_through_load_dataset(tmp_path):
  images, labels = _random_split(2, 9)
  _write_idx(tmp_path, "test", images, labels, gz=True)
  got_images, got_labels = data.load_dataset(_data_config(source="idx", dir=str(tmp_path)), "test")
  np.testing.assert_array_equal(got_images[..., 0], images)
  np.testing.assert_array_equal(got_labels, labels)


def test_idx_missing_dir(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    data.load_idx(str(tmp_path / "nowhere"), "train")


def test_idx_missing_file_names_file_and_places(tmp_path):
  images, labels = _random_split(0, 5)
  _write_idx(tmp_path, "train", images, labels)
  (tmp_path / "train-labels-idx1-ubyte").unlink()
  with pytest.raises(UserError) as e:
    data.load_idx(str(tmp_path), "train")
  message = str(e.value)
  assert "train-labels-idx1-ubyte" in message
  assert str(tmp_path) in message and str(tmp_path / "MNIST" / "raw") in message
  assert "\n" not in message


@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_magic(tmp_path, gz):
  images, labels = _random_split(0, 5)
  _write_idx(tmp_path, "train", images, labels)
  # A label file where the image file should be.
  payload = _idx_bytes(2049, labels)
  (tmp_path / "train-images-idx3-ubyte").unlink()
  name = "train-images-idx3-ubyte" + (".gz" if gz else "")
  (tmp_path / name).write_bytes(gzip.compress(payload) if gz else payload)
  with pytest.raises(UserError, match=f"{name}: magic number 2049, expected 2051"):
    data.load_idx(str(tmp_path), "train")


@pytest.mark.parametrize("cut", [1, 784, 784 * 5 + 10])
def test_idx_truncated(tmp_path, cut):
  images, labels = _random_split(0, 5)
  _write_idx(tmp_path, "train", images, labels)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-cut])
  with pytest.raises(UserError, match="train-images-idx3-ubyte: .*truncated"):
    data.load_idx(str(tmp_path), "train")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_idx_broken_gzip(tmp_path, damage):
  images, labels = _random_split(0, 50)
  _write_idx(tmp_path, "test", images, labels, gz=True)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  raw = bytearray(path.read_bytes())
  if damage == "truncated":
    raw = raw[:-100]
  else:  # Flipped bytes inside the deflate stream (zlib.error, not OSError).
    raw[20:60] = bytes(b ^ 0xFF for b in raw[20:60])
  path.write_bytes(bytes(raw))
  with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz: broken gzip data"):
    data.load_idx(str(tmp_path), "test")


def test_idx_count_mismatch(tmp_path):
  images, labels = _random_split(0, 6)
  _write_idx(tmp_path, "train", images, labels[:4])
  with pytest.raises(UserError, match="holds 6 images but .*train-labels-idx1-ubyte holds 4"):
    data.load_idx(str(tmp_path), "train")


# --- TFDS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
  return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_tfds_mock_data(tfds, tmp_path, name, shape):
  with tfds.testing.mock_data(num_examples=6):
    images, labels = data.load_tfds(name, "train", str(tmp_path))
  assert images.shape == (6, *shape) and images.dtype == np.uint8
  assert labels.shape == (6,) and labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < 10


def test_tfds_through_load_dataset_checks_channels(tfds, tmp_path):
  config = _data_config(source="tfds", name="cifar10", dir=str(tmp_path), channels=3)
  with tfds.testing.mock_data(num_examples=4):
    images, _ = data.load_dataset(config, "test")
    assert images.shape == (4, 32, 32, 3)
    config.channels = 1
    with pytest.raises(UserError, match="has 3 channel.*--config.data.channels=3"):
      data.load_dataset(config, "test")


@pytest.mark.parametrize("use_default_dir", [False, True])
def test_tfds_not_prepared(tfds, tmp_path, monkeypatch, use_default_dir):
  if use_default_dir:
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path))
  with pytest.raises(UserError) as e:
    data.load_tfds("mnist", "train", None if use_default_dir else str(tmp_path))
  message = str(e.value)
  assert "not prepared" in message and "pip install tensorflow-cpu" in message
  assert f"{tmp_path}/downloads/manual" in message and "source=idx" in message
  assert "\n" not in message


def test_tfds_prepared_as_tfrecord(tfds, tmp_path):
  builder = tfds.builder("mnist", data_dir=str(tmp_path))  # TFRecord: the default format.
  pathlib.Path(builder.data_dir).mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(UserError, match="prepared as tfrecord, which tfds.data_source cannot read"):
    data.load_tfds("mnist", "test", str(tmp_path))


def test_tfds_missing(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(UserError, match=r"pip install 'ddpm-jax\[tfds\]'"):
    data.load_tfds("mnist", "train", None)


def test_tfds_unknown_name():
  with pytest.raises(UserError, match="unknown TFDS data set 'svhn'"):
    data.load_tfds("svhn", "train", None)


# --- load_dataset -----------------------------------------------------------------------


def test_load_dataset_bundled(bundled):
  images, labels = data.load_dataset(_data_config(), "test")
  np.testing.assert_array_equal(images, bundled["test"][0])
  np.testing.assert_array_equal(labels, bundled["test"][1])


@pytest.mark.parametrize("overrides,match", [
    (dict(source="hdf5"), "unknown data.source 'hdf5'; use one of bundled, idx, tfds"),
    (dict(channels=3), "has 1 channel.*--config.data.channels=1"),
    (dict(name="cifar10"), "bundled data is MNIST"),
    (dict(source="idx"), "needs --config.data.dir"),
])
def test_load_dataset_errors(overrides, match):
  with pytest.raises(UserError, match=match):
    data.load_dataset(_data_config(**overrides))


# --- preprocess -------------------------------------------------------------------------


def _digits() -> np.ndarray:
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  images[0, 0, 0, 0], images[0, 27, 27, 0], images[1, 5, 5, 0] = 255, 255, 0
  return images


def test_preprocess_zero_one():
  images = _digits()
  x = data.preprocess(images, 32, "zero_one")
  assert x.shape == (3, 32, 32, 1) and x.dtype == np.float32
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(x[:, border] == 0.0)
  np.testing.assert_array_equal(x[:, 2:30, 2:30], images.astype(np.float32) / np.float32(255))
  assert x[0, 2, 2, 0] == 1.0 and x[0, 29, 29, 0] == 1.0 and x[1, 7, 7, 0] == 0.0
  np.testing.assert_array_equal(data.preprocess(images), x)  # The defaults are the original's.


def test_preprocess_minus_one_one():
  images = _digits()
  x = data.preprocess(images, 32, "minus_one_one")
  assert x.dtype == np.float32
  assert np.all(x[:, :2] == -1.0) and np.all(x[:, 30:] == -1.0)
  assert np.all(x[:, :, :2] == -1.0) and np.all(x[:, :, 30:] == -1.0)
  assert x[0, 2, 2, 0] == 1.0 and x[1, 7, 7, 0] == -1.0
  np.testing.assert_allclose(x[:, 2:30, 2:30], images / 127.5 - 1, atol=1e-7)


def test_preprocess_matches_torch_pad_of_to_tensor():
  torch = pytest.importorskip("torch")
  images = _digits()
  # ToTensor: uint8 HWC -> float CHW / 255; then the original's F.pad(x, (2, 2, 2, 2)).
  reference = torch.nn.functional.pad(
      torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255), (2, 2, 2, 2))
  np.testing.assert_array_equal(data.preprocess(images).transpose(0, 3, 1, 2), reference.numpy())


def test_preprocess_other_sizes():
  images = np.full((1, 28, 28, 3), 255, np.uint8)
  assert data.preprocess(images, 28).shape == (1, 28, 28, 3)
  x = data.preprocess(images, 36)
  assert x.shape == (1, 36, 36, 3) and x[0, 3, 4, 0] == 0.0 and x[0, 4, 4, 0] == 1.0


@pytest.mark.parametrize("size,data_range,match", [
    (26, "zero_one", "cannot pad 28x28"),
    (31, "zero_one", "cannot pad 28x28"),
    (32, "minus_one_to_one", "data_range must be one of zero_one, minus_one_one, got "
                             "'minus_one_to_one'"),
])
def test_preprocess_errors(size, data_range, match):
  with pytest.raises(UserError, match=match):
    data.preprocess(_digits(), size, data_range)


# --- BatchIterator ----------------------------------------------------------------------


def _indexed(n: int) -> np.ndarray:
  """Images whose only pixel is their own index, so a batch shows which rows it holds."""
  return np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)


def _rows(batch: np.ndarray) -> list[int]:
  return batch.reshape(-1).astype(int).tolist()


def test_batches_are_a_function_of_seed_and_step():
  images = _indexed(103)
  a = data.BatchIterator(images, 10, seed=7, prefetch=0)
  b = data.BatchIterator(images, 10, seed=7, prefetch=0)
  c = data.BatchIterator(images, 10, seed=8, prefetch=0)
  assert a.steps_per_epoch == 10
  for step in (0, 3, 9, 10, 57):
    np.testing.assert_array_equal(a.batch_at(step), b.batch_at(step))
    assert _rows(a.batch_at(step)) != _rows(c.batch_at(step))


def test_each_epoch_is_a_permutation_without_repeats():
  images = _indexed(103)
  it = data.BatchIterator(images, 10, seed=3, prefetch=0)
  for epoch in range(3):
    rows = sum((_rows(it.batch_at(epoch * 10 + p)) for p in range(10)), [])
    assert len(rows) == len(set(rows)) == 100  # drop_last: 3 images sit out each epoch.
    assert rows == np.random.default_rng([3, epoch]).permutation(103)[:100].tolist()
  assert _rows(it.batch_at(10)) != _rows(it.batch_at(0))


def test_start_step_resumes_the_sequence():
  images = _indexed(50)
  fresh = data.BatchIterator(images, 8, seed=1, prefetch=0)
  expected = [next(fresh) for _ in range(15)]
  for k in (0, 5, 6, 13):
    with data.BatchIterator(images, 8, seed=1, start_step=k) as resumed:
      assert resumed.step == k and resumed.epoch == k // 6
      np.testing.assert_array_equal(next(resumed), expected[k])
      np.testing.assert_array_equal(next(resumed), expected[k + 1])
      assert resumed.step == k + 2


def test_process_slices_concatenate_to_the_global_batch():
  images = _indexed(100)
  whole = data.BatchIterator(images, 12, seed=5, prefetch=0)
  parts = [data.BatchIterator(images, 12, seed=5, process_index=i, process_count=4, prefetch=0)
           for i in range(4)]
  assert all(p.local_batch_size == 3 for p in parts)
  for step in (0, 7, 8, 30):
    np.testing.assert_array_equal(np.concatenate([p.batch_at(step) for p in parts]),
                                  whole.batch_at(step))


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_iteration_matches_batch_at(prefetch):
  images = _indexed(40)
  with data.BatchIterator(images, 6, seed=2, start_step=4, prefetch=prefetch) as it:
    for step in range(4, 4 + 20):  # Crosses three epoch boundaries (6 steps each).
      assert it.step == step and it.epoch == step // 6
      np.testing.assert_array_equal(next(it), it.batch_at(step))


def test_close_stops_the_thread():
  it = data.BatchIterator(_indexed(40), 4, seed=0, prefetch=2)
  next(it)
  thread = it._thread  # pylint: disable=protected-access
  assert thread.is_alive() and thread.daemon
  it.close()
  assert not thread.is_alive()
  with pytest.raises(StopIteration):
    next(it)
  with data.BatchIterator(_indexed(40), 4, seed=0) as it:
    next(it)
    thread = it._thread  # pylint: disable=protected-access
  assert not thread.is_alive()


class _FailingImages:
  """Looks like an image array; reading the rows of the third batch fails."""

  def __init__(self):
    self.reads = 0
    self.images = _indexed(20)

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    self.reads += 1
    if self.reads == 3:
      raise RuntimeError("disk on fire")
    return self.images[index]


def test_thread_errors_reach_the_consumer():
  it = data.BatchIterator(_FailingImages(), 4, seed=0, prefetch=2)
  next(it)
  next(it)
  thread = it._thread  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(it)
  assert not thread.is_alive()
  with pytest.raises(StopIteration):
    next(it)


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(batch_size=10, process_count=4), "not divisible by the 4 processes"),
    (dict(batch_size=24), "has 20 images, fewer than one batch of 24"),
    (dict(batch_size=4, process_index=2, process_count=2), r"process_index 2 is not in \[0, 2\)"),
    (dict(batch_size=4, start_step=-1), "must be >= 0"),
])
def test_batch_iterator_errors(kwargs, match):
  with pytest.raises(UserError, match=match):
    data.BatchIterator(_indexed(20), seed=0, **kwargs)
