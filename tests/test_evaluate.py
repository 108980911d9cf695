"""ddpm_jax.evaluate: the shipped classifier, the Fréchet distance and the command line."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ddpm_jax import data, evaluate
from ddpm_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
JSON_KEYS = {"frechet_distance", "mean_confidence", "frac_confident", "class_kl", "num_samples",
             "class_histogram"}


@pytest.fixture(scope="module")
def test_digits():
  """The held-out real digits, ``[2000, 32, 32, 1]`` in [0, 1], and their labels."""
  images, labels = data.load_bundled("test")
  return data.preprocess(images), labels


@pytest.fixture(scope="module")
def train_stats():
  """Mean and covariance of the classifier features of the bundled training digits."""
  features, _ = evaluate.features_and_probs(data.preprocess(data.load_bundled("train")[0]))
  return evaluate.feature_stats(features)


def measure(images, train_stats):
  return evaluate.measures_from_outputs(*evaluate.features_and_probs(images), *train_stats)


def box_blur(images, size=5):
  pad = size // 2
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
  return windows.mean(axis=(-2, -1))


def shuffle_pixels(images, rng):
  flat = images.reshape(len(images), -1)
  order = np.argsort(rng.random(flat.shape), axis=1)
  return np.take_along_axis(flat, order, axis=1).reshape(images.shape)


def test_shipped_classifier_accuracy(test_digits):
  images, labels = test_digits
  _, probs = evaluate.features_and_probs(images)
  assert np.mean(probs.argmax(axis=1) == labels) >= 0.98  # 0.990 measured


def test_real_digits_beat_noise_blur_and_shuffled_pixels(test_digits, train_stats):
  # Measured with the shipped weights (FD / mean confidence / fraction confident):
  # real 3.1 / 0.989 / 0.970, noise 3899 / 0.101 / 0.0, 5x5 blur 1524 / 0.795 / 0.44,
  # shuffled pixels 3881 / 0.101 / 0.0.
  images, _ = test_digits
  rng = np.random.default_rng(0)
  real = measure(images, train_stats)
  assert real["frechet_distance"] < 10
  assert real["mean_confidence"] > 0.97
  assert real["frac_confident"] > 0.93
  assert real["class_kl"] < 0.01
  assert real["num_samples"] == len(images)

  noise = measure(rng.standard_normal(images.shape).astype(np.float32), train_stats)
  blurred = measure(box_blur(images), train_stats)
  shuffled = measure(shuffle_pixels(images, rng), train_stats)
  for bad in (noise, shuffled):
    assert bad["frechet_distance"] > 300 * real["frechet_distance"]
    assert bad["mean_confidence"] < real["mean_confidence"] - 0.6
    assert bad["frac_confident"] < 0.1
  assert blurred["frechet_distance"] > 100 * real["frechet_distance"]
  assert blurred["mean_confidence"] < real["mean_confidence"] - 0.1
  assert blurred["frac_confident"] < real["frac_confident"] - 0.3


def test_label_accuracy_of_real_digits_is_the_classifiers_accuracy(test_digits, train_stats):
  """With their true labels real digits score the classifier's accuracy; with the labels
  shuffled, chance."""
  images, labels = test_digits
  features, probs = evaluate.features_and_probs(images)
  true = evaluate.measures_from_outputs(features, probs, *train_stats, labels=labels)
  assert true["label_accuracy"] >= 0.95
  assert true["label_accuracy"] == pytest.approx(np.mean(probs.argmax(axis=1) == labels))
  shuffled = np.random.default_rng(0).permutation(labels)
  chance = evaluate.label_accuracy(probs, shuffled)
  assert abs(chance - 0.1) < 0.03, chance  # 2000 images: one standard error is 0.007.
  assert "label_accuracy" not in evaluate.measures_from_outputs(features, probs, *train_stats)


def test_the_cli_reports_label_accuracy_when_the_npz_has_labels(tmp_path, test_digits, capsys):
  images, labels = test_digits
  path = tmp_path / "labelled.npz"
  np.savez(path, images=images[:300], labels=labels[:300].astype(np.int32))
  assert evaluate.main(["--samples", str(path)]) == 0
  out = capsys.readouterr().out
  result = json.loads(out.strip().splitlines()[-1])
  assert result["label_accuracy"] >= 0.95
  assert result["reference"]["label_accuracy"] >= 0.95  # The test digits' own labels.
  assert "label_accuracy" in out.split("real held-out")[0]


def test_compute_measures_matches_its_parts(test_digits):
  images = test_digits[0][:300]
  reference = data.preprocess(data.load_bundled("train")[0][:1000])
  measures = evaluate.compute_measures(images, reference)
  features, probs = evaluate.features_and_probs(images)
  expected = evaluate.measures_from_outputs(
      features, probs, *evaluate.feature_stats(evaluate.features_and_probs(reference)[0]))
  assert measures.keys() == expected.keys()
  for key, value in expected.items():
    assert measures[key] == pytest.approx(value), key
  assert len(measures["class_histogram"]) == 10
  assert sum(measures["class_histogram"]) == pytest.approx(1.0)
  assert measures["num_samples"] == 300


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  dim = 16
  a = rng.normal(size=(dim, dim))
  sigma = a @ a.T
  mu = rng.normal(size=dim)
  assert evaluate.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)

  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  s1, s2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  s1[:3] = 0.0  # Singular covariances, as from features that never vary.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  assert evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected)
  # The same Gaussians in a rotated basis: the distance does not change.
  q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  rotated = evaluate.frechet_distance(
      q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
  assert rotated == pytest.approx(expected, rel=1e-6)
  # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2.
  assert evaluate.frechet_distance(1.0, 4.0, 3.0, 9.0) == pytest.approx(4.0 + 1.0)


def test_frechet_distance_rejects_mismatched_shapes():
  with pytest.raises(UserError, match="mismatched"):
    evaluate.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_class_kl():
  assert evaluate.class_kl([0.1] * 10) == pytest.approx(0.0, abs=1e-12)
  assert evaluate.class_kl([1.0] + [0.0] * 9) == pytest.approx(np.log(10))
  assert evaluate.class_kl([0.5, 0.5] + [0.0] * 8) == pytest.approx(np.log(5))


def test_load_classifier_errors(tmp_path):
  with pytest.raises(UserError, match="not found"):
    evaluate.load_classifier(tmp_path / "missing.msgpack")
  garbage = tmp_path / "garbage.msgpack"
  garbage.write_bytes(b"not msgpack weights")
  with pytest.raises(UserError, match="does not hold weights"):
    evaluate.load_classifier(garbage)


def test_load_samples_ranges_and_shapes(tmp_path):
  images = np.linspace(-1.0, 1.0, 4 * 32 * 32, dtype=np.float32).reshape(4, 32, 32)
  path = tmp_path / "s.npz"
  np.savez(path, images=images, data_range="minus_one_one")
  loaded, data_range = evaluate.load_samples(path)
  assert data_range == "minus_one_one" and loaded.shape == (4, 32, 32, 1)
  np.testing.assert_allclose(loaded[..., 0], (images + 1) / 2)
  loaded, data_range = evaluate.load_samples(path, data_range="zero_one", max_samples=3)
  assert data_range == "zero_one" and loaded.shape == (3, 32, 32, 1)
  np.testing.assert_array_equal(loaded[..., 0], images[:3])  # Not clipped.


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "ddpm_jax.evaluate", *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_prints_json_for_both_data_ranges(tmp_path, test_digits):
  images = test_digits[0][:200]
  zero_one = tmp_path / "zero_one.npz"
  np.savez(zero_one, images=images)
  minus_one_one = tmp_path / "minus_one_one.npz"
  np.savez(minus_one_one, images=images * 2 - 1, data_range=np.array("minus_one_one"))
  results = []
  for path in (zero_one, minus_one_one):
    proc = run_cli("--samples", path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert JSON_KEYS <= result.keys() and JSON_KEYS <= result["reference"].keys()
    assert result["num_samples"] == 200 and result["reference"]["num_samples"] == 2000
    results.append(result)
  assert results[0]["data_range"] == "zero_one"
  assert results[1]["data_range"] == "minus_one_one"
  assert results[0]["frechet_distance"] == pytest.approx(results[1]["frechet_distance"], rel=1e-4)
  assert results[0]["frechet_distance"] < 30  # Real digits; 200 of them, so above the floor.
  assert results[0]["reference"]["frechet_distance"] < 10


GOOD = np.zeros((4, 32, 32, 1), np.float32)
# name: (npz entries, or "missing" / "text" for no file / a file that is no npz; more flags;
# a piece of the message).
ERROR_CASES = {
    "missing": ("missing", [], "not found"),
    "not_npz": ("text", [], "cannot read"),
    "directory": ("directory", [], "is a directory"),
    "truncated_npz": ("truncated", [], "cannot read .* as an npz archive"),
    "corrupt_npz": ("corrupt", [], "cannot read the entries"),
    "no_images": ({"samples": GOOD}, [], "no `images` entry"),
    "wrong_shape": ({"images": np.zeros((4, 28, 28, 1))}, [], "shape"),
    "strings": ({"images": np.array(["a", "b"])}, [], "real numbers"),
    "bad_range_flag": ({"images": GOOD}, ["--data_range", "zero_255"], "data_range"),
    "bad_range_entry": ({"images": GOOD, "data_range": "0_1"}, [], "data_range"),
    "nan": ({"images": np.full_like(GOOD, np.nan)}, [], "NaN"),
    "one_image": ({"images": GOOD[:1]}, [], "at least 2"),
    "bad_max_samples": ({"images": GOOD}, ["--max_samples", "1"], "at least 2"),
    "bad_reference": ({"images": GOOD}, ["--reference", "cifar"], "reference"),
    "unknown_flag": ({"images": GOOD}, ["--bogus"], "unrecognized"),
    "labels_not_one_per_image": ({"images": GOOD, "labels": np.array([0, 1])}, [],
                                 "`labels` must hold one whole number per image"),
    "labels_not_digits": ({"images": GOOD, "labels": np.array([0, 1, 2, 12])}, [],
                          "`labels` must be in 0..9"),
}


def error_args(tmp_path, case):
  entries, flags, _ = ERROR_CASES[case]
  path = tmp_path / f"{case}.npz"
  if entries == "text":
    path.write_text("not an archive")
  elif entries == "directory":
    path.mkdir()
  elif entries in ("truncated", "corrupt"):
    np.savez_compressed(path, images=np.random.default_rng(0).random((64, 32, 32, 1)))
    raw = bytearray(path.read_bytes())
    if entries == "truncated":
      raw = raw[:3000]
    else:  # Flipped bytes inside the compressed entry (zlib.error).
      raw[200:260] = bytes(b ^ 0xFF for b in raw[200:260])
    path.write_bytes(bytes(raw))
  elif entries != "missing":
    np.savez(path, **entries)
  return ["--samples", str(path), *flags]


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_raises_user_error(tmp_path, case):
  with pytest.raises(UserError, match=ERROR_CASES[case][2]):
    evaluate.main(error_args(tmp_path, case))


@pytest.mark.parametrize("case", ["missing", "not_npz", "bad_range_flag", "nan", "unknown_flag"])
def test_cli_errors_are_one_line(tmp_path, case):
  proc = run_cli(*error_args(tmp_path, case))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert ERROR_CASES[case][2] in lines[0]


def test_cli_without_samples_flag():
  proc = run_cli()
  assert proc.returncode == 2
  expected = "error: the following arguments are required: --samples"
  assert proc.stderr.strip().splitlines() == [expected]
