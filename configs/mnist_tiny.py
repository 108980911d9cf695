"""The CPU demo: a small UNet with the original's wiring that learns digits on 2 cores.

Run:  .venv/bin/python -m ddpm_jax.train --config configs/mnist_tiny.py --workdir runs/demo

Chosen by measurement on 2 CPU cores (RESULTS.md): an eighth of the original's widths
trains ~2.7x faster than a quarter, which buys more steps in the demo's time; the DDPM
paper's [-1, 1] scaling, a warmed-up higher learning rate and a short EMA suit a run of
a few minutes. The model, loss and sampler are the original's.
"""

import ml_collections

from ddpm_jax.config_defaults import base_config


def get_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.model.channels = (8, 16, 32, 64, 64, 48)
  config.model.num_groups = 4
  config.model.num_heads = 2
  config.model.dropout_rate = 0.0
  config.data.range = "minus_one_one"
  config.batch_size = 32
  config.num_train_steps = 1500
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.ema_decay = 0.99
  config.log_every_steps = 25
  config.checkpoint_every_steps = 500
  return config
