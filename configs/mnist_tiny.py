"""The CPU demo: a small UNet with the original's wiring that learns digits on 2 cores.

Run:  .venv/bin/python -m ddpm_jax.train --config configs/mnist_tiny.py --workdir runs/demo
"""

import ml_collections

from ddpm_jax.config_defaults import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.model.channels = (16, 32, 64, 128, 128, 96)
  config.model.num_groups = 8
  config.model.num_heads = 4
  config.model.dropout_rate = 0.0
  config.batch_size = 32
  config.num_train_steps = 600
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.ema_decay = 0.99
  config.log_every_steps = 25
  config.checkpoint_every_steps = 200
  return config
