"""The full set of config keys, with the original tutorial's values (``configs/mnist.py``).

Config files in ``configs/`` start from :func:`base_config` and override what differs.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every key the training and sampling code reads, at the original tutorial's values."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.source = "bundled"  # 'bundled' | 'idx' | 'tfds'
  config.data.name = "mnist"  # the TFDS name when source == 'tfds'
  config.data.dir = ""  # IDX directory, or the TFDS data_dir ('' = TFDS default)
  config.data.image_size = 32  # 28x28 digits zero-padded by 2, as the original
  config.data.channels = 1
  config.data.range = "zero_one"  # the original's ToTensor() scaling; or 'minus_one_one'

  config.model = ml_collections.ConfigDict()
  config.model.channels = (64, 128, 256, 512, 512, 384)
  config.model.attentions = (False, True, False, False, False, True)
  config.model.upscales = (False, False, False, True, True, True)
  config.model.num_groups = 32
  config.model.dropout_rate = 0.1
  config.model.num_heads = 8
  config.model.out_channels = 1
  config.model.time_steps = 1000
  config.model.dtype = "float32"  # compute dtype; params stay float32
  # 0: unconditional (the original). N > 0: a class-conditional UNet for labels 0..N-1 (a
  # learned class embedding added to the time embedding), trained for classifier-free
  # guidance and sampled with `ddpm_jax.sample --labels/--digit --guidance_scale`.
  config.model.num_classes = 0

  config.schedule = ml_collections.ConfigDict()
  # 'linear' (the original's: betas from beta_start to beta_end), 'cosine' (Nichol &
  # Dhariwal 2021) or 'sigmoid' (Chen 2023); the last two ignore beta_start and beta_end.
  config.schedule.kind = "linear"
  config.schedule.num_steps = 1000
  config.schedule.beta_start = 1e-4
  config.schedule.beta_end = 0.02

  # What the model predicts: 'eps' the noise (the original), 'x0' the clean image, or 'v'
  # = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022). Fixed for a run: its samplers
  # read the model's output as this.
  config.objective = "eps"
  # 'none' (the original: plain MSE on the objective's target) or 'min_snr': Min-SNR-gamma
  # (Hang et al. 2023), each example's MSE weighted as the x0 MSE times
  # min(snr, min_snr_gamma), snr = a / (1 - a). Only the training changes.
  config.loss_weighting = "none"
  config.min_snr_gamma = 5.0
  # With model.num_classes > 0: the fraction of training labels replaced by "no class", so
  # that one network learns the conditional and the unconditional model that classifier-free
  # guidance mixes. Unused by an unconditional run.
  config.label_dropout = 0.1

  config.batch_size = 64
  config.num_epochs = 75
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.learning_rate = 2e-5
  config.warmup_steps = 0
  # 'constant' (the original) or 'cosine': after the warm-up, a cosine decay of the rate
  # to 0 at num_train_steps (which must then be set).
  config.lr_schedule = "constant"
  config.grad_clip_norm = 0.0  # 0 = no clipping, as the original
  config.ema_decay = 0.9999
  # True: the EMA's decay at step t is min(ema_decay, (1 + t) / (10 + t)), so that early
  # EMA weights follow the model instead of its random init; False is the original's
  # constant decay.
  config.ema_warmup = False

  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.nan_policy = "stop"  # 'stop' or 'skip' a step whose loss is not finite
  # A checkpoint of the original PyTorch code ({'weights', 'optimizer', 'ema'}) to start
  # from when the workdir has no checkpoint yet: its weights, EMA, Adam state and step.
  config.init_torch_checkpoint = ""

  # A grid of EMA samples written to DIR/samples/step_<step>.png every so many steps
  # (0 = never): deterministic DDIM from the same noise each time, so successive grids
  # show the same digits sharpening.
  config.sample_every_steps = 0
  config.sample_num_images = 16
  config.sample_num_steps = 50  # DDIM steps, at most schedule.num_steps

  # Autoguidance (Karras et al. 2024) when `ddpm_jax.sample` samples this run without
  # --autoguide_step or --no_autoguide: the run's weights at the earlier step
  # autoguide_step (0 = none, the original) guide the sampled ones, each update at a step
  # t >= autoguide_min_t reading out_N + autoguide_scale (out - out_N). The step must be
  # one the run keeps (checkpoint_every_steps, keep_checkpoints); where the workdir does
  # not keep it, or the sampled step is not later, the run samples unguided and says so.
  # Scale and min_t are also the defaults of an explicit --autoguide_step.
  config.autoguide_step = 0
  config.autoguide_scale = 5.0
  config.autoguide_min_t = 100

  # > 0: trace that many steps with jax.profiler once the run's first 5 are done, into
  # DIR/profile/ (for Perfetto or TensorBoard), and print their op time by phase, UNet
  # layer and op (also in DIR/profile/summary.json).
  config.profile_steps = 0

  # Steps per call of the compiled training loop (a lax.scan over k steps): Python's
  # dispatch and the host's kernel launches are paid once per k. 0 = the platform's
  # default (train.DEFAULT_STEPS_PER_CALL); a CPU runs one step a call (train.runs_in_scan).
  # Every k trains the same numbers.
  config.steps_per_call = 0
  return config
