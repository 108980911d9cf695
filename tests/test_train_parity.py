"""``scripts/train_parity.py --quick``: a short training run in ddpm_jax and in the original
PyTorch code from the same weights, batches, t and noise ends in the same place, and the
script writes every field and a real figure.

One quick run (two seeds of a micro UNet, 12 steps, the tiny config's warm-up and cosine
rate, with the rounding control) serves every check; the refusals run before anything is
computed.
"""

import functools
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from ddpm_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "mnist_tiny.py")
STEPS = 12
SIDES = ("jax", "torch")


@functools.lru_cache(maxsize=1)
def _script():
  spec = importlib.util.spec_from_file_location("train_parity",
                                                ROOT / "scripts" / "train_parity.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


def _argv(out, *extra):
  """The quick run of the tiny config with the original's objective (eps; the demo predicts
  x0, which the original cannot train) unless ``extra`` sets another."""
  objective = [] if any(e.startswith("--config.objective") for e in extra) else [
      "--config.objective=eps"]
  return ["train_parity.py", "--config", TINY, "--quick", "--num_train_steps", str(STEPS),
          "--torch_threads", "1", "--out", str(out), *objective, *extra]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The quick run's output directory and parity.json."""
  out = tmp_path_factory.mktemp("parity")
  assert _script().main(_argv(out, "--seeds", "2", "--rounding_control")) == 0
  return out, json.loads((out / "parity.json").read_text())


def _relative(doc_losses):
  jax_losses, torch_losses = (np.asarray(doc_losses[side]) for side in SIDES)
  return np.abs(jax_losses - torch_losses) / np.abs(torch_losses)


@pytest.mark.slow
def test_json_has_every_field(quick):
  _, doc = quick
  for key in ("command", "date", "device", "versions", "config", "losses", "weight_distance",
              "one_step", "evaluation", "runs", "spread", "goal", "dropout", "sampling"):
    assert key in doc, key
  assert set(doc["versions"]) >= {"jax", "flax", "torch", "numpy"}
  assert doc["config"]["num_train_steps"] == STEPS and doc["config"]["batch_size"] == 8
  assert doc["dropout"] == {"rate": 0.0, "masks_match": True, "note": doc["dropout"]["note"]}
  assert [run["seed"] for run in doc["runs"]] == [0, 1]
  assert set(doc["losses"]) == set(doc["evaluation"]) == set(SIDES)
  assert doc["losses"] == {side: doc["runs"][0]["losses"][side] for side in SIDES}
  for run in doc["runs"]:
    assert all(len(run["losses"][side]) == STEPS for side in SIDES + ("control",))
    checkpoints = {"1", "10", str(STEPS)}
    assert set(run["weight_distance"]) == set(run["one_step"]) == checkpoints
    assert set(run["control_distance"]) == checkpoints
    for side in SIDES + ("control",):
      evaluation = run["evaluation"][side]
      assert evaluation["num_samples"] == 16 and evaluation["reference"]["name"] == "bundled"
      assert {"frechet_distance", "mean_confidence", "frac_confident", "class_kl",
              "class_histogram"} <= set(evaluation)
  for measure in ("final_loss", "frechet_distance", "mean_confidence", "frac_confident",
                  "class_kl"):
    entry = doc["spread"][measure]
    assert {"framework_difference", "framework_difference_max", "seed_spread",
            "seed_spread_min", "within_seed_spread", "control",
            "rounding_difference"} <= set(entry), measure
  assert isinstance(doc["goal"]["holds"], bool)


@pytest.mark.slow
def test_losses_agree_step_by_step(quick):
  """Same weights, batch, t and noise: the first loss agrees to float32 rounding, and so do
  the next ones while the warm-up's rate is small; then Adam's updates, which divide each
  gradient by its own magnitude, let rounding differences grow."""
  _, doc = quick
  for run in doc["runs"]:
    relative = _relative(run["losses"])
    assert relative[0] <= 1e-6, relative[0]  # Measured: 0 (seed 0) and 1.2e-7 (seed 1).
    assert relative[:4].max() <= 5e-6, relative[:4]  # Measured: 2.4e-7 and 1.0e-6.
    assert relative.max() <= 5e-3, relative  # Measured: 2.5e-4 and 4.0e-4.


@pytest.mark.slow
def test_the_originals_step_from_the_jax_state_agrees(quick):
  """At each checkpoint the original steps from ddpm_jax's state: the single-step parity
  of test_parity.py, along the run (no update at step 1: the warm-up's rate is 0)."""
  _, doc = quick
  for run in doc["runs"]:
    assert run["one_step"]["1"]["update"] is None
    for check in run["one_step"].values():
      assert check["loss_relative"] <= 1e-6, check  # Measured: <= 4.5e-7.
      assert check["gradient"] <= 5e-3, check  # Measured: <= 8.4e-4.
      if check["update"] is not None:
        assert check["update"] <= 1e-2, check  # Measured: <= 1.3e-3.
        assert check["ema_update"] <= 1e-2, check  # Measured: <= 1.4e-4.


@pytest.mark.slow
def test_rounding_control_stays_with_the_original(quick):
  """Over 12 steps the original from an init one ulp off stays at rounding distance of
  the original: whatever parts the two frameworks within the run is not the init."""
  _, doc = quick
  for run in doc["runs"]:
    control, original = (np.asarray(run["losses"][k]) for k in ("control", "torch"))
    assert (np.abs(control - original) / original).max() <= 1e-5  # Measured: <= 3.4e-7.
    assert run["control_distance"][str(STEPS)]["raw"]["relative"] <= 1e-4  # Measured 7.3e-6.


@pytest.mark.slow
def test_weights_stay_close(quick):
  """The first update is at the warm-up's rate 0, so the weights are equal after it; after
  that the two sides' weights part by float32 rounding carried through Adam, a small
  fraction of how far they moved."""
  _, doc = quick
  for run in doc["runs"]:
    distance = run["weight_distance"]
    assert distance["1"]["raw"]["relative"] == 0.0 and distance["1"]["ema"]["relative"] == 0.0
    last = distance[str(STEPS)]
    # Measured after 12 steps (seeds 0 and 1): raw 1.0e-3 and 3.6e-3 of the weights' norm,
    # 0.9 % and 3.0 % of how far they moved; EMA 2.6e-5 and 9.2e-5 of its norm.
    assert 0.0 < last["raw"]["relative"] <= 1e-2, last
    assert last["raw"]["over_update"] <= 0.1, last
    assert last["ema"]["relative"] <= 1e-3, last


@pytest.mark.slow
def test_samples_and_measures_agree(quick):
  """Both EMA models sampled from the same noise score alike; the second seed's differ."""
  _, doc = quick
  fd = doc["spread"]["frechet_distance"]
  # Measured: 0.011 of an FD of 4,781 (samples of 12 steps are noise), the seeds 696 apart.
  assert fd["framework_difference_max"] <= 1e-3 * fd["per_seed"][0]["torch"], fd
  assert fd["seed_spread_min"] > 10 * fd["framework_difference_max"], fd
  loss = doc["spread"]["final_loss"]
  assert loss["within_seed_spread"], loss


@pytest.mark.slow
def test_figure_is_a_real_image(quick):
  out, _ = quick
  path = out / "loss_curves.png"
  assert 20_000 < path.stat().st_size < 300_000
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    width, height = image.size
    pixels = np.asarray(image.convert("L"))
  assert 500 <= width <= 1200 and 600 <= height <= 1200, image.size
  assert pixels.std() > 20  # Curves and sample grids, not a blank canvas.


@pytest.mark.slow
def test_existing_output_is_kept_without_overwrite(quick):
  out, doc = quick
  before = (out / "parity.json").read_bytes()
  with pytest.raises(UserError, match="--overwrite"):
    _script().main(_argv(out))
  assert (out / "parity.json").read_bytes() == before
  assert doc["command"].startswith("python ")


@pytest.mark.parametrize("override,message", [
    ("--config.objective=v", "objective=v"),
    ("--config.schedule.kind=cosine", "schedule.kind=cosine"),
    ("--config.loss_weighting=min_snr", "loss_weighting=min_snr"),
    ("--config.ema_warmup=True", "ema_warmup"),
    ("--config.grad_clip_norm=1.0", "grad_clip_norm"),
])
def test_refuses_what_the_original_cannot_train(tmp_path, override, message):
  with pytest.raises(UserError, match=message):
    _script().main(_argv(tmp_path / "out", override))
  assert not (tmp_path / "out").exists()


def test_refuses_bad_flags(tmp_path):
  script = _script()
  with pytest.raises(UserError, match="--out is required"):
    script.main(["train_parity.py", "--config", TINY, "--quick"])
  with pytest.raises(UserError, match="--seeds"):
    script.main(_argv(tmp_path / "out", "--seeds", "0"))
  with pytest.raises(UserError, match="--num_train_steps"):
    script.main(["train_parity.py", "--config", TINY, "--num_train_steps", "0",
                 "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
