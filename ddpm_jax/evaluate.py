"""Sample quality measured with a small MNIST classifier shipped in ``ddpm_jax/assets``.

The measures, for images ``[N, 32, 32, 1]`` in [0, 1] (MNIST zero-padded to 32x32):

- ``frechet_distance``: the Fréchet distance between Gaussians fitted to the classifier's
  penultimate-layer features of the images and of reference digits (FID, with this
  classifier in place of Inception). Lower is better. Like FID it is biased upwards for
  small N: compare runs at the same number of images.
- ``mean_confidence`` and ``frac_confident``: the mean max-softmax probability, and the
  fraction of images whose max-softmax probability is at least 0.9. The classifier was
  trained with outlier exposure (``scripts/train_classifier.py``): on non-digits such as
  noise its softmax is close to uniform, so confidence is near 0.1 there.
- ``class_histogram`` and ``class_kl``: the fraction of images predicted as each digit,
  and its KL divergence to the uniform distribution (0 when balanced, log 10 for one
  class).
- ``label_accuracy``, when the npz holds the ``labels`` a class-conditional sampler was
  asked for (``sample --labels/--digit``): the fraction of images the classifier
  predicts as their requested label. The classifier's own accuracy on real digits is its
  ceiling, and 0.1 is chance.

Command line::

  python -m ddpm_jax.evaluate --samples FILE.npz [--data_range zero_one|minus_one_one]

prints a summary and, as its last line, one JSON object with the measures of the samples
against the bundled training digits and, under ``reference``, the same measures for the
held-out real test digits: the floor that samples can be compared with.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import warnings
import zipfile
import zlib
from typing import Any, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ddpm_jax import data
from ddpm_jax.errors import ArgumentParser, UserError, run_cli

CLASSIFIER_PATH = pathlib.Path(__file__).parent / "assets" / "classifier.msgpack"
IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
CONFIDENT = 0.9
REFERENCES = ("bundled",)


class Classifier(nn.Module):
  """A small CNN on ``[B, 32, 32, 1]`` digits in [0, 1].

  Returns ``(features, logits)``: the penultimate layer before its ReLU
  ``[B, feature_dim]``, used for the Fréchet distance, and the class logits
  ``[B, num_classes]``. Features are taken before the ReLU because after it they are all
  zero for most non-digits, which would give every kind of junk the same distance.
  """

  widths: Sequence[int] = (32, 64, 64)
  feature_dim: int = 128
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1))
    return features, nn.Dense(self.num_classes)(nn.relu(features))


@functools.lru_cache(maxsize=2)
def load_classifier(path: str | pathlib.Path = CLASSIFIER_PATH) -> tuple[Classifier, Any]:
  """Returns ``(module, params)`` read from the msgpack weights at ``path``."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(
        f"classifier weights not found at {path}; train them with "
        "`python scripts/train_classifier.py`"
    )
  module = Classifier()
  target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  try:
    params = flax.serialization.from_bytes(target["params"], path.read_bytes())
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(f"{path} does not hold weights of the evaluation classifier: {e}") from e
  shapes_match = jax.tree.map(lambda t, p: t.shape == np.shape(p), target["params"], params)
  if not all(jax.tree.leaves(shapes_match)):
    raise UserError(f"{path} holds weights of a different classifier architecture")
  return module, jax.device_put(params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(module: Classifier, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  features, logits = module.apply({"params": params}, jnp.clip(images, 0.0, 1.0))
  return features, jax.nn.softmax(logits)


def features_and_probs(
    images: np.ndarray,
    classifier: tuple[Classifier, Any] | None = None,
    batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray]:
  """Runs the classifier on ``[N, 32, 32, 1]`` images in [0, 1] (clipped to it).

  Args:
    images: the images; any float or integer dtype, values meant to be in [0, 1].
    classifier: ``(module, params)``; defaults to :func:`load_classifier`'s.
    batch_size: images per jitted call; the last batch is zero-padded to this size.

  Returns:
    ``(features [N, feature_dim], probs [N, 10])`` as float32 numpy arrays.
  """
  module, params = classifier or load_classifier()
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or not len(images):
    raise UserError(f"expected images of shape [N, 32, 32, 1], N >= 1, got {list(images.shape)}")
  outputs = []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    padded = np.zeros((batch_size, *IMAGE_SHAPE), np.float32)
    padded[:len(batch)] = batch
    outputs.append(_forward(module, params, padded))  # Asynchronous: no wait here.
  features, probs = (np.concatenate([np.asarray(o[i]) for o in outputs]) for i in (0, 1))
  return features[:len(images)], probs[:len(images)]


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns the mean ``[D]`` and covariance ``[D, D]`` of ``[N, D]`` features, in float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise UserError(f"need at least 2 feature vectors [N, D], got {list(features.shape)}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
    raise UserError(
        f"mismatched Gaussian shapes: mu {mu1.shape} vs {mu2.shape}, "
        f"sigma {sigma1.shape} vs {sigma2.shape}"
    )
  with warnings.catch_warnings():
    # Singular covariances (say, of many identical images) make scipy warn needlessly.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = 1e-6 * np.eye(dim)
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  diff = mu1 - mu2
  distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean.real)
  return max(float(distance), 0.0)


def class_kl(histogram: Sequence[float]) -> float:
  """KL(histogram || uniform) in nats, with 0 log 0 = 0."""
  h = np.asarray(histogram, np.float64)
  h = h / h.sum()
  nonzero = h[h > 0]
  return float(np.sum(nonzero * np.log(nonzero * len(h))))


def label_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
  """The fraction of images whose predicted class (``probs [N, 10]``) is their ``labels [N]``."""
  return float(np.mean(probs.argmax(axis=1) == np.asarray(labels)))


def measures_from_outputs(
    features: np.ndarray, probs: np.ndarray, reference_mu: np.ndarray, reference_sigma: np.ndarray,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
  """The quality measures from classifier outputs and the reference feature Gaussian; with
  the images' requested ``labels`` also ``label_accuracy``."""
  mu, sigma = feature_stats(features)
  confidence = probs.max(axis=1)
  histogram = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES) / len(probs)
  measures = {
      "frechet_distance": frechet_distance(mu, sigma, reference_mu, reference_sigma),
      "mean_confidence": float(confidence.mean()),
      "frac_confident": float(np.mean(confidence >= CONFIDENT)),
      "class_histogram": [float(x) for x in histogram],
      "class_kl": class_kl(histogram),
      "num_samples": int(len(probs)),
  }
  if labels is not None:
    measures["label_accuracy"] = label_accuracy(probs, labels)
  return measures


def compute_measures(images: np.ndarray, reference_images: np.ndarray) -> dict[str, Any]:
  """The quality measures of ``images`` against ``reference_images``, both in [0, 1].

  Both are ``[N, 32, 32, 1]`` with N >= 2. Returns a dict with ``frechet_distance``,
  ``mean_confidence``, ``frac_confident``, ``class_histogram`` (10 fractions),
  ``class_kl`` and ``num_samples``.
  """
  reference_features, _ = features_and_probs(reference_images)
  return measures_from_outputs(*features_and_probs(images), *feature_stats(reference_features))


def _read_data_range(entry: np.ndarray) -> str:
  """The string held by an npz ``data_range`` entry."""
  if entry.size != 1 or entry.dtype.kind not in "US":
    raise UserError(f"the npz entry `data_range` must be one string, got {entry!r}")
  value = entry.reshape(()).item()
  return value.decode() if isinstance(value, bytes) else value


def load_samples(
    path: str | pathlib.Path, data_range: str | None = None, max_samples: int | None = None
) -> tuple[np.ndarray, str]:
  """Reads the ``images`` of a sampler's npz and maps them to [0, 1] (unclipped).

  Args:
    path: an npz with ``images`` ``[N, 32, 32, 1]`` (or ``[N, 32, 32]``) and optionally a
      ``data_range`` string entry.
    data_range: overrides the file's ``data_range``; the default is 'zero_one'.
    max_samples: keep only the first ``max_samples`` images.

  Returns:
    ``(images [N, 32, 32, 1] float32, data_range)``.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raise UserError(f"--samples {path} is a directory; give the npz file `sample --npz` wrote")
  if not path.is_file():
    raise UserError(f"samples file not found: {path}")
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise UserError(f"cannot read {path} as an npz archive: {e}") from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise UserError(f"{path} holds a single array, not an npz archive with an `images` entry")
  with archive:
    if "images" not in archive.files:
      raise UserError(f"{path} has no `images` entry (entries: {', '.join(archive.files)})")
    try:
      images = archive["images"]
      stored_range = archive["data_range"] if "data_range" in archive.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise UserError(f"cannot read the entries of {path}: {e}") from e
  if data_range is None:
    data_range = "zero_one" if stored_range is None else _read_data_range(stored_range)

  if images.dtype.kind not in "fiu":
    raise UserError(f"`images` must hold real numbers, got dtype {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
    raise UserError(
        f"`images` must have shape [N, 32, 32, 1] or [N, 32, 32], got {list(images.shape)}"
    )
  if max_samples is not None:
    if max_samples < 2:
      raise UserError(f"--max_samples must be at least 2, got {max_samples}")
    images = images[:max_samples]
  if len(images) < 2:
    raise UserError(f"need at least 2 images to fit a covariance, got {len(images)}")
  bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
  if bad:
    raise UserError(f"`images` holds {bad} NaN or infinite values")
  return data.to_unit_range(images, data_range), data_range


def load_labels(path: str | pathlib.Path, num_images: int) -> np.ndarray | None:
  """The ``labels`` entry of a sampler's npz (the classes a conditional sampler was asked
  for), its first ``num_images``, or None when it has none."""
  try:
    with np.load(path, allow_pickle=False) as archive:
      if "labels" not in archive.files:
        return None
      labels = archive["labels"]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise UserError(f"cannot read the entries of {path}: {e}") from e
  if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) < num_images:
    raise UserError(f"`labels` must hold one whole number per image ([N] = [{num_images}] or "
                    f"more), got dtype {labels.dtype}, shape {list(labels.shape)}")
  labels = labels[:num_images].astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise UserError(f"`labels` must be in 0..{NUM_CLASSES - 1} (digits), got "
                    f"{labels.min()}..{labels.max()}")
  return labels


def measure_against_bundled(samples: np.ndarray, labels: np.ndarray | None = None
                            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Measures ``samples`` and the held-out real test digits against the training digits.

  Returns ``(sample_measures, test_digit_measures)``; the second is the floor. With the
  samples' requested ``labels`` both have ``label_accuracy`` (the test digits' against
  their true labels: the classifier's accuracy, the ceiling).
  """
  train_images, _ = data.load_bundled("train")
  test_images, test_labels = data.load_bundled("test")
  train_features, _ = features_and_probs(data.preprocess(train_images))
  stats = feature_stats(train_features)
  samples_measures = measures_from_outputs(*features_and_probs(samples), *stats, labels=labels)
  test_measures = measures_from_outputs(*features_and_probs(data.preprocess(test_images)), *stats,
                                        labels=None if labels is None else test_labels)
  return samples_measures, test_measures


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = ArgumentParser(
      prog="python -m ddpm_jax.evaluate",
      description="Measures the quality of generated 32x32 digits with a small classifier.",
  )
  parser.add_argument("--samples", required=True, help="npz with `images` [N, 32, 32, 1]")
  parser.add_argument(
      "--data_range",
      default=None,
      help="zero_one or minus_one_one; overrides the npz `data_range` entry (default zero_one)",
  )
  parser.add_argument("--reference", default="bundled", help="reference digits: bundled")
  parser.add_argument("--max_samples", type=int, default=None, help="use the first N images")
  return parser.parse_args(argv)


def _summary(name: str, measures: dict[str, Any]) -> str:
  histogram = " ".join(f"{d}:{x:.3f}" for d, x in enumerate(measures["class_histogram"]))
  return (
      f"{name}: {measures['num_samples']} images\n"
      f"  frechet_distance {measures['frechet_distance']:.4f}\n"
      f"  mean_confidence  {measures['mean_confidence']:.4f}\n"
      f"  frac_confident   {measures['frac_confident']:.4f}  (max softmax >= {CONFIDENT})\n"
      f"  class_kl         {measures['class_kl']:.4f}"
      f"  (0 = balanced, {np.log(NUM_CLASSES):.4f} = one class)\n"
      f"  class_histogram  {histogram}"
  ) + (f"\n  label_accuracy   {measures['label_accuracy']:.4f}  (predicted class = label)"
       if "label_accuracy" in measures else "")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  if args.reference not in REFERENCES:
    raise UserError(f"--reference must be one of {', '.join(REFERENCES)}, got {args.reference!r}")
  samples, data_range = load_samples(args.samples, args.data_range, args.max_samples)
  labels = load_labels(args.samples, len(samples))
  measures, floor = measure_against_bundled(samples, labels)
  print(_summary(f"samples {args.samples} (data_range {data_range})", measures))
  print(_summary("real held-out test digits (the floor)", floor))
  print("Fréchet distances are to the bundled training digits; they grow as the number of "
        "images falls, so compare runs with the same number.")
  result = {**measures, "data_range": data_range, "samples": str(args.samples),
            "reference": {**floor, "name": args.reference}}
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  run_cli(main)
