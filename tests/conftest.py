"""Shared test helpers: CPU-only JAX, deterministic torch, and NCHW <-> NHWC at the boundary."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One CPU device unless a test asks for more: `python -m ddpm_jax.train` would otherwise
# split the host into a device per core, and the tests compare its runs bit for bit with
# runs in this process.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=1").strip()
# XLA's CPU compiles dominate these tests (10-30 s for a train step on 2 cores); tests that
# build the same program again, in process or in a subprocess, take it from this cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "ddpm_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import numpy as np
import pytest

from ddpm_jax.cli import load_config_file  # pylint: disable=unused-import
from ddpm_jax.config_defaults import base_config


def nchw_to_nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def nhwc_to_nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  try:
    import torch
  except ImportError:
    yield
    return
  # One thread: OpenMP workers that spin while XLA or another process holds the other core
  # made a small forward pass 20x slower (measured); one thread costs little here.
  torch.set_num_threads(1)
  yield


# Small architectures that keep the original's wiring (see ddpm_jax.model.UNet).
QUARTER = dict(channels=(16, 32, 64, 128, 128, 96), num_groups=8, num_heads=4)
HALF = dict(channels=(32, 64, 128, 256, 256, 192), num_groups=16, num_heads=8)


def reference_kwargs(arch: dict, dropout_prob: float = 0.0) -> dict:
  """``reference_torch.UNET`` arguments for a ``ddpm_jax`` architecture dict."""
  kw = dict(dropout_prob=dropout_prob)
  if "channels" in arch:
    kw["Channels"] = list(arch["channels"])
  for src, dst in (("num_groups", "num_groups"), ("num_heads", "num_heads")):
    if src in arch:
      kw[dst] = arch[src]
  return kw


def randomize_norms(model, seed: int = 0):
  """Moves GroupNorm scales/biases off their 1/0 init so the weight mapping is exercised."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "gnorm" in name:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
  return model


def micro_config(**overrides):
  """A very small UNet with the original's wiring, for fast loop tests."""
  config = base_config()
  config.model.channels = (8, 16, 32, 64, 64, 48)
  config.model.num_groups = 4
  config.model.num_heads = 2
  config.batch_size = 8
  config.num_train_steps = 4
  config.learning_rate = 1e-3
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def reversed_kernel_formats(tree):
  """A ``Format`` per array of ``tree`` that lays every 4-d array (the conv kernels) out in
  the reverse order of its dimensions and the rest row-major: layouts a CPU never picks,
  to run the layout-keeping train step on one."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.layout import Format, Layout  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a: Format(Layout(major_to_minor=tuple(
      reversed(range(a.ndim)) if a.ndim == 4 else range(a.ndim))), a.sharding), tree)
