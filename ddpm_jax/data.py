"""Image data: loaders for the bundled MNIST subset, IDX files and TFDS, and a batch iterator.

Loaders return uint8 images ``[N, H, W, C]`` (NHWC) and int32 labels ``[N]``;
:func:`preprocess` pads and scales them to float32 like the original tutorial
(``ToTensor()`` then ``F.pad(x, (2, 2, 2, 2))``). :class:`BatchIterator` yields the batch
of each training step as a pure function of ``(seed, step)``, so resuming only needs the
step.

Nothing here imports TensorFlow, TFDS or torch at module level: TFDS is imported inside
:func:`load_tfds` only.
"""

from __future__ import annotations

import gzip
import importlib.resources
import pathlib
import queue
import threading
import zlib
from typing import Any

import numpy as np

from ddpm_jax.errors import UserError

SPLITS = ("train", "test")
SOURCES = ("bundled", "idx", "tfds")
TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10")
DATA_RANGES = ("zero_one", "minus_one_one")
# The interval each data range maps pixels to.
DATA_BOUNDS = {"zero_one": (0.0, 1.0), "minus_one_one": (-1.0, 1.0)}

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
# What tfds's builders look for in the manual dir, by data set.
_TFDS_MANUAL_FILES = {
    "mnist": "the four MNIST IDX .gz files (train-images-idx3-ubyte.gz, ...)",
    "fashion_mnist": "the four Fashion-MNIST IDX .gz files (train-images-idx3-ubyte.gz, ...)",
    "cifar10": "cifar-10-binary.tar.gz",
}


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def load_bundled(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns the packaged real MNIST subset: uint8 ``[N, 28, 28, 1]`` and int32 labels."""
  _check_split(split)
  resource = importlib.resources.files("ddpm_jax") / "assets" / "mnist_bundled.npz"
  if not resource.is_file():
    raise UserError(f"bundled data {resource} is missing; reinstall ddpm-jax or run "
                    "python scripts/build_bundled_mnist.py")
  with resource.open("rb") as f, np.load(f) as npz:
    images = npz[f"{split}_images"]
    labels = npz[f"{split}_labels"]
  return images[..., None], labels.astype(np.int32)


def _find_idx_file(data_dir: pathlib.Path, name: str) -> pathlib.Path:
  folders = (data_dir, data_dir / "MNIST" / "raw")
  for folder in folders:
    for candidate in (folder / name, folder / f"{name}.gz"):
      if candidate.is_file():
        return candidate
  raise UserError(f"IDX file {name} (or {name}.gz) not found in {folders[0]} or {folders[1]}; "
                  "put the four MNIST IDX files in one of them")


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """Reads an IDX file of unsigned bytes (plain or gzip, told apart by content)."""
  data = path.read_bytes()
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise UserError(f"{path}: broken gzip data ({e}); download the file again") from e
  ndim = magic - 2048
  header = 4 + 4 * ndim
  if len(data) < 4:
    raise UserError(f"{path}: truncated, only {len(data)} bytes; download the file again")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise UserError(f"{path}: magic number {found}, expected {magic} for an IDX "
                    f"{'image' if ndim == 3 else 'label'} file; is it the right file?")
  if len(data) < header:
    raise UserError(f"{path}: truncated header, {len(data)} bytes; download the file again")
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  expected = int(np.prod(shape))
  if len(data) - header != expected:
    raise UserError(f"{path}: header says {'x'.join(map(str, shape))} = {expected} bytes of "
                    f"data but the file holds {len(data) - header}; the file is truncated or "
                    "corrupt, download it again")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def load_idx(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads MNIST-format IDX files from ``data_dir`` or ``data_dir/MNIST/raw``.

  Returns uint8 images ``[N, H, W, 1]`` and int32 labels ``[N]``. Each file may be
  gzipped (``.gz``), as downloaded.
  """
  _check_split(split)
  folder = pathlib.Path(data_dir).expanduser()
  if not folder.is_dir():
    raise UserError(f"IDX data dir {folder} does not exist; point --config.data.dir at the "
                    "folder with the four MNIST IDX files")
  images_name, labels_name = _IDX_FILES[split]
  images_path = _find_idx_file(folder, images_name)
  labels_path = _find_idx_file(folder, labels_name)
  images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
  labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise UserError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                    f"{len(labels)} labels; use files of the same split and release")
  return images[..., None], labels.astype(np.int32)


