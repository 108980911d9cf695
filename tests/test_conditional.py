"""Class-conditional training and classifier-free guidance: the unconditional path unchanged
bit for bit, guidance at w = 0 and w = 1 exact, label dropout at its rate, an exact resume
with labels, the sample CLI's labels and convert's refusal."""

import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import checkpoint, convert, data, diffusion, images, sample, sampling, train
from ddpm_jax.config_checks import check_resume_compatible, validate_config
from ddpm_jax.errors import UserError
from ddpm_jax.model import CLASS_EMBED_SCALE, NO_CLASS, UNet, build_unet, sinusoidal_embeddings
from ddpm_jax.schedule import linear_schedule
from tests.conftest import load_config_file, micro_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# The last commit before class conditioning: its model.py and diffusion.py are "today's".
BEFORE = "a44c561"
MICRO = dict(channels=(8, 16, 32, 64, 64, 48), num_groups=4, num_heads=2)
NUM_CLASSES = 10


def _module_before(path: str):
  """``path`` (a ``ddpm_jax`` module) as it was at :data:`BEFORE`, or a skip."""
  try:
    source = subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip(f"needs git and commit {BEFORE} to read {path} as it was")
  name = f"before_{pathlib.Path(path).stem}"
  spec = importlib.util.spec_from_loader(name, loader=None)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Flax's dataclasses look their module up.
  exec(compile(source, f"{BEFORE}:{path}", "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


def _config(name):
  return load_config_file(str(REPO / "configs" / f"{name}.py"))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def inputs():
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 1))
  return x, jnp.array([0, 500, 999], jnp.int32)


