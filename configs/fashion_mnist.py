"""The original's model and optimiser on Fashion-MNIST (28x28 grey, padded to 32x32).

Run:  .venv/bin/python -m ddpm_jax.train --config configs/fashion_mnist.py --workdir runs/fashion

Needs the data prepared for TFDS (`tfds` extra, and tensorflow to prepare it once), or
the four Fashion-MNIST IDX files: `--config.data.source=idx --config.data.dir=DIR`.
"""

import ml_collections

from ddpm_jax.config_defaults import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.data.source = "tfds"
  config.data.name = "fashion_mnist"
  return config
