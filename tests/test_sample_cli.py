"""``python -m ddpm_jax.sample``: outputs from a torch checkpoint and a workdir, same seed
same images, and one-line errors."""

import json
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import reference_torch as R
from ddpm_jax import images, sample, sampling
from ddpm_jax.checkpoint import config_to_json, load_run_state, read_config
from ddpm_jax.config_defaults import base_config
from ddpm_jax.errors import UserError
from ddpm_jax.model import build_unet
from ddpm_jax.schedule import build_schedule, linear_schedule
from tests.conftest import QUARTER, randomize_norms, reference_kwargs

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUARTER_FLAGS = ["--num_groups", str(QUARTER["num_groups"]),
                 "--num_heads", str(QUARTER["num_heads"])]


def _run(*args, timeout: int = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "ddpm_jax.sample", *map(str, args)], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
  """A QUARTER-sized original UNET saved as the original does, with EMA != raw weights."""
  torch.manual_seed(0)
  model = R.UNET(**reference_kwargs(QUARTER))
  optimizer, ema, _ = R.make_training(model)
  randomize_norms(model, seed=1)  # After the EMA's copy, so the two weight sets differ.
  path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
  torch.save({"weights": model.state_dict(), "optimizer": optimizer.state_dict(),
              "ema": ema.state_dict()}, path)
  return path


def _ddim_args(checkpoint, out_dir, *extra):
  return ["--torch_checkpoint", checkpoint, *QUARTER_FLAGS, "--num_samples", 3,
          "--batch_size", 2, "--sampler", "ddim", "--num_steps", 4, "--seed", 7,
          "--out", out_dir / "grid.png", "--npz", out_dir / "samples.npz", *extra]


def test_torch_checkpoint_outputs_and_same_seed_same_images(checkpoint, tmp_path):
  first = _run(*_ddim_args(checkpoint, tmp_path / "a" / "nested",
                           "--reverse_strip", tmp_path / "a" / "nested" / "strip.png"))
  assert first.returncode == 0, first.stderr
  assert "img/s" in first.stdout
  out = tmp_path / "a" / "nested"
  with np.load(out / "samples.npz") as npz:
    samples = npz["images"]
    assert samples.dtype == np.float32 and samples.shape == (3, 32, 32, 1)
    assert np.isfinite(samples).all()
    assert (int(npz["seed"]), str(npz["data_range"]), str(npz["sampler"]),
            int(npz["num_steps"]), float(npz["eta"]), bool(npz["clip_denoised"])) == (
                7, "zero_one", "ddim", 4, 1.0, True)  # DDIM's defaults: eta 1, x0 clipped.
  tile = 32 + images.PADDING
  with Image.open(out / "grid.png") as grid:  # 3 images: 2 columns, 2 rows.
    assert grid.format == "PNG" and grid.mode == "L"
    assert grid.size == (2 * tile + images.PADDING, 2 * tile + images.PADDING)
  with Image.open(out / "strip.png") as strip:  # One row of 10 frames per sample.
    assert strip.size == (10 * tile + images.PADDING, 3 * tile + images.PADDING)

  again = _run(*_ddim_args(checkpoint, tmp_path / "b"))
  assert again.returncode == 0, again.stderr
  with np.load(tmp_path / "b" / "samples.npz") as npz:
    np.testing.assert_array_equal(npz["images"], samples)

  raw = _run(*_ddim_args(checkpoint, tmp_path / "c", "--no_use_ema"))
  assert raw.returncode == 0, raw.stderr
  with np.load(tmp_path / "c" / "samples.npz") as npz:
    assert not np.allclose(npz["images"], samples)

  # A converted run of a [-1, 1] config: unclipped, the same images, read and stored as
  # [-1, 1]; clipped (the default), x0 is held to that range instead of [0, 1].
  unclipped = []
  for name, data_range in (("d", "zero_one"), ("e", "minus_one_one")):
    proc = _run(*_ddim_args(checkpoint, tmp_path / name, "--data_range", data_range,
                            "--no_clip_denoised"))
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / name / "samples.npz") as npz:
      unclipped.append(npz["images"])
      assert str(npz["data_range"]) == data_range and not bool(npz["clip_denoised"])
  np.testing.assert_array_equal(unclipped[0], unclipped[1])
  assert not np.allclose(unclipped[0], samples)


