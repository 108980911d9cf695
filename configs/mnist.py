"""The original tutorial's settings: the 35.2M UNET, batch 64, Adam 2e-5, EMA 0.9999, 75 epochs.

Run:  .venv/bin/python -m ddpm_jax.train --config configs/mnist.py --workdir runs/mnist

Every key and its default is listed in ddpm_jax/config_defaults.py. Data: the original
trains on torchvision's full MNIST. Offline, the default is the bundled real subset; for
full MNIST use `--config.data.source=idx --config.data.dir=DIR` (the four IDX files, e.g.
torchvision's data/MNIST/raw) or `--config.data.source=tfds`.
"""

import ml_collections

from ddpm_jax.config_defaults import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.model.channels = (64, 128, 256, 512, 512, 384)
  config.model.num_groups = 32
  config.batch_size = 64
  config.num_epochs = 75
  config.learning_rate = 2e-5
  config.ema_decay = 0.9999
  return config