def _tfds_not_ready(tfds: Any, name: str, data_dir: str | None) -> UserError | None:
  """The error to raise when ``name`` can't be read from ``data_dir``; None if it is prepared."""
  root = data_dir or tfds.core.constants.DATA_DIR
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if builder.info.available_file_formats() & set(random_access):
      return None
    return UserError(
        f"TFDS {name} in {root} is prepared as {builder.info.file_format.value}, which "
        "tfds.data_source cannot read; prepare it again in another data_dir with "
        f"tfds.builder('{name}', data_dir=DIR, file_format='array_record')"
        ".download_and_prepare()")
  manual = f"{root}/downloads/manual"
  idx = "" if name == "cifar10" else "; or use --config.data.source=idx --config.data.dir=DIR"
  return UserError(
      f"TFDS {name} is not prepared in {root}. Preparing it needs tensorflow "
      f"(pip install tensorflow-cpu); offline, put {_TFDS_MANUAL_FILES[name]} in {manual}/ "
      f"and run tfds.builder('{name}', data_dir='{root}', file_format='array_record')"
      ".download_and_prepare(download_config=tfds.download.DownloadConfig("
      f"manual_dir='{manual}')){idx}")


def load_tfds(name: str, split: str, data_dir: str | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
  """Reads a prepared TFDS data set with ``tfds.data_source`` (no TensorFlow needed).

  Returns uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``. Never downloads.
  """
  _check_split(split)
  if name not in TFDS_NAMES:
    raise UserError(f"unknown TFDS data set {name!r}; use one of {', '.join(TFDS_NAMES)}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"data.source=tfds needs tensorflow_datasets ({e}); pip install "
                    "'ddpm-jax[tfds]' (or .venv/bin/pip install tensorflow-datasets "
                    "importlib_resources)") from e
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except (KeyError, ValueError, NotImplementedError, FileNotFoundError) as e:
    # Unprepared data sets raise KeyError (no data_dir) or NotImplementedError (TFRecord
    # is the default format when a data_dir is given).
    error = _tfds_not_ready(tfds, name, data_dir)
    if error is None:
      raise
    raise error from e
  examples = [source[i] for i in range(len(source))]
  if not examples:
    raise UserError(f"TFDS {name} split {split} in {data_dir or 'the default data_dir'} is empty")
  images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return images, labels


def load_dataset(data_config: Any, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Loads ``split`` as ``data_config`` says (``source``, ``name``, ``dir``, ``channels``).

  Returns uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``.
  """
  source, name, data_dir = data_config.source, data_config.name, data_config.dir
  if source == "bundled":
    if name != "mnist":
      raise UserError(f"the bundled data is MNIST, not {name!r}; set --config.data.name=mnist "
                      "or use --config.data.source=tfds or idx")
    images, labels = load_bundled(split)
  elif source == "idx":
    if not data_dir:
      raise UserError("data.source=idx needs --config.data.dir=DIR, the folder with the four "
                      "IDX files")
    images, labels = load_idx(data_dir, split)
  elif source == "tfds":
    images, labels = load_tfds(name, split, data_dir or None)
  else:
    raise UserError(f"unknown data.source {source!r}; use one of {', '.join(SOURCES)}")
  if images.shape[-1] != data_config.channels:
    raise UserError(f"{source} data {name!r} has {images.shape[-1]} channel(s) but "
                    f"data.channels is {data_config.channels}; set "
                    f"--config.data.channels={images.shape[-1]}")
  return images, labels


def check_data_range(data_range: str) -> None:
  """:class:`UserError` unless ``data_range`` is one of :data:`DATA_RANGES`."""
  if data_range not in DATA_RANGES:
    raise UserError(f"data_range must be one of {', '.join(DATA_RANGES)}, got {data_range!r}")


def to_unit_range(images: np.ndarray, data_range: str) -> np.ndarray:
  """Maps float images in ``data_range`` ('zero_one' or 'minus_one_one') to [0, 1],
  unclipped, as float32."""
  check_data_range(data_range)
  images = np.asarray(images, np.float32)
  return (images + 1.0) / 2.0 if data_range == "minus_one_one" else images


def preprocess(images: np.ndarray, image_size: int = 32, data_range: str = "zero_one"
               ) -> np.ndarray:
  """Zero-pads uint8 NHWC images symmetrically to ``image_size`` and scales to float32.

  ``zero_one`` is the original's ``ToTensor()`` (x / 255; padding stays 0);
  ``minus_one_one`` is x / 127.5 - 1 (padding becomes -1).
  """
  if images.dtype != np.uint8 or images.ndim != 4:
    raise TypeError(f"expected uint8 [N, H, W, C] images, got {images.dtype} {images.shape}")
  check_data_range(data_range)
  height, width = images.shape[1:3]
  pad_h, pad_w = image_size - height, image_size - width
  if pad_h < 0 or pad_w < 0 or pad_h % 2 or pad_w % 2:
    raise UserError(f"cannot pad {height}x{width} images evenly on each side to image_size "
                    f"{image_size}; use an image_size >= {max(height, width)} that differs from "
                    "it by an even number")
  padded = np.pad(images, ((0, 0), (pad_h // 2,) * 2, (pad_w // 2,) * 2, (0, 0)))
  x = padded.astype(np.float32)
  if data_range == "zero_one":
    return x / np.float32(255)
  return x / np.float32(127.5) - np.float32(1)


class BatchIterator:
  """Endless, deterministic batches of ``images`` for each training step.

  The batch of global step ``s`` is rows ``[p * B, (p + 1) * B)`` of epoch
  ``s // steps_per_epoch``'s permutation ``np.random.default_rng([seed, epoch])``, with
  ``p = s % steps_per_epoch`` and ``B`` the global batch size; the last partial batch of
  each epoch is dropped (the original's ``drop_last``). This process gets its own
  contiguous ``batch_size // process_count`` rows of that batch, ready for
  ``jax.make_array_from_process_local_data``. A background thread keeps ``prefetch``
  batches ready (0: none, batches are made on demand). Use it as a context manager, or
  call :meth:`close`.
  """

  def __init__(self, images: np.ndarray, batch_size: int, seed: int, start_step: int = 0,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2):
    if batch_size <= 0:
      raise UserError(f"batch_size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
      raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size % process_count:
      raise UserError(f"batch_size {batch_size} is not divisible by the {process_count} "
                      "processes; use a multiple of the process count")
    if len(images) < batch_size:
      raise UserError(f"the data set has {len(images)} images, fewer than one batch of "
                      f"{batch_size}; lower batch_size")
    if seed < 0 or start_step < 0 or prefetch < 0:
      raise UserError(f"seed ({seed}), start_step ({start_step}) and prefetch ({prefetch}) "
                      "must be >= 0")
    self._images = images
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.steps_per_epoch = len(images) // batch_size
    self._seed = seed
    self._offset = process_index * self.local_batch_size
    self._prefetch = prefetch
    self._step = start_step
    self._permutation_cache: tuple[int, np.ndarray] | None = None
    self._queue: queue.Queue | None = None
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()

  @property
  def step(self) -> int:
    """The global step whose batch comes next."""
    return self._step

  @property
  def epoch(self) -> int:
    """The epoch of the next batch."""
    return self._step // self.steps_per_epoch

  def _permutation(self, epoch: int) -> np.ndarray:
    cached = self._permutation_cache  # One read: the thread and the caller may both be here.
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self._seed, epoch]).permutation(len(self._images)))
      self._permutation_cache = cached
    return cached[1]

  def indices_at(self, step: int) -> np.ndarray:
    """The indices into ``images`` of the whole global batch of step ``step`` (int32)."""
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    return self._permutation(epoch)[start:start + self.batch_size].astype(np.int32)

  def batch_at(self, step: int) -> np.ndarray:
    """This process's rows of the batch of global step ``step``."""
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size + self._offset
    return self._images[self._permutation(epoch)[start:start + self.local_batch_size]]

  def _produce(self, step: int) -> None:
    """Thread body: puts ``(step, batch)`` pairs, or ``(None, exception)``, until stopped."""
    while not self._stop.is_set():
      try:
        item = (step, self.batch_at(step))
      except Exception as e:  # pylint: disable=broad-except
        item = (None, e)
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.05)
          break
        except queue.Full:
          continue
      if item[0] is None:
        return
      step += 1

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> np.ndarray:
    if self._stop.is_set():
      raise StopIteration
    if not self._prefetch:
      batch = self.batch_at(self._step)
    else:
      if self._thread is None:
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(
            target=self._produce, args=(self._step,), name="BatchIterator", daemon=True)
        self._thread.start()
      step, batch = self._queue.get()
      if step is None:
        self.close()
        raise batch
    self._step += 1
    return batch

  def close(self) -> None:
    """Stops the prefetch thread; iterating afterwards stops at once."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()

  def __enter__(self) -> BatchIterator:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()