def _error(argv) -> str:
  with pytest.raises(UserError) as info:
    sample.main([str(a) for a in argv])
  return str(info.value)


def test_sampling_splits_the_host_into_a_cpu_device_per_core(tmp_path, monkeypatch):
  """As train does, before JAX starts: one device per core that divides the batch (the
  workdir is missing, so the command stops right after)."""
  monkeypatch.setattr(sample.cli, "available_cores", lambda: 2)
  for batch, flags in ((6, "--xla_force_host_platform_device_count=2"), (3, "")):
    monkeypatch.setenv("XLA_FLAGS", "")
    _error(["--workdir", tmp_path / "missing", "--num_samples", 12, "--batch_size", batch,
            "--out", tmp_path / "x.png"])
    assert os.environ["XLA_FLAGS"] == flags


def test_argument_errors(checkpoint, tmp_path):
  out = ["--out", tmp_path / "x.png"]
  ckpt = ["--torch_checkpoint", checkpoint, *QUARTER_FLAGS]
  cases = [
      ([*out], "exactly one of --workdir"),
      (["--workdir", tmp_path, *ckpt, *out], "exactly one of --workdir"),
      ([*ckpt, "--num_samples", 0, *out], "--num_samples must be positive"),
      ([*ckpt, "--batch_size", -1, *out], "--batch_size must be positive"),
      ([*ckpt, "--seed", -1, *out], "--seed must be in"),
      ([*ckpt, "--sampler", "ddim", "--eta", -0.5, *out], "--eta must be in"),
      ([*ckpt, "--eta", 0.5, *out], "--eta applies only"),
      ([*ckpt, "--clip_denoised", *out], "--clip_denoised and --no_clip_denoised apply only"),
      ([*ckpt, "--no_clip_denoised", *out], "--clip_denoised and --no_clip_denoised apply only"),
      ([*ckpt, "--sampler", "ddim", "--spacing", "time", *out],
       "--spacing applies only to --sampler dpmpp2m"),
      ([*ckpt, "--sampler", "dpmpp2m", "--spacing", "karras", *out], "invalid choice"),
      ([*ckpt, "--sampler", "dpmpp2m", "--eta", 0.5, *out], "--eta applies only"),
      ([*ckpt, "--sampler", "dpmpp2m", "--num_steps", 1001, *out],
       r"--num_steps for dpmpp2m must be in 1\.\.1000"),
      ([*ckpt, "--sampler", "ddpm", "--num_steps", 50, *out], "runs all 1000 steps"),
      ([*ckpt, "--sampler", "ddim", "--num_steps", 1001, *out], r"must be in 1\.\.1000"),
      ([*ckpt, "--sampler", "ddim", "--num_steps", 0, *out], r"must be in 1\.\.1000"),
      ([*ckpt, "--sampler", "plms", *out], "invalid choice"),
      (["--workdir", tmp_path, "--num_groups", 8, *out], "apply only to --torch_checkpoint"),
      (["--workdir", tmp_path, "--data_range", "minus_one_one", *out],
       "apply only to --torch_checkpoint"),
      ([*ckpt, "--data_range", "zero_255", *out], "invalid choice"),
      ([*ckpt, "--step", 2, *out], "--step applies only to --workdir"),
      ([*ckpt, "--autoguide_step", 2, *out], "--autoguide_step applies only to --workdir"),
      (["--workdir", tmp_path, "--autoguide_scale", 2, *out],
       "--autoguide_scale applies only with --autoguide_step N"),
      (["--workdir", tmp_path, "--autoguide_min_t", 100, *out],
       "--autoguide_min_t applies only with --autoguide_step N"),
      (["--workdir", tmp_path, "--autoguide_step", 1, "--autoguide_min_t", -5, *out],
       "--autoguide_min_t must be a step >= 0, got -5"),
      (["--workdir", tmp_path, "--autoguide_step", -1, *out],
       "--autoguide_step must be a step >= 0, got -1"),
      (["--workdir", tmp_path, "--autoguide_step", 1, "--autoguide_scale", "nan", *out],
       "--autoguide_scale must be a finite number >= 0, got nan"),
      (["--torch_checkpoint", tmp_path / "missing.pt", *out], "does not exist"),
      (["--torch_checkpoint", checkpoint, *out], "does not split into 32 groups"),
      ([*ckpt, "--out", tmp_path], "is a directory"),
      ([*ckpt, *out, "--npz", tmp_path / "x.png"], "must differ"),
      ([*ckpt, "--out", checkpoint / "x.png"], "cannot create the directory"),
      ([*ckpt, "--out", ""], "an output path is empty"),
      ([*ckpt, *out, "--npz", ""], "an output path is empty"),
  ]
  for argv, message in cases:
    assert re.search(message, _error(argv)), (argv, message)
  # A refused command creates no output directory either.
  assert "does not exist" in _error(["--workdir", tmp_path / "nope", "--out",
                                     tmp_path / "new" / "x.png"])
  assert not (tmp_path / "new").exists()
  (tmp_path / "exists.png").write_bytes(b"keep me")
  assert "--overwrite" in _error([*ckpt, "--out", tmp_path / "exists.png"])
  assert (tmp_path / "exists.png").read_bytes() == b"keep me"


