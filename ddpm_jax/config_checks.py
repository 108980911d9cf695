"""Checks a config before anything runs, with one-line messages that say how to fix it."""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ddpm_jax.data import DATA_RANGES, SOURCES
from ddpm_jax.diffusion import LOSS_WEIGHTINGS, OBJECTIVES
from ddpm_jax.errors import UserError
from ddpm_jax.schedule import SCHEDULE_KINDS

# Keys whose change makes a checkpoint's arrays or meaning incompatible (``objective`` is
# what the output means, ``schedule`` the process it was trained to reverse).
ARCHITECTURE_KEYS = ("model", "schedule", "objective", "data.image_size", "data.channels")
# Keys under ARCHITECTURE_KEYS that a run can resume with another value of: they change
# how the same arrays compute (compute dtype, dropout in training), not the arrays.
RESUMABLE_MODEL_KEYS = ("model.dtype", "model.dropout_rate")
NAN_POLICIES = ("stop", "skip")
DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "cosine")
# Keys added after runs were first saved, and the value a saved config without them means
# (the original's): a run saved before them resumes, samples and converts as it did.
STORED_DEFAULTS = {"schedule.kind": "linear", "objective": "eps", "loss_weighting": "none",
                   "min_snr_gamma": 5.0, "ema_warmup": False, "model.num_classes": 0,
                   "label_dropout": 0.1}


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


