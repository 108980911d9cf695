"""The original's model on CIFAR-10: 32x32 RGB, so 3 input and 3 output channels.

Run:  .venv/bin/python -m ddpm_jax.train --config configs/cifar10.py --workdir runs/cifar10

Needs CIFAR-10 prepared for TFDS (`tfds` extra; tensorflow prepares it once, or offline
from cifar-10-binary.tar.gz in the TFDS manual dir). Images are used as they are
(no padding) and scaled to [-1, 1], the usual choice for colour images.
"""

import ml_collections

from ddpm_jax.config_defaults import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.channels = 3
  config.data.range = "minus_one_one"
  config.model.out_channels = 3
  config.batch_size = 128
  config.learning_rate = 2e-4
  config.num_epochs = 200
  return config