def test_too_many_images_for_the_host_or_the_device_are_one_line_errors(checkpoint, tmp_path,
                                                                        monkeypatch):
  """Refused before sampling when the images cannot fit in host memory; a batch the
  device cannot hold (XLA's RESOURCE_EXHAUSTED) names --batch_size. Nothing is written."""
  out = tmp_path / "x.png"
  ckpt = ["--torch_checkpoint", checkpoint, *QUARTER_FLAGS, "--sampler", "ddim",
          "--num_steps", 2, "--out", out]
  monkeypatch.setattr(sample, "host_bytes_available", lambda: 2**30)
  message = _error([*ckpt, "--num_samples", 200_000])
  assert message == ("--num_samples 200000 needs ~1.5 GiB of host memory for its images, more "
                     "than the 1.0 GiB available; sample fewer per command (several commands "
                     "with other --seed values)")

  def exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.\nmore")
  monkeypatch.setattr(sample.sampling, "ddim_sample", exhausted)
  message = _error([*ckpt, "--num_samples", 4, "--batch_size", 4])
  assert message == ("a batch of 4 images does not fit in the device's memory "
                     "(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.); "
                     "use a smaller --batch_size")
  assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["--out", "x.png"],  # Checked before any weights are read.
    ["--sampler", "plms", "--out", "x.png"],  # An argparse error.
    ["--torch_checkpoint", "{ckpt}", "--num_steps", 7, "--out", "{tmp}/x.png"],  # After.
])
def test_errors_are_one_line_with_exit_status_2(argv, checkpoint, tmp_path):
  argv = [str(a).format(ckpt=checkpoint, tmp=tmp_path) for a in argv]
  proc = _run(*argv)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_autoguidance_defaults_to_the_run_config(tmp_path):
  """Each flag given, else the run config's autoguide_* key (the step unless
  --no_autoguide), else the defaults; a config from before the keys guides nothing."""
  config = base_config()
  config.autoguide_step, config.autoguide_scale, config.autoguide_min_t = 1500, 3.0, 40
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(config_to_json(config))
  old = tmp_path / "old"
  old.mkdir()
  legacy = base_config().to_dict()
  for key in ("autoguide_step", "autoguide_scale", "autoguide_min_t"):
    del legacy[key]
  (old / "config.json").write_text(json.dumps(legacy))

  def settings(*argv):
    args = sample._parse_args([*map(str, argv), "--out", str(tmp_path / "x.png")])  # pylint: disable=protected-access
    sample._check_args(args)  # pylint: disable=protected-access
    return sample._autoguidance(args, read_config(args.workdir))  # pylint: disable=protected-access

  Guide = sample.Autoguidance
  assert settings("--workdir", run) == Guide(1500, 3.0, 40, from_config=True)
  assert settings("--workdir", run, "--autoguide_step", 500) == Guide(500, 3.0, 40)
  assert settings("--workdir", run, "--autoguide_scale", 2) == Guide(1500, 2.0, 40, True)
  assert settings("--workdir", run, "--no_autoguide").step is None
  assert settings("--workdir", old) == Guide(None, sample.DEFAULT_AUTOGUIDE_SCALE,
                                             sample.DEFAULT_AUTOGUIDE_MIN_T)
  assert settings("--workdir", old, "--autoguide_step", 7) == Guide(
      7, sample.DEFAULT_AUTOGUIDE_SCALE, sample.DEFAULT_AUTOGUIDE_MIN_T)
  for argv, message in (
      (("--workdir", old, "--autoguide_min_t", 5), "--autoguide_min_t applies only with "
       "--autoguide_step N, or to a run whose config sets autoguide_step"),
      (("--workdir", run, "--no_autoguide", "--autoguide_scale", 2), "--no_autoguide "
       "samples without autoguidance: drop --autoguide_scale")):
    with pytest.raises(UserError, match=re.escape(message)):
      settings(*argv)