def validate_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises :class:`UserError` for a config the model or the loop cannot run."""
  m = config.model
  channels = tuple(m.channels)
  n = len(channels)
  _require(all(isinstance(c, int) and not isinstance(c, bool) for c in channels),
           "model.channels must be whole numbers, e.g. "
           f"--config.model.channels='(16,32,64,128,128,96)'; got {channels}")
  _require(n >= 2 and n % 2 == 0, f"model.channels needs an even number (>= 2) of entries, "
           f"one per UNet layer; got {n}")
  _require(len(m.attentions) == n and len(m.upscales) == n,
           f"model.attentions ({len(m.attentions)}) and model.upscales ({len(m.upscales)}) "
           f"need one entry per model.channels entry ({n})")
  _require(all(c > 0 for c in channels), f"model.channels must be positive, got {channels}")
  _require(tuple(m.upscales) == (False,) * (n // 2) + (True,) * (n // 2),
           "model.upscales must be False for the first half of the layers and True for the "
           f"second (the original's encoder/decoder); got {tuple(m.upscales)}")
  # The original's wiring: each down layer doubles the width; each up layer's input is the
  # previous up layer's output (C // 2) concatenated with the matching skip.
  half = n // 2
  for i in range(1, half):
    _require(channels[i] == 2 * channels[i - 1],
             f"model.channels[{i}] must be 2 x model.channels[{i - 1}] = {2 * channels[i - 1]} "
             f"(each down-sampling conv doubles the width); got {channels}")
  _require(channels[half] == 2 * channels[half - 1],
           f"model.channels[{half}] must be {2 * channels[half - 1]}; got {channels}")
  for i in range(half + 1, n):
    want = channels[i - 1] // 2 + channels[n - i]
    _require(channels[i] == want,
             f"model.channels[{i}] must be model.channels[{i - 1}] // 2 + "
             f"model.channels[{n - i}] = {want}; got {channels}")
  _require(m.num_groups > 0 and m.num_heads > 0, "model.num_groups and model.num_heads must "
           f"be > 0; got {m.num_groups} and {m.num_heads}")
  for i, c in enumerate(channels):
    _require(c % m.num_groups == 0,
             f"model.channels[{i}] = {c} is not divisible by model.num_groups = {m.num_groups}; "
             "pick a group count that divides every width")
    if m.attentions[i]:
      _require(c % m.num_heads == 0,
               f"model.num_heads = {m.num_heads} does not divide the attention width "
               f"model.channels[{i}] = {c}")
    if m.upscales[i]:
      _require(c % 2 == 0, f"model.channels[{i}] = {c} must be even to up-sample to {c // 2}")
  _require(0.0 <= m.dropout_rate < 1.0,
           f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
  _require(m.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}; got {m.dtype!r}")
  _require(m.time_steps == config.schedule.num_steps,
           f"model.time_steps ({m.time_steps}) must equal schedule.num_steps "
           f"({config.schedule.num_steps})")
  _require(m.out_channels == config.data.channels,
           f"model.out_channels ({m.out_channels}) must equal data.channels "
           f"({config.data.channels}): the model predicts the noise of the image")
  _require(config.schedule.num_steps >= 2, "schedule.num_steps must be >= 2")
  kind = config.schedule.get("kind", "linear")
  _require(kind in SCHEDULE_KINDS,
           f"schedule.kind must be one of {', '.join(SCHEDULE_KINDS)}; got {kind!r}")
  if kind == "linear":
    _require(0.0 < config.schedule.beta_start <= config.schedule.beta_end < 1.0,
             "need 0 < schedule.beta_start <= schedule.beta_end < 1")
  objective = config.get("objective", "eps")
  _require(objective in OBJECTIVES,
           f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
  weighting = config.get("loss_weighting", "none")
  _require(weighting in LOSS_WEIGHTINGS,
           f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}; got {weighting!r}")
  gamma = config.get("min_snr_gamma", 5.0)
  _require(not isinstance(gamma, bool) and isinstance(gamma, (int, float))
           and math.isfinite(gamma) and gamma > 0,
           f"min_snr_gamma must be a finite number > 0, got {gamma}")
  num_classes = m.get("num_classes", 0)
  _require(isinstance(num_classes, int) and not isinstance(num_classes, bool)
           and num_classes >= 0,
           f"model.num_classes must be a whole number >= 0 (0 = unconditional), got "
           f"{num_classes!r}")
  label_dropout = config.get("label_dropout", 0.1)
  _require(not isinstance(label_dropout, bool) and isinstance(label_dropout, (int, float))
           and 0.0 <= label_dropout < 1.0,
           f"label_dropout must be in [0, 1), got {label_dropout!r}")
  _require(num_classes == 0 or not config.get("init_torch_checkpoint", ""),
           f"init_torch_checkpoint starts an unconditional run: the original's UNET has no "
           f"class input; set --config.model.num_classes=0 (got {num_classes})")
  ema_warmup = config.get("ema_warmup", False)
  _require(isinstance(ema_warmup, bool),
           f"ema_warmup must be True or False, got {ema_warmup!r}")

  size = config.data.image_size
  factor = 2 ** half
  _require(size > 0 and size % factor == 0,
           f"data.image_size = {size} must be divisible by 2^{half} = {factor} (the UNet "
           f"down-samples {half} times)")
  _require(config.data.source in SOURCES,
           f"data.source must be one of {', '.join(SOURCES)}; got {config.data.source!r}")
  _require(config.data.range in DATA_RANGES,
           f"data.range must be one of {', '.join(DATA_RANGES)}; got {config.data.range!r}")

  _require(0 <= config.seed < 2**32, f"seed must be in 0..{2**32 - 1} (JAX keeps 32 bits of it), "
           f"got {config.seed}")
  _require(config.batch_size > 0, f"batch_size must be positive, got {config.batch_size}")
  _require(config.batch_size % num_devices == 0,
           f"batch_size {config.batch_size} is not divisible by the {num_devices} devices; "
           f"use a multiple of {num_devices}")
  _require(math.isfinite(config.learning_rate) and config.learning_rate > 0,
           f"learning_rate must be a finite number > 0, got {config.learning_rate}")
  _require(0.0 <= config.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {config.ema_decay}")
  _require(config.num_train_steps > 0 or config.num_epochs > 0,
           "set num_train_steps > 0 or num_epochs > 0")
  for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _require(config[key] > 0, f"{key} must be > 0, got {config[key]}")
  _require(config.warmup_steps >= 0, f"warmup_steps must be >= 0, got {config.warmup_steps}")
  _require(math.isfinite(config.grad_clip_norm) and config.grad_clip_norm >= 0,
           f"grad_clip_norm must be a finite number >= 0 (0 = no clipping), got "
           f"{config.grad_clip_norm}")
  _require(config.lr_schedule in LR_SCHEDULES,
           f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {config.lr_schedule!r}")
  _require(config.lr_schedule != "cosine" or config.num_train_steps > config.warmup_steps,
           "lr_schedule=cosine decays to 0 at num_train_steps: set num_train_steps above "
           f"warmup_steps ({config.warmup_steps}), got {config.num_train_steps}")
  _require(config.sample_every_steps >= 0,
           f"sample_every_steps must be >= 0 (0 = no samples), got {config.sample_every_steps}")
  _require(config.sample_num_images > 0,
           f"sample_num_images must be > 0, got {config.sample_num_images}")
  _require(1 <= config.sample_num_steps <= config.schedule.num_steps,
           f"sample_num_steps (DDIM steps) must be in 1..{config.schedule.num_steps}, "
           f"got {config.sample_num_steps}")
  _require(config.get("autoguide_step", 0) >= 0,
           f"autoguide_step must be a step >= 0 (0 = no autoguidance), got "
           f"{config.get('autoguide_step', 0)}")
  scale = config.get("autoguide_scale", 1.0)
  _require(math.isfinite(scale) and scale >= 0,
           f"autoguide_scale must be a finite number >= 0, got {scale}")
  _require(config.get("autoguide_min_t", 0) >= 0,
           f"autoguide_min_t must be a step >= 0, got {config.get('autoguide_min_t', 0)}")
  _require(config.profile_steps >= 0,
           f"profile_steps must be >= 0 (0 = no profile), got {config.profile_steps}")
  _require(config.get("steps_per_call", 0) >= 0,
           "steps_per_call must be >= 0 (0 = the platform's default), got "
           f"{config.get('steps_per_call', 0)}")
  _require(config.nan_policy in NAN_POLICIES,
           f"nan_policy must be one of {', '.join(NAN_POLICIES)}; got {config.nan_policy!r}")


def check_overrides_given_once(argv: list[str]) -> None:
  """Refuses a ``--config.KEY`` given twice: ml_collections would append a tuple key's two
  values into one longer tuple (and keep the last of any other), never what was meant."""
  seen = set()
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key in seen:
      raise UserError(f"--config.{key} is given more than once; give it once (a tuple's "
                      "values would be joined into one longer tuple)")
    seen.add(key)


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
  """``{'model.channels': [...], ...}``: a config's leaves by dotted key, sequences as lists."""
  out = {}
  for k, v in dict(d).items():
    key = f"{prefix}{k}"
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flatten_config(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, (list, tuple)) else v
  return out


