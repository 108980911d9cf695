"""Every shipped config loads, passes validation, and builds the UNet it describes."""

import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax.config_checks import validate_config
from ddpm_jax.errors import UserError
from ddpm_jax.model import build_unet
from tests.conftest import load_config_file

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_valid_and_builds(path):
  config = load_config_file(path)
  assert "Run:" in path.read_text()  # Each config opens with the command that runs it.
  validate_config(config)
  model = build_unet(config.model)
  size, ch = config.data.image_size, config.data.channels
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, size, size, ch)), jnp.zeros((2,), jnp.int32))[0])
  assert out.shape == (2, size, size, ch)


def test_mnist_config_is_the_original():
  config = load_config_file(pathlib.Path(__file__).parents[1] / "configs" / "mnist.py")
  assert (config.batch_size, config.learning_rate, config.ema_decay, config.num_epochs) == (
      64, 2e-5, 0.9999, 75)
  assert tuple(config.model.channels) == (64, 128, 256, 512, 512, 384)
  model = config.model
  assert (model.num_groups, model.num_heads, model.dropout_rate) == (32, 8, 0.1)
  assert (config.warmup_steps, config.grad_clip_norm, config.data.range) == (0, 0.0, "zero_one")
  assert (config.schedule.num_steps, config.schedule.beta_start, config.schedule.beta_end) == (
      1000, 1e-4, 0.02)


@pytest.mark.parametrize("key, value, message", [
    ("profile_steps", -1, "profile_steps must be >= 0 (0 = no profile), got -1"),
    ("sample_every_steps", -2, "sample_every_steps must be >= 0 (0 = no samples), got -2"),
    # Checked before the widths are divided by them (a ZeroDivisionError traceback before).
    ("model.num_groups", 0, "model.num_groups and model.num_heads must be > 0; got 0 and 2"),
    ("model.num_heads", 0, "model.num_groups and model.num_heads must be > 0; got 4 and 0"),
    ("seed", -1, "seed must be in 0..4294967295 (JAX keeps 32 bits of it), got -1"),
    ("seed", 2**32, "seed must be in 0..4294967295 (JAX keeps 32 bits of it), got 4294967296"),
    ("learning_rate", float("inf"), "learning_rate must be a finite number > 0, got inf"),
    ("learning_rate", float("nan"), "learning_rate must be a finite number > 0, got nan"),
    ("learning_rate", 0.0, "learning_rate must be a finite number > 0, got 0.0"),
    ("grad_clip_norm", float("inf"),
     "grad_clip_norm must be a finite number >= 0 (0 = no clipping), got inf"),
    ("grad_clip_norm", -1.0,
     "grad_clip_norm must be a finite number >= 0 (0 = no clipping), got -1.0"),
    ("warmup_steps", -1, "warmup_steps must be >= 0, got -1"),
    ("autoguide_step", -1, "autoguide_step must be a step >= 0 (0 = no autoguidance), got -1"),
    ("autoguide_scale", float("nan"), "autoguide_scale must be a finite number >= 0, got nan"),
    ("autoguide_min_t", -1, "autoguide_min_t must be a step >= 0, got -1"),
    ("ema_decay", float("nan"), "ema_decay must be in [0, 1), got nan"),
    ("schedule.beta_end", float("inf"), "need 0 < schedule.beta_start <= schedule.beta_end < 1"),
])
def test_a_bad_value_is_refused_in_one_line(key, value, message):
  config = load_config_file(pathlib.Path(__file__).parents[1] / "configs" / "mnist_tiny.py")
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(UserError, match=re.escape(message)):
    validate_config(config)


def test_the_tiny_config_guides_with_a_checkpoint_it_keeps():
  """`sample` autoguides a tiny run by the EMA at its config's autoguide_step (and `make
  demo` leaves that to the config): the step must be one the run checkpoints and still
  keeps at its end, below its last step, or the demo would sample unguided."""
  makefile = (pathlib.Path(__file__).parents[1] / "Makefile").read_text()
  assert "--autoguide" not in makefile and "--no_autoguide" not in makefile
  config = load_config_file(CONFIGS[0].parent / "mnist_tiny.py")
  step, every, last = config.autoguide_step, config.checkpoint_every_steps, config.num_train_steps
  kept = [s for s in range(every, last + 1, every)][-config.keep_checkpoints:]
  assert step in kept and step < last, (step, kept)
  assert load_config_file(CONFIGS[0].parent / "mnist_tiny_cond.py").autoguide_step == 0