def test_the_run_configs_guide_is_skipped_with_a_note_where_it_cannot_apply(monkeypatch):
  """The config's guide step is read only where the run keeps it below the sampled step
  (10 here); otherwise the run samples unguided and says why. Asked for by flag, the same
  step is an error."""
  config = base_config()
  monkeypatch.setattr(sample.checkpoint, "load_run_state", _fake_run(config))
  monkeypatch.setattr(sample.checkpoint, "kept_steps", lambda workdir: [6, 8, 10])
  load = lambda step, from_config=True: sample._load_workdir(  # pylint: disable=protected-access
      "run", True, guide_step=step, guide_from_config=from_config)
  for step, note in ((5, "is not kept (its steps: 6, 8, 10)"), (10, "is not below the "
                                                                   "sampled step 10")):
    config.autoguide_step = step
    run = load(step)
    assert (run.guide_params, run.guide_step) == (None, None)
    assert run.guide_note == f"not autoguided: the config's autoguide_step {step} {note}"
  config.autoguide_step = 8
  run = load(8)
  assert (run.guide_params, run.guide_step, run.guide_note) == ({"w": 1}, 8, "")
  with pytest.raises(UserError, match="--autoguide_step must be below the sampled step 10"):
    load(10, from_config=False)


@pytest.mark.slow
def test_workdir_round_trip(tmp_path):
  """Trains the tiny config for 3 steps on a 50-step schedule, its config autoguiding by
  step 2, then samples it with DDPM and DDIM."""
  workdir = tmp_path / "run"
  train = subprocess.run(
      [sys.executable, "-m", "ddpm_jax.train", "--config", "configs/mnist_tiny.py",
       "--workdir", str(workdir), "--config.num_train_steps=3", "--config.batch_size=4",
       "--config.schedule.num_steps=50", "--config.model.time_steps=50",
       "--config.checkpoint_every_steps=1", "--config.lr_schedule=constant",
       # Three steps barely move the EMA, so a large weight makes the guidance visible.
       "--config.autoguide_step=2", "--config.autoguide_scale=300",
       "--config.autoguide_min_t=20"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT, capture_output=True, text=True,
      timeout=600, check=False)
  assert train.returncode == 0, train.stderr[-2000:]
  # The run's one-line summary counts the original UNET's parameters for this architecture.
  tiny = R.UNET(Channels=[8, 16, 32, 64, 64, 48], num_groups=4, num_heads=2)
  count = sum(p.numel() for p in tiny.parameters())
  first, last = train.stdout.splitlines()
  assert first.startswith(f"UNet (8, 16, 32, 64, 64, 48): {count:,} parameters, float32 "
                          "compute, on 1 cpu device; batch 4, steps 0 -> 3"), first
  assert last.startswith(f"Trained to step 3; checkpoints in {workdir / 'checkpoints'}"), last
  out = tmp_path / "out"
  proc = _run("--workdir", workdir, "--num_samples", 2, "--sampler", "ddpm", "--seed", 0,
              "--out", out / "grid.png", "--npz", out / "samples.npz",
              "--reverse_strip", out / "strip.png")
  assert proc.returncode == 0, proc.stderr
  assert "ddpm, 50 steps" in proc.stdout
  # The bar counts the updates, in chunks of 5 (at most 20 chunks of equal length).
  assert "ddpm-50, 1 x 2 images" in proc.stderr and " 50/50 " in proc.stderr, proc.stderr
  assert " 5/50 " in proc.stderr and " 4/50 " not in proc.stderr, proc.stderr
  assert "WARNING" not in proc.stderr, proc.stderr  # Orbax's read-only notice is dropped.
  with np.load(out / "samples.npz") as npz:
    assert npz["images"].shape == (2, 32, 32, 1) and npz["images"].dtype == np.float32
    assert int(npz["num_steps"]) == 50
    assert str(npz["data_range"]) == read_config(workdir).data.range
  with Image.open(out / "strip.png") as strip:
    assert strip.size == (10 * (32 + images.PADDING) + images.PADDING,
                          2 * (32 + images.PADDING) + images.PADDING)
  proc = _run("--workdir", workdir, "--num_samples", 2, "--sampler", "ddim", "--num_steps", 51,
              "--out", out / "other.png")
  assert proc.returncode == 2 and "must be in 1..50" in proc.stderr

  # --step picks a checkpoint: the newest by name gives the default's images, an older one
  # its own weights; a step not kept is one line naming those that are.
  assert [int(load_run_state(workdir, step=s)[2].step) for s in (1, 2, 3)] == [1, 2, 3]
  for step in (3, 2):
    proc = _run("--workdir", workdir, "--step", step, "--num_samples", 2, "--sampler", "ddpm",
                "--seed", 0, "--out", out / f"step{step}.png", "--npz", out / f"step{step}.npz")
    assert proc.returncode == 0 and f"at step {step}" in proc.stdout, proc.stderr
  with np.load(out / "samples.npz") as latest, np.load(out / "step3.npz") as step3, \
       np.load(out / "step2.npz") as step2:
    np.testing.assert_array_equal(step3["images"], latest["images"])
    assert np.abs(step2["images"] - latest["images"]).max() > 1e-4
  proc = _run("--workdir", workdir, "--step", 7, "--out", out / "seven.png")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "has no checkpoint at step 7; its steps: 1, 2, 3" in proc.stderr

  # Autoguidance by an earlier checkpoint: the CLI's images are those of the guided sampler
  # on the two steps' EMA weights, and by default the config's (the same here); w = 1 is
  # the unguided sampler's, as is --no_autoguide; a guide step not kept, or not earlier
  # than the sampled one, is one line when asked for, a note when the config's.
  ddim = ("--sampler", "ddim", "--num_steps", 4, "--num_samples", 2, "--seed", 0)
  proc = _run("--workdir", workdir, *ddim, "--autoguide_step", 2, "--autoguide_scale", 300,
              "--autoguide_min_t", 20, "--out", out / "ag.png", "--npz", out / "ag.npz")
  assert proc.returncode == 0, proc.stderr
  assert "x0-prediction model, autoguided by step 2 at 300 for t >= 20) from" in proc.stdout, (
      proc.stdout)
  config, _, state3 = load_run_state(workdir)
  state2 = load_run_state(workdir, step=2)[2]
  guided = sampling.ddim_sample(
      sampling.Autoguided(build_unet(config.model).apply, 300.0, 20),
      (state3.ema_params, state2.ema_params), build_schedule(**config.schedule),
      jax.random.key(0), (2, 32, 32, 1), 4, 1.0, (), clip_x0=(-1.0, 1.0),
      objective=config.objective)[0]
  with np.load(out / "ag.npz") as npz:
    np.testing.assert_allclose(npz["images"], guided, rtol=1e-5, atol=1e-5)
    assert (int(npz["autoguide_step"]), float(npz["autoguide_scale"]),
            int(npz["autoguide_min_t"])) == (2, 300.0, 20)
  for name, flags in (("w1", ("--autoguide_step", 2, "--autoguide_scale", 1,
                                          "--autoguide_min_t", 20)),
                      ("plain", ("--no_autoguide",)), ("default", ())):
    proc = _run("--workdir", workdir, *ddim, *flags, "--out", out / f"{name}.png", "--npz",
                out / f"{name}.npz")
    assert proc.returncode == 0, proc.stderr
  with np.load(out / "w1.npz") as w1, np.load(out / "plain.npz") as plain, \
       np.load(out / "default.npz") as default, np.load(out / "ag.npz") as ag:
    np.testing.assert_array_equal(w1["images"], plain["images"])
    assert np.abs(plain["images"] - guided).max() > 1e-3
    np.testing.assert_array_equal(default["images"], ag["images"])
    assert int(default["autoguide_step"]) == 2 and "autoguide_step" not in plain
  proc = _run("--workdir", workdir, *ddim, "--step", 2, "--out", out / "unguided.png")
  assert proc.returncode == 0, proc.stderr
  assert ("; not autoguided: the config's autoguide_step 2 is not below the sampled step 2) "
          "from") in proc.stdout, proc.stdout
  for flags, message in ((("--autoguide_step", 3), "--autoguide_step must be below the "
                          "sampled step 3, got 3"),
                         (("--step", 2, "--autoguide_step", 0), "has no checkpoint at step 0; "
                          "its steps: 1, 2, 3"),
                         (("--autoguide_step", 2, "--autoguide_min_t", 50), "--autoguide_min_t "
                          "must be below the schedule's 50 steps (0..49), got 50: no update "
                          "would be guided")):
    proc = _run("--workdir", workdir, *ddim, *flags, "--out", out / "refused.png")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr, proc.stderr
  assert not (out / "refused.png").exists()
  # Refused from the config alone, before any checkpoint is read: a workdir whose config is
  # all there is says the same.
  bare = workdir.parent / "config_only"
  bare.mkdir()
  (bare / "config.json").write_bytes((workdir / "config.json").read_bytes())
  proc = _run("--workdir", bare, *ddim, "--autoguide_step", 2, "--autoguide_min_t", 50,
              "--out", out / "refused.png")
  assert proc.returncode == 2 and "--autoguide_min_t must be below the schedule's 50 " \
      "steps" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
  # The config's T beyond the schedule (a flag's is refused above): a note, no guide.
  config = read_config(workdir)
  config.autoguide_min_t = 60
  (workdir / "config.json").write_text(config_to_json(config))
  proc = _run("--workdir", workdir, *ddim, "--out", out / "late.png", "--npz", out / "late.npz")
  assert proc.returncode == 0, proc.stderr
  assert ("; not autoguided: the config's autoguide_min_t 60 is beyond the schedule's 50 "
          "steps) from") in proc.stdout, proc.stdout
  with np.load(out / "late.npz") as late, np.load(out / "plain.npz") as plain:
    np.testing.assert_array_equal(late["images"], plain["images"])


def _dpmpp2m_args(checkpoint, out_dir, *extra):
  return ["--torch_checkpoint", checkpoint, *QUARTER_FLAGS, "--num_samples", 3,
          "--batch_size", 2, "--sampler", "dpmpp2m", "--num_steps", 4, "--seed", 7,
          "--out", out_dir / "grid.png", "--npz", out_dir / "samples.npz",
          "--reverse_strip", out_dir / "strip.png", *extra]


def test_dpmpp2m_writes_the_outputs_and_is_deterministic(checkpoint, tmp_path):
  first = _run(*_dpmpp2m_args(checkpoint, tmp_path / "a"))
  assert first.returncode == 0, first.stderr
  assert "dpmpp2m, 4 steps, logsnr spacing" in first.stdout, first.stdout
  # The bar counts the updates of both batches, one chunk per update.
  assert "dpmpp2m-4, 2 x 2 images" in first.stderr and " 8/8 " in first.stderr, first.stderr
  with np.load(tmp_path / "a" / "samples.npz") as npz:
    samples = npz["images"]
    assert samples.dtype == np.float32 and samples.shape == (3, 32, 32, 1)
    assert np.isfinite(samples).all()
    assert (str(npz["sampler"]), int(npz["num_steps"]), str(npz["spacing"]),
            bool(npz["clip_denoised"])) == ("dpmpp2m", 4, "logsnr", False)
    assert "eta" not in npz
  tile = 32 + images.PADDING
  with Image.open(tmp_path / "a" / "strip.png") as strip:  # One row of 10 frames per sample.
    assert strip.size == (10 * tile + images.PADDING, 3 * tile + images.PADDING)

  again = _run(*_dpmpp2m_args(checkpoint, tmp_path / "b"))
  assert again.returncode == 0, again.stderr
  with np.load(tmp_path / "b" / "samples.npz") as npz:
    np.testing.assert_array_equal(npz["images"], samples)
  assert (tmp_path / "b" / "strip.png").read_bytes() == (tmp_path / "a" / "strip.png").read_bytes()

  timed = _run(*_dpmpp2m_args(checkpoint, tmp_path / "c", "--spacing", "time",
                              "--clip_denoised"))
  assert timed.returncode == 0, timed.stderr
  assert "dpmpp2m, 4 steps, time spacing, x0 clipped" in timed.stdout, timed.stdout
  with np.load(tmp_path / "c" / "samples.npz") as npz:
    assert (str(npz["spacing"]), bool(npz["clip_denoised"])) == ("time", True)
    assert not np.allclose(npz["images"], samples)


def _fake_run(config):
  """``checkpoint.load_run_state`` for a workdir holding ``config`` at step 10 (the weights
  are not read)."""
  state = types.SimpleNamespace(params={"w": 0}, ema_params={"w": 1})
  return lambda workdir, step=None: (config, 10, state)


def test_a_workdir_config_gives_the_objective_and_schedule(monkeypatch):
  """A config saved before objective and schedule.kind existed means eps and linear."""
  old = base_config().to_dict()
  del old["objective"], old["schedule"]["kind"]
  monkeypatch.setattr(sample.checkpoint, "load_run_state",
                      _fake_run(ml_collections.ConfigDict(old)))
  run = sample._load_workdir("old", use_ema=True)  # pylint: disable=protected-access
  assert run.objective == "eps" and run.params == {"w": 1}
  np.testing.assert_array_equal(run.schedule.alphas_cumprod, linear_schedule().alphas_cumprod)

  new = base_config()
  new.objective, new.schedule.kind = "v", "cosine"
  monkeypatch.setattr(sample.checkpoint, "load_run_state", _fake_run(new))
  run = sample._load_workdir("new", use_ema=False)  # pylint: disable=protected-access
  assert run.objective == "v" and run.params == {"w": 0}
  np.testing.assert_array_equal(run.schedule.alphas_cumprod,
                                build_schedule("cosine").alphas_cumprod)

  for key, value, message in (("objective", "score", "config objective must be one of eps, x0, v"),
                              ("kind", "quadratic", "config schedule.kind must be one of")):
    bad = base_config().to_dict()
    (bad if key == "objective" else bad["schedule"])[key] = value
    monkeypatch.setattr(sample.checkpoint, "load_run_state",
                        _fake_run(ml_collections.ConfigDict(bad)))
    with pytest.raises(UserError, match=message):
      sample._load_workdir("bad", use_ema=True)  # pylint: disable=protected-access


@pytest.mark.slow
def test_a_v_prediction_cosine_run_samples_with_dpmpp2m(tmp_path):
  """Trains the tiny config for 2 steps with objective v on a 50-step cosine schedule, then
  samples it with DPM-Solver++(2M), twice."""
  workdir = tmp_path / "run"
  train = subprocess.run(
      [sys.executable, "-m", "ddpm_jax.train", "--config", "configs/mnist_tiny.py",
       "--workdir", str(workdir), "--config.num_train_steps=2", "--config.batch_size=4",
       "--config.schedule.num_steps=50", "--config.model.time_steps=50",
       "--config.schedule.kind=cosine", "--config.objective=v",
       "--config.loss_weighting=min_snr", "--config.checkpoint_every_steps=2",
       "--config.lr_schedule=constant"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=ROOT, capture_output=True, text=True,
      timeout=600, check=False)
  assert train.returncode == 0, train.stderr[-2000:]
  assert (read_config(workdir).objective, read_config(workdir).schedule.kind) == ("v", "cosine")
  out = tmp_path / "out"
  results = []
  for name in ("a", "b"):
    proc = _run("--workdir", workdir, "--num_samples", 2, "--sampler", "dpmpp2m",
                "--num_steps", 10, "--seed", 3, "--out", out / f"{name}.png",
                "--npz", out / f"{name}.npz", "--reverse_strip", out / f"{name}_strip.png")
    assert proc.returncode == 0, proc.stderr
    assert "dpmpp2m, 10 steps, logsnr spacing, v-prediction model" in proc.stdout, proc.stdout
    assert "dpmpp2m-10, 1 x 2 images" in proc.stderr and " 10/10 " in proc.stderr, proc.stderr
    with np.load(out / f"{name}.npz") as npz:
      assert npz["images"].shape == (2, 32, 32, 1) and np.isfinite(npz["images"]).all()
      results.append(npz["images"])
  np.testing.assert_array_equal(results[0], results[1])
  with Image.open(out / "a_strip.png") as strip:
    assert strip.size == (10 * (32 + images.PADDING) + images.PADDING,
                          2 * (32 + images.PADDING) + images.PADDING)