def check_resume_compatible(saved: ml_collections.ConfigDict,
                            config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir with a config whose architecture, schedule, objective or
  data shape differs.

  The optimizer's settings (clipping, warm-up, rate schedule), ``model.dtype``,
  ``model.dropout_rate``, ``loss_weighting``, ``min_snr_gamma``, ``ema_warmup`` and
  ``label_dropout`` may change: the checkpoint's arrays fit the new config and mean the
  same (``model.num_classes`` may not: it adds the class embedding). A key of
  :data:`STORED_DEFAULTS` missing from either config has its default.
  """
  old = {**STORED_DEFAULTS, **flatten_config(saved.to_dict())}
  new = {**STORED_DEFAULTS, **flatten_config(config.to_dict())}
  differing = [k for k in sorted(set(old) | set(new))
               if any(k == a or k.startswith(a + ".") for a in ARCHITECTURE_KEYS)
               and k not in RESUMABLE_MODEL_KEYS and old.get(k) != new.get(k)]
  if differing:
    fixes = " ".join(f"--config.{k}={_flag_value(old.get(k))}" for k in differing)
    raise UserError(f"the workdir was trained with a different {', '.join(differing)}; "
                    f"nothing was changed. Use another --workdir, or resume with {fixes}")


def _flag_value(v: Any) -> str:
  if isinstance(v, list):
    return "'(" + ",".join(str(x) for x in v) + (",)'" if len(v) == 1 else ")'")
  return str(v)