def test_a_unet_without_classes_is_the_original(inputs):
  """num_classes = 0: the same parameters and outputs, bit for bit, as the UNet before
  classes existed; num_classes = 10 adds one zero embedding and changes no other parameter."""
  before = _module_before("ddpm_jax/model.py")
  x, t = inputs
  params = UNet(**MICRO).init(jax.random.key(0), x, t)
  old_params = before.UNet(**MICRO).init(jax.random.key(0), x, t)
  assert jax.tree.structure(params) == jax.tree.structure(old_params)
  for a, b in zip(_leaves(params), _leaves(old_params), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(jax.jit(UNet(**MICRO).apply)(old_params, x, t),
                                jax.jit(before.UNet(**MICRO).apply)(old_params, x, t))

  conditional = UNet(**MICRO, num_classes=NUM_CLASSES).init(jax.random.key(0), x, t)["params"]
  embedding = conditional.pop("class_embed")["embedding"]
  assert embedding.shape == (NUM_CLASSES + 1, max(MICRO["channels"]))
  assert not np.any(embedding)
  for a, b in zip(_leaves(conditional), _leaves(old_params["params"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_class_row_shifts_the_time_embedding_by_its_scaled_value(inputs):
  """emb = table[t] + CLASS_EMBED_SCALE * row[label]: a class whose row is
  (table[t2] - table[t1]) / scale makes the model at t1 the no-class model at t2."""
  x, _ = inputs
  model = UNet(**MICRO, num_classes=NUM_CLASSES)
  params = model.init(jax.random.key(0), x, jnp.zeros(len(x), jnp.int32))["params"]
  table = sinusoidal_embeddings(1000, max(MICRO["channels"]))
  t1, t2 = 100, 700
  rows = np.zeros((NUM_CLASSES + 1, table.shape[1]), np.float32)
  rows[4] = (table[t2] - table[t1]) / CLASS_EMBED_SCALE
  params["class_embed"]["embedding"] = jnp.asarray(rows)
  apply = jax.jit(model.apply)
  labelled = apply({"params": params}, x, jnp.full(len(x), t1), jnp.full(len(x), 4))
  no_class = apply({"params": params}, x, jnp.full(len(x), t2))
  np.testing.assert_allclose(labelled, no_class, rtol=0, atol=1e-5)
  assert np.abs(np.asarray(labelled - apply({"params": params}, x, jnp.full(len(x), t1)))
                ).max() > 1e-3


def _conditional_params(x, t):
  """A micro conditional UNet's params with its class rows moved off zero, so that each
  label gives another output."""
  model = UNet(**MICRO, num_classes=NUM_CLASSES)
  params = model.init(jax.random.key(0), x, t)["params"]
  rows = params["class_embed"]["embedding"]
  params["class_embed"]["embedding"] = jax.random.normal(jax.random.key(2), rows.shape)
  return model, params


def test_guidance_at_zero_and_one_is_the_unconditional_and_the_conditional_output(inputs):
  x, t = inputs
  model, params = _conditional_params(x, t)
  labels = jnp.array([7, 0, 3], jnp.int32)
  output = jax.jit(sampling.model_output, static_argnums=0)
  guided = jax.jit(sampling.guided_output, static_argnums=(0, 5))
  cond = output(model.apply, params, x, t[1], labels)
  uncond = output(model.apply, params, x, t[1])
  # None, NO_CLASS and num_classes all select the "no class" row.
  np.testing.assert_array_equal(output(model.apply, params, x, t[1], jnp.full(3, NO_CLASS)),
                                uncond)
  np.testing.assert_array_equal(
      output(model.apply, params, x, t[1], jnp.full(3, NUM_CLASSES)), uncond)
  assert np.abs(np.asarray(cond - uncond)).max() > 1e-3  # The labels matter.
  np.testing.assert_array_equal(guided(model.apply, params, x, t[1], labels, 1.0), cond)
  np.testing.assert_array_equal(guided(model.apply, params, x, t[1], labels, 0.0), uncond)
  np.testing.assert_allclose(guided(model.apply, params, x, t[1], labels, 3.0),
                             uncond + 3.0 * (cond - uncond), rtol=0, atol=1e-5)

  # w != 0, 1: one forward pass of the batch and its "no class" copy.
  calls = []

  def counting(variables, z, t_batch, labels=None, train=False):
    calls.append((z.shape[0], None if labels is None else np.asarray(labels).tolist()))
    return model.apply(variables, z, t_batch, labels, train=train)
  sampling.guided_output(counting, params, x, t[1], labels, 2.0)
  assert calls == [(6, [7, 0, 3, NO_CLASS, NO_CLASS, NO_CLASS])]


def _toy_apply(variables, z, t, labels=None, train=False):
  """A conditional "model" cheap to compile: z scaled, plus the label's row times t / T."""
  del train
  rows = variables["params"]["rows"]
  index = jnp.full(z.shape[:1], NUM_CLASSES) if labels is None else jnp.where(
      labels < 0, NUM_CLASSES, labels)
  return 0.3 * z + rows[index][:, None, None, :] * (t[:, None, None, None] / 1000.0)


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_each_sampler_at_guidance_zero_and_one_is_exact(sampler):
  """A whole run of each sampler: w = 0 is the "no class" model's run, w = 1 the
  conditional model's (the model with its labels bound), bit for bit."""
  params = {"rows": jax.random.normal(jax.random.key(3), (NUM_CLASSES + 1, 1))}
  schedule = linear_schedule()
  labels = jnp.array([1, 8], jnp.int32)
  bound = functools.partial(_toy_apply, labels=labels)
  rng, shape = jax.random.key(4), (2, 8, 8, 1)
  run = {"ddpm": functools.partial(sampling.ddpm_sample, snapshot_times=()),
         "ddim": functools.partial(sampling.ddim_sample, num_steps=5, eta=1.0),
         "dpmpp2m": functools.partial(sampling.dpmpp2m_sample, num_steps=5)}[sampler]
  x_uncond = run(_toy_apply, params, schedule, rng, shape)[0]
  x_cond = run(bound, params, schedule, rng, shape)[0]
  assert np.abs(np.asarray(x_cond - x_uncond)).max() > 1e-3
  np.testing.assert_array_equal(run(_toy_apply, params, schedule, rng, shape, labels=labels,
                                    guidance_scale=0.0)[0], x_uncond)
  np.testing.assert_array_equal(run(_toy_apply, params, schedule, rng, shape, labels=labels)[0],
                                x_cond)
  guided = run(_toy_apply, params, schedule, rng, shape, labels=labels, guidance_scale=2.0)[0]
  assert np.isfinite(np.asarray(guided)).all()
  assert np.abs(np.asarray(guided - x_cond)).max() > 1e-3


def test_one_ddim_step_applies_the_guided_output():
  """One DDIM update from z_T reads ``out_uncond + w (out_cond - out_uncond)``: its x0 (the
  last update's result) is that eps's, within float rounding."""
  params = {"rows": jax.random.normal(jax.random.key(3), (NUM_CLASSES + 1, 1))}
  schedule = linear_schedule()
  labels = jnp.array([1, 8], jnp.int32)
  z = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
  noise = jnp.zeros((1,) + z.shape)
  x, _ = sampling.ddim_sample_from(_toy_apply, params, schedule, z, noise, 1, labels=labels,
                                   guidance_scale=2.5, snapshot_times=())
  t = jnp.full((2,), 999, jnp.int32)
  uncond = _toy_apply({"params": params}, z, t)
  cond = _toy_apply({"params": params}, z, t, labels)
  eps = uncond + 2.5 * (cond - uncond)
  a = schedule.alphas_cumprod[999]
  np.testing.assert_allclose(x, (z - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a), rtol=1e-5, atol=1e-5)


def test_label_dropout_drops_its_rate():
  n, rate = 10_000, 0.1
  labels = jnp.asarray(np.arange(n) % NUM_CLASSES, jnp.int32)
  dropped = np.asarray(diffusion.drop_labels(jax.random.key(0), labels, rate))
  fraction = np.mean(dropped == NO_CLASS)
  assert abs(fraction - rate) < 4 * np.sqrt(rate * (1 - rate) / n), fraction
  kept = dropped != NO_CLASS
  np.testing.assert_array_equal(dropped[kept], np.asarray(labels)[kept])
  np.testing.assert_array_equal(diffusion.drop_labels(jax.random.key(0), labels, 0.0), labels)


def test_the_loss_keeps_todays_draws(inputs):
  """Without labels the loss is the one before classes existed, bit for bit; with labels,
  t, the noise and the dropout are drawn as without them: dropping every label gives the
  loss of the "no class" model, bit for bit."""
  before = _module_before("ddpm_jax/diffusion.py")
  x, _ = inputs
  x0 = jnp.clip(x, 0, 1)
  schedule, rng = linear_schedule(), jax.random.key(6)
  model = UNet(**MICRO, dropout_rate=0.1)
  params = model.init(jax.random.key(0), x0, jnp.zeros(3, jnp.int32))["params"]
  now = jax.jit(diffusion.loss, static_argnums=1)
  then = jax.jit(before.loss, static_argnums=1)
  assert now(params, model.apply, schedule, x0, rng) == then(params, model.apply, schedule,
                                                                x0, rng)

  cond_model, cond_params = _conditional_params(x0, jnp.zeros(3, jnp.int32))
  labels = jnp.array([4, 5, 6], jnp.int32)
  loss = jax.jit(diffusion.loss, static_argnums=1, static_argnames="label_dropout")
  everything_dropped = loss(cond_params, cond_model.apply, schedule, x0, rng, labels=labels,
                            label_dropout=1.0)
  assert everything_dropped == loss(cond_params, cond_model.apply, schedule, x0, rng)
  # With nothing dropped the labels reach the model.
  assert loss(cond_params, cond_model.apply, schedule, x0, rng, labels=labels) != (
      everything_dropped)


def _conditional_config(**overrides):
  config = micro_config(**overrides)
  config.model.num_classes = NUM_CLASSES
  return config


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
  """A micro conditional run trained 4 steps straight: ``(workdir, final state)``."""
  workdir = tmp_path_factory.mktemp("cond") / "straight"
  return workdir, train.train_and_evaluate(_conditional_config(), str(workdir))


def test_a_resumed_conditional_run_is_bit_identical(conditional_run, tmp_path):
  workdir, straight = conditional_run
  train.train_and_evaluate(_conditional_config(num_train_steps=2), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(_conditional_config(), str(tmp_path / "b"))
  assert int(straight.step) == int(resumed.step) == 4
  for a, b in zip(_leaves(straight), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  # Adam leaves a row with no gradient at 0: only the rows of the labels of the steps'
  # batches (those not dropped) and the "no class" row moved.
  config = _conditional_config()
  images, labels = data.load_dataset(config.data, "train")
  order = data.BatchIterator(images, config.batch_size, config.seed, prefetch=0)
  seen = set(labels[np.concatenate([order.indices_at(s) for s in range(4)])].tolist())
  rows = np.asarray(straight.params["class_embed"]["embedding"])
  moved = set(np.flatnonzero(np.abs(rows).max(axis=1) > 0).tolist())
  assert moved <= seen | {NUM_CLASSES} and len(moved & seen) >= len(seen) - 2, (moved, seen)
  assert checkpoint.read_config(workdir).model.num_classes == NUM_CLASSES


def test_a_conditional_runs_sample_grid_draws_each_class(tmp_path):
  """The training grid of a conditional run is DDIM of the EMA weights with image i asked
  for class i mod C, not the "no class" model."""
  config = _conditional_config(num_train_steps=2, sample_every_steps=2, sample_num_images=4,
                               sample_num_steps=3, ema_decay=0.5)
  train.train_and_evaluate(config, str(tmp_path))
  _, _, ema = checkpoint.load_run(tmp_path)
  rng = jax.random.fold_in(jax.random.key(config.seed), -2 % 2**31)
  apply_fn = build_unet(config.model).apply

  def grid(labels):
    x, _ = sampling.ddim_sample(apply_fn, ema, linear_schedule(), rng, (4, 32, 32, 1), 3,
                                snapshot_times=(), labels=labels)
    return images.tile(images.to_uint8(np.asarray(x), "zero_one"), 2)[..., 0]

  with Image.open(train.sample_grid_path(tmp_path, 2)) as png:
    written = np.asarray(png)
  np.testing.assert_array_equal(written, grid(jnp.arange(4, dtype=jnp.int32)))
  assert np.abs(written.astype(int) - grid(None)).max() > 0


def test_the_loop_gathers_each_steps_labels_with_its_images():
  """The loop's program gathers the labels with the images' indices: the data set held in
  another order, with the indices that pick the same rows, trains the same numbers (one
  program, so bit for bit), and labels out of step with their images do not."""
  config = _conditional_config()
  replicated = jax.sharding.NamedSharding(train.make_mesh(), jax.sharding.PartitionSpec())
  images, labels = data.load_dataset(config.data, "train")
  images = data.preprocess(images[:64], config.data.image_size, config.data.range)
  labels = labels[:64]
  indices = np.array([[5, 17, 2, 63, 40, 8, 31, 12]], np.int32)
  order = np.random.default_rng(0).permutation(64)
  where = np.argsort(order).astype(np.int32)  # images[order][where[i]] == images[i]
  steps = jax.jit(train.train_steps_fn(config, replicated))

  def run(images, labels, indices):
    state = train.create_train_state(config, replicated)
    return _leaves(steps(state, (jnp.asarray(images), jnp.asarray(labels)), indices)[0])
  reference = run(images, labels, indices)
  for a, b in zip(reference, run(images[order], labels[order], where[indices]), strict=True):
    np.testing.assert_array_equal(a, b)
  misaligned = run(images[order], labels, where[indices])
  assert any(np.any(a != b) for a, b in zip(reference, misaligned))


@pytest.mark.slow
def test_two_devices_split_the_labels_with_the_images(tmp_path):
  """``python -m ddpm_jax.train`` on 2 devices, each gathering half of every batch's images
  and labels: the one-device run's numbers to the tolerance of test_train's device tests,
  and the same class rows trained (labels out of step with their images would move others)."""
  overrides = dict(batch_size=8, num_train_steps=3, lr_schedule="constant",
                   learning_rate=1e-3, warmup_steps=0)
  arch = dict(channels=(8, 16, 32, 64, 64, 48), num_groups=4, num_heads=2)
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  flags += ["--config.model.channels=(8,16,32,64,64,48)", "--config.model.num_groups=4",
            "--config.model.num_heads=2"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-m", "ddpm_jax.train", "--config",
                        "configs/mnist_tiny_cond.py", f"--workdir={tmp_path / 'two'}", *flags],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on 2 cpu devices" in out.stdout, out.stdout
  config = _config("mnist_tiny_cond")
  config.model.update(arch)
  config.update(overrides)
  one = train.train_and_evaluate(config, str(tmp_path / "one"))
  _, params, _ = checkpoint.load_run(tmp_path / "two")
  a = np.concatenate([x.ravel() for x in _leaves(params)])
  b = np.concatenate([x.ravel() for x in _leaves(one.params)])
  diff = np.abs(a - b)
  assert diff.max() <= 2 * 1e-3 * 3
  assert np.mean(diff > 1e-5) <= 0.01, np.mean(diff > 1e-5)
  rows_two = np.asarray(params["class_embed"]["embedding"])
  rows_one = np.asarray(one.params["class_embed"]["embedding"])
  np.testing.assert_array_equal(np.abs(rows_two).max(axis=1) > 0,
                                np.abs(rows_one).max(axis=1) > 0)
  assert np.mean(np.abs(rows_two - rows_one) > 1e-5) <= 0.01


def test_sample_draws_the_asked_digit_and_convert_refuses_the_run(conditional_run, tmp_path):
  workdir, _ = conditional_run
  out = tmp_path / "sevens"
  assert sample.main(["--workdir", str(workdir), "--num_samples", "3", "--sampler", "ddim",
                      "--num_steps", "2", "--digit", "3", "--out", str(out / "grid.png"),
                      "--npz", str(out / "samples.npz")]) == 0
  with np.load(out / "samples.npz") as npz:
    assert npz["labels"].tolist() == [3, 3, 3]
    assert float(npz["guidance_scale"]) == 1.0
    assert npz["images"].shape == (3, 32, 32, 1)
  with pytest.raises(UserError, match="labels must be in 0..9 .model.num_classes = 10., got 10"):
    sample.main(["--workdir", str(workdir), "--labels", "1,10", "--out", str(out / "x.png")])
  with pytest.raises(UserError, match="is a class-conditional run .model.num_classes = 10.; the "
                     "original's UNET has no class input"):
    convert.main(["--workdir", str(workdir), "--out", str(tmp_path / "ckpt")])
  assert not (tmp_path / "ckpt").exists()


def test_the_label_grid_has_one_row_per_label(tmp_path):
  """Labels 0..9 cycled over 100 images: a 10x10 grid whose row d holds the ten d's."""
  labels = sample.cycled_labels(range(10), 100)
  samples = (labels / 10.0).astype(np.float32)[:, None, None, None] * np.ones((1, 4, 4, 1))
  sample.save_label_grid(tmp_path / "grid.png", samples, labels, "zero_one")
  tile = 4 + images.PADDING
  with Image.open(tmp_path / "grid.png") as grid:
    pixels = np.asarray(grid)
  assert pixels.shape == (10 * tile + images.PADDING,) * 2
  shade = images.to_uint8(samples, "zero_one")[:10, 0, 0, 0]  # Of labels 0..9.
  for row in range(10):
    for col in range(10):
      y, x = images.PADDING + row * tile, images.PADDING + col * tile
      assert pixels[y, x] == shade[row], (row, col)
  # Uneven counts: each label starts a row, the gaps grey.
  labels = np.array([2, 0, 2, 2], np.int32)
  sample.save_label_grid(tmp_path / "uneven.png", samples[:4], labels, "zero_one")
  with Image.open(tmp_path / "uneven.png") as grid:
    assert grid.size == (2 * tile + images.PADDING, 3 * tile + images.PADDING)


def test_the_config_keys_are_checked_and_resume_with_their_defaults():
  config = _config("mnist_tiny_cond")
  assert config.model.num_classes == NUM_CLASSES and config.label_dropout == 0.1
  tiny = _config("mnist_tiny")
  tiny.model.num_classes = NUM_CLASSES
  tiny.autoguide_step = 0  # Beside classifier-free guidance it lowered the accuracy: off.
  assert config.to_dict() == tiny.to_dict()  # Everything else is the tiny config's.
  validate_config(config)
  for key, value, message in [
      ("num_classes", -1, "model.num_classes must be a whole number >= 0"),
      ("label_dropout", 1.0, "label_dropout must be in [0, 1), got 1.0"),
      ("init_torch_checkpoint", "x.pt", "init_torch_checkpoint starts an unconditional run")]:
    bad = _config("mnist_tiny_cond")
    (bad.model if key == "num_classes" else bad)[key] = value
    with pytest.raises(UserError, match=re.escape(message)):
      validate_config(bad)
  # A run saved before the keys existed is unconditional and resumes as such.
  saved = _config("mnist_tiny")
  del saved.model["num_classes"]
  del saved["label_dropout"]
  check_resume_compatible(saved, _config("mnist_tiny"))
  with pytest.raises(UserError, match="different model.num_classes"):
    check_resume_compatible(saved, config)
  with pytest.raises(UserError, match=r"the data's labels run 0..9, outside 0..4 of "
                     r"model.num_classes = 5; set --config.model.num_classes=10"):
    bad = _config("mnist_tiny_cond")
    bad.model.num_classes = 5
    train._class_labels(bad, np.arange(20) % 10)  # pylint: disable=protected-access
