"""Samples digits from a training run or from a checkpoint of the PyTorch original.

  python -m ddpm_jax.sample (--workdir DIR | --torch_checkpoint FILE) --num_samples N
      --sampler {ddpm,ddim,dpmpp2m} --num_steps K --seed S --out FILE.png [--npz FILE.npz]
      [--reverse_strip FILE.png] [--use_ema | --no_use_ema] [--eta E] [--spacing S]
      [--clip_denoised | --no_clip_denoised]
      [--batch_size B] [--overwrite] [--num_groups G --num_heads H --data_range R]
      [--labels L0,L1,... | --digit D] [--guidance_scale W]
      [--autoguide_step N] [--autoguide_scale W] [--autoguide_min_t T] [--no_autoguide]

Samplers: ``ddpm`` the original's 1000-step ancestral sampler; ``ddim`` DDIM over K steps,
by default ``--eta 1`` (DDPM's posterior noise at each of the K steps) with each predicted
x0 clipped to the data range (``--no_clip_denoised`` to keep it), the settings that scored
best on the CPU demo (RESULTS.md; ``--eta 0 --no_clip_denoised`` is the deterministic DDIM
of the paper); ``dpmpp2m`` DPM-Solver++(2M), deterministic, K model evaluations at steps
evenly spaced in log-SNR (``--spacing logsnr``, the default) or in t (``--spacing time``),
x0 not clipped unless ``--clip_denoised``.

Weights: ``--workdir`` reads a ``ddpm_jax.train`` run (its config gives the architecture,
the schedule, what the model predicts (``objective``) and the data range; a config from
before ``objective`` and ``schedule.kind`` existed means eps and linear);
``--torch_checkpoint`` reads the original's ``{'weights', 'optimizer', 'ema'}`` file, whose
shapes give the architecture except ``num_groups`` and ``num_heads`` (flags, the original's
32 and 8 by default), with the original's linear schedule and noise prediction, 32x32
images and data in [0, 1] (``--data_range minus_one_one`` for a converted run of a [-1, 1]
config). EMA weights unless ``--no_use_ema``.

Classes: a run trained with ``model.num_classes > 0`` draws chosen classes: ``--digit D``
gives every image the label D, ``--labels 0,1,...`` gives image ``i`` the label
``labels[i % len(labels)]``; ``--guidance_scale W`` is classifier-free guidance's
``out_uncond + W (out_cond - out_uncond)`` (1, the default, the plain conditional model;
0 the unconditional one; above 1 more typical digits, less varied). Without them such a
run samples its unconditional ("no class") model.

Autoguidance (Karras et al. 2024, any ``--workdir`` run): ``--autoguide_step N`` makes the
run's own weights at the earlier step ``N`` (EMA unless ``--no_use_ema``) guide the sampled
ones, each update at a step ``t >= T`` (``--autoguide_min_t``) reading
``out_N + W (out - out_N)``, ``W = --autoguide_scale``, and the later steps the model's own
output. The earlier, weaker network errs where the later one has learned; pushing away
from it drew more confident digits on the CPU demo (RESULTS.md). It costs a second forward
pass per update. Each setting not given is the run config's (``autoguide_step``, 0 for
none, and ``autoguide_scale`` / ``autoguide_min_t``), else :data:`DEFAULT_AUTOGUIDE_SCALE`
and :data:`DEFAULT_AUTOGUIDE_MIN_T`: a run of ``configs/mnist_tiny.py`` is autoguided by
its step 1500 unless ``--no_autoguide``. Where the workdir no longer keeps the config's
step, or the sampled step is not later, it samples unguided and its summary line says so.

Sample ``i``'s noise (its starting point and every step's) depends only on ``--seed`` and
``i`` (its key is ``fold_in(key(seed), i)``), so the same command gives the same images bit
for bit. Another ``--batch_size`` (the default is ``min(N, 64)``, so also another N below
64) computes the same noise in other batch shapes, whose float rounding differs: close
images from a trained model, visibly different ones from an undertrained one. Batches are
always full (the last one is padded with extra samples, then cut), so one compilation
serves them all. On a CPU each batch is split over one JAX device per core (as many as
divide the batch, as ``train`` does; XLA's CPU convolutions hardly use a second core), which
is another batch shape too: set ``XLA_FLAGS=--xla_force_host_platform_device_count=1`` to
compare images with another host's bit for bit.

Outputs: ``--out`` a grid PNG, ``--npz`` the raw float32 images ``[N, H, W, C]`` (not
clipped, not rescaled) with ``seed``, ``data_range``, ``sampler``, ``num_steps`` (and
``eta`` for DDIM, ``spacing`` for DPM-Solver++, ``clip_denoised`` for both),
``--reverse_strip`` the original's 10-frame reverse-process strip of the first 8 samples,
one row each. With classes the npz also holds ``labels`` (int32 ``[N]``, image ``i``'s
requested class, in sample order) and ``guidance_scale``; with autoguidance,
``autoguide_step``, ``autoguide_scale`` and ``autoguide_min_t``. With classes the grid
shows the images sorted by label, each label starting a new row of at most
``ceil(sqrt(N))`` columns (gaps grey): ``--labels 0,1,...,9 --num_samples 100`` is a 10x10
grid, row ``d`` the digit d. Existing files are kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from ddpm_jax import checkpoint, cli, diffusion, files, images, sampling
from ddpm_jax.config_defaults import base_config
from ddpm_jax.convert import infer_architecture, load_torch_checkpoint
from ddpm_jax.data import DATA_BOUNDS, DATA_RANGES
from ddpm_jax.errors import ArgumentParser, UserError, run_cli
from ddpm_jax.model import UNet, build_unet
from ddpm_jax.schedule import SCHEDULE_KINDS, Schedule, build_schedule, linear_schedule

DEFAULT_BATCH_SIZE = 64
DEFAULT_DDIM_STEPS = 50
# DPM-Solver++(2M)'s authors report converged samples in 15-20 model evaluations.
DEFAULT_DPMPP2M_STEPS = 20
DEFAULT_SPACING = sampling.DEFAULT_SPACING
# DDIM's defaults: stochastic (eta 1) with x0 clipped, the best of the settings measured on
# the CPU demo (RESULTS.md, "Samplers"); deterministic DDIM scored ~15 points lower there.
DEFAULT_DDIM_ETA = 1.0
DEFAULT_CLIP_DENOISED = {"ddpm": False, "ddim": True, "dpmpp2m": False}
STRIP_ROWS = 8
# Classifier-free guidance's default: the plain conditional model.
DEFAULT_GUIDANCE_SCALE = 1.0
# Autoguidance's weight and the lowest step whose update is guided (the last updates, at
# smaller t, read the model alone), for a run whose config does not set them: the base
# config's, the best measured on the CPU demo (RESULTS.md, "Autoguidance").
DEFAULT_AUTOGUIDE_SCALE = float(base_config().autoguide_scale)
DEFAULT_AUTOGUIDE_MIN_T = int(base_config().autoguide_min_t)
MAX_SEED = 2**32 - 1  # jax.random.key folds larger seeds onto these.


@dataclasses.dataclass(frozen=True)
class Sampleable:
  """What sampling needs from a run or a checkpoint."""
  model: UNet
  params: Any
  schedule: Schedule
  data_range: str
  image_shape: tuple[int, int, int]
  objective: str = "eps"  # What the model predicts: 'eps' (the original's), 'x0' or 'v'.
  num_classes: int = 0  # > 0: a class-conditional model of labels 0..num_classes - 1.
  # Autoguidance's guide: the weights of an earlier step of the same run, or None.
  guide_params: Any = None
  guide_step: int | None = None
  # Why the run's config asked for a guide that this sampling goes without, or "".
  guide_note: str = ""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = ArgumentParser(prog="python -m ddpm_jax.sample",
                           description="Samples images with DDPM, DDIM or DPM-Solver++(2M).")
  source = parser.add_argument_group("weights (exactly one)")
  source.add_argument("--workdir", help="a ddpm_jax.train workdir")
  source.add_argument("--torch_checkpoint", help="a checkpoint file of the PyTorch original")
  parser.add_argument("--step", type=int, default=None,
                      help="--workdir only: the checkpoint of this step (default: the newest)")
  parser.add_argument("--num_samples", type=int, default=16)
  parser.add_argument("--sampler", choices=sampling.SAMPLERS, default="ddpm")
  parser.add_argument("--num_steps", type=int, default=None,
                      help=f"ddpm: T (the default); ddim: 1..T (default {DEFAULT_DDIM_STEPS}); "
                      f"dpmpp2m: 1..T (default {DEFAULT_DPMPP2M_STEPS})")
  parser.add_argument("--eta", type=float, default=None,
                      help="ddim only: 0 deterministic .. 1 DDPM's posterior variance "
                      f"(default {DEFAULT_DDIM_ETA:g})")
  parser.add_argument("--spacing", choices=sampling.SPACINGS, default=None,
                      help=f"dpmpp2m only: steps evenly spaced in log-SNR or in t (default "
                      f"{DEFAULT_SPACING})")
  clip = parser.add_mutually_exclusive_group()
  clip.add_argument("--clip_denoised", dest="clip_denoised", action="store_true", default=None,
                    help="ddim and dpmpp2m only: clip each predicted x0 to the data range "
                    "(default: on for ddim, off for dpmpp2m; helps undertrained models)")
  clip.add_argument("--no_clip_denoised", dest="clip_denoised", action="store_false",
                    help="ddim and dpmpp2m only: keep each predicted x0 as the model gives it")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=None,
                      help=f"images per jitted call (default min(N, {DEFAULT_BATCH_SIZE}))")
  parser.add_argument("--out", required=True, help="grid PNG")
  parser.add_argument("--npz", help="raw images and sampling settings")
  parser.add_argument("--reverse_strip", help=f"reverse-process PNG of the first {STRIP_ROWS}")
  ema = parser.add_mutually_exclusive_group()
  ema.add_argument("--use_ema", dest="use_ema", action="store_true", default=True,
                   help="sample with the EMA weights (the default)")
  ema.add_argument("--no_use_ema", dest="use_ema", action="store_false",
                   help="sample with the raw weights")
  parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  parser.add_argument("--num_groups", type=int, default=None,
                      help="--torch_checkpoint only: GroupNorm groups (default 32)")
  parser.add_argument("--num_heads", type=int, default=None,
                      help="--torch_checkpoint only: attention heads (default 8)")
  parser.add_argument("--data_range", choices=DATA_RANGES, default=None,
                      help="--torch_checkpoint only: the range of the data the model learned "
                      "(default zero_one, the original's; minus_one_one for a converted run "
                      "of such a config)")
  classes = parser.add_argument_group("classes (a run trained with model.num_classes > 0)")
  classes.add_argument("--labels", default=None,
                       help="comma-separated class labels, one per image, cycled: image i "
                       "gets labels[i %% len(labels)], e.g. 0,1,2,3,4,5,6,7,8,9")
  classes.add_argument("--digit", type=int, default=None, help="one label for every image")
  classes.add_argument("--guidance_scale", type=float, default=None,
                       help="classifier-free guidance w: out_uncond + w (out_cond - "
                       f"out_uncond); default {DEFAULT_GUIDANCE_SCALE:g}, the conditional "
                       "model; 0 is the unconditional one")
  guide = parser.add_argument_group(
      "autoguidance (--workdir runs; defaults: the run config's autoguide_* keys)")
  guide.add_argument("--autoguide_step", type=int, default=None, metavar="N",
                     help="guide the sampled weights with the run's weights at this earlier "
                     "step: out_N + W (out - out_N) (default: the config's autoguide_step; "
                     "configs/mnist_tiny.py 1500, 0 is none)")
  guide.add_argument("--autoguide_scale", type=float, default=None, metavar="W",
                     help="autoguidance's W (default: the config's autoguide_scale, else "
                     f"{DEFAULT_AUTOGUIDE_SCALE:g}; 1 is no guidance)")
  guide.add_argument("--autoguide_min_t", type=int, default=None, metavar="T",
                     help="guide only the updates at steps t >= T, the noisier ones (default: "
                     f"the config's autoguide_min_t, else {DEFAULT_AUTOGUIDE_MIN_T}; 0 guides "
                     "every update)")
  guide.add_argument("--no_autoguide", action="store_true",
                     help="sample without the autoguidance the run's config asks for")
  return parser.parse_args(argv)


def _check_weight(flag: str, value: float) -> None:
  """A guidance weight (``--guidance_scale``, ``--autoguide_scale``): finite and >= 0."""
  if not (math.isfinite(value) and value >= 0):
    raise UserError(f"--{flag} must be a finite number >= 0, got {value}")


def _check_args(args: argparse.Namespace) -> None:
  """Checks what does not need the weights."""
  if (args.workdir is None) == (args.torch_checkpoint is None):
    raise UserError("give exactly one of --workdir DIR and --torch_checkpoint FILE")
  if args.num_samples <= 0:
    raise UserError(f"--num_samples must be positive, got {args.num_samples}")
  if args.batch_size is not None and args.batch_size <= 0:
    raise UserError(f"--batch_size must be positive, got {args.batch_size}")
  if not 0 <= args.seed <= MAX_SEED:
    raise UserError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
  if args.eta is not None:
    if args.sampler != "ddim":
      raise UserError("--eta applies only to --sampler ddim")
    if not 0.0 <= args.eta <= 1.0:
      raise UserError(f"--eta must be in [0, 1], got {args.eta}")
  if args.spacing is not None and args.sampler != "dpmpp2m":
    raise UserError("--spacing applies only to --sampler dpmpp2m")
  if args.clip_denoised is not None and args.sampler == "ddpm":
    raise UserError("--clip_denoised and --no_clip_denoised apply only to --sampler ddim "
                    "and dpmpp2m")
  if args.step is not None and args.workdir is None:
    raise UserError("--step applies only to --workdir (a torch checkpoint holds one step)")
  if args.workdir is not None and (args.num_groups is not None or args.num_heads is not None
                                   or args.data_range is not None):
    raise UserError("--num_groups, --num_heads and --data_range apply only to "
                    "--torch_checkpoint (a workdir's config has them)")
  for flag in ("num_groups", "num_heads"):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      raise UserError(f"--{flag} must be positive, got {value}")
  if args.labels is not None and args.digit is not None:
    raise UserError("give at most one of --labels and --digit")
  wants_classes = args.labels is not None or args.digit is not None
  if args.guidance_scale is not None:
    if not wants_classes:
      raise UserError("--guidance_scale applies only with --labels or --digit")
    _check_weight("guidance_scale", args.guidance_scale)
  if wants_classes and args.torch_checkpoint is not None:
    raise UserError("--labels and --digit need a class-conditional run; the original's "
                    "checkpoint (--torch_checkpoint) has no class input")
  given = [f"--{flag}" for flag in ("autoguide_step", "autoguide_scale", "autoguide_min_t")
           if getattr(args, flag) is not None]
  if args.no_autoguide and given:
    raise UserError(f"--no_autoguide samples without autoguidance: drop {' and '.join(given)}")
  if given and args.workdir is None:
    raise UserError(f"{given[0]} applies only to --workdir (autoguidance's guide is an "
                    "earlier checkpoint of the run)")
  if args.autoguide_scale is not None:
    _check_weight("autoguide_scale", args.autoguide_scale)
  if args.autoguide_step is not None:
    if args.autoguide_step < 0:
      raise UserError(f"--autoguide_step must be a step >= 0, got {args.autoguide_step}")
  if args.autoguide_min_t is not None and args.autoguide_min_t < 0:
    raise UserError(f"--autoguide_min_t must be a step >= 0, got {args.autoguide_min_t}")


@dataclasses.dataclass(frozen=True)
class Autoguidance:
  """The guide's step (None: no guide), W and T, whether the step is the run config's
  default rather than ``--autoguide_step``, and why the config's guide is not used."""
  step: int | None
  scale: float
  min_t: int
  from_config: bool = False
  note: str = ""


def _autoguidance(args: argparse.Namespace, run_config: Mapping[str, Any] | None
                  ) -> Autoguidance:
  """Autoguidance's settings: each flag given, else the run config's ``autoguide_*`` key
  (the step unless ``--no_autoguide``), else the defaults. ``run_config`` is the workdir's
  config (None without one), so that a T beyond its schedule is refused (given as a flag
  or with ``--autoguide_step``) or noted (the config's own guide: sampled unguided) before
  any weights load."""
  config = {} if run_config is None or args.no_autoguide else run_config
  step, from_config = args.autoguide_step, False
  if step is None and config.get("autoguide_step", 0) > 0:
    step, from_config = int(config["autoguide_step"]), True
  if step is None:
    for flag in ("autoguide_scale", "autoguide_min_t"):
      if getattr(args, flag) is not None:
        raise UserError(f"--{flag} applies only with --autoguide_step N, or to a run whose "
                        "config sets autoguide_step")
  pick = lambda flag, default: next(v for v in (getattr(args, flag), config.get(flag), default)
                                    if v is not None)
  scale = float(pick("autoguide_scale", DEFAULT_AUTOGUIDE_SCALE))
  min_t = int(pick("autoguide_min_t", DEFAULT_AUTOGUIDE_MIN_T))
  num_steps = config.get("schedule", {}).get("num_steps")
  if step is not None and num_steps is not None and min_t >= num_steps:
    if not from_config or args.autoguide_min_t is not None:
      raise UserError(f"--autoguide_min_t must be below the schedule's {num_steps} steps "
                      f"(0..{num_steps - 1}), got {min_t}: no update would be guided")
    # Only the config asked for it: sampled unguided, as its other unusable defaults are.
    return Autoguidance(None, scale, min_t, from_config, note=(
        f"not autoguided: the config's autoguide_min_t {min_t} is beyond the schedule's "
        f"{num_steps} steps"))
  return Autoguidance(step, scale, min_t, from_config)


def requested_labels(args: argparse.Namespace) -> list[int] | None:
  """The labels ``--labels`` or ``--digit`` ask for (before cycling), or None."""
  if args.digit is not None:
    return [args.digit]
  if args.labels is None:
    return None
  try:
    labels = [int(x) for x in args.labels.split(",")]
  except ValueError:
    raise UserError(f"--labels takes comma-separated whole numbers, e.g. --labels 0,1,2; "
                    f"got {args.labels!r}") from None
  return labels


def check_labels(labels: Sequence[int], num_classes: int, source: str) -> None:
  """Refuses labels for an unconditional model, or outside ``0..num_classes - 1``."""
  if num_classes == 0:
    raise UserError(f"--labels and --digit need a class-conditional run; {source} is "
                    "unconditional (model.num_classes = 0)")
  bad = sorted({l for l in labels if not 0 <= l < num_classes})
  if bad:
    raise UserError(f"labels must be in 0..{num_classes - 1} (model.num_classes = "
                    f"{num_classes}), got {', '.join(map(str, bad))}")


def cycled_labels(labels: Sequence[int], count: int) -> np.ndarray:
  """int32 ``[count]``: image ``i``'s label ``labels[i % len(labels)]``."""
  return np.resize(np.asarray(labels, np.int32), count)


def save_label_grid(path, samples: np.ndarray, labels: np.ndarray, data_range: str) -> None:
  """A grid PNG of ``samples`` sorted by ``labels`` (stable), each label starting a new row
  of at most ``ceil(sqrt(N))`` columns, the gaps grey; one label: :func:`images.save_grid`.

  So ten labels with ten images each give ten rows of ten, row ``k`` the k-th smallest label.
  """
  classes, counts = np.unique(labels, return_counts=True)
  if len(classes) < 2:
    images.save_grid(path, samples, data_range)
    return
  cols = min(int(counts.max()), math.ceil(math.sqrt(len(samples))))
  pixels = images.to_uint8(samples, data_range)
  gap = np.full(pixels.shape[1:], images.PAD_VALUE, np.uint8)
  tiles = []
  for c in classes:
    members = [pixels[i] for i in np.flatnonzero(labels == c)]
    tiles += members + [gap] * (-len(members) % cols)
  grid = images.tile(np.stack(tiles), cols)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")


def _load_workdir(workdir: str, use_ema: bool, step: int | None = None,
                  guide_step: int | None = None, guide_from_config: bool = False
                  ) -> Sampleable:
  """The run's weights at ``step`` (default: its newest checkpoint), with those at the
  earlier ``guide_step`` as autoguidance's guide when it is given.

  A ``guide_step`` the user asked for must be kept and below ``step``; one that is the
  run config's default is skipped, with a ``guide_note`` saying why, where it is not.
  """
  config, step, state = checkpoint.load_run_state(workdir, step=step)
  if config.data.range not in DATA_RANGES:
    raise UserError(f"{workdir}: config data.range must be one of {', '.join(DATA_RANGES)}, "
                    f"got {config.data.range!r}")
  # A config written before these keys existed: the original's noise prediction and
  # linear schedule.
  objective = config.get("objective", "eps")
  if objective not in diffusion.OBJECTIVES:
    raise UserError(f"{workdir}: config objective must be one of "
                    f"{', '.join(diffusion.OBJECTIVES)}, got {objective!r}")
  kind = config.schedule.get("kind", "linear")
  if kind not in SCHEDULE_KINDS:
    raise UserError(f"{workdir}: config schedule.kind must be one of "
                    f"{', '.join(SCHEDULE_KINDS)}, got {kind!r}")
  # The guide's weights are read only once the run's config is known to be usable.
  guide_params, guide_note = None, ""
  if guide_from_config and guide_step is not None:
    kept = checkpoint.kept_steps(workdir)
    if guide_step >= step or guide_step not in kept:
      why = (f"not below the sampled step {step}" if guide_step >= step else
             f"not kept (its steps: {', '.join(map(str, kept))})")
      guide_step, guide_note = None, (f"not autoguided: the config's autoguide_step "
                                      f"{guide_step} is {why}")
  if guide_step is not None:
    if guide_step >= step:
      raise UserError(f"--autoguide_step must be below the sampled step {step}, got "
                      f"{guide_step}: the guide is an earlier, weaker version of the model")
    guide = checkpoint.load_run_state(workdir, step=guide_step)[2]
    guide_params = guide.ema_params if use_ema else guide.params
  size, channels = config.data.image_size, config.data.channels
  return Sampleable(
      model=build_unet(config.model),
      params=state.ema_params if use_ema else state.params,
      schedule=build_schedule(**config.schedule),
      data_range=config.data.range,
      image_shape=(size, size, channels),
      objective=objective,
      num_classes=config.model.get("num_classes", 0),
      guide_params=guide_params, guide_step=guide_step, guide_note=guide_note)


def _torch_architecture(path: str) -> dict | None:
  """The ``UNet`` fields a checkpoint's shapes give, or None if it cannot be read as one.

  Reads the file memory-mapped (shapes only) where torch can. On None,
  ``load_torch_checkpoint`` reports what is wrong with the file.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  checkpoint_dict = None
  for mmap in (True, False):  # mmap needs torch.save's zip format.
    try:
      checkpoint_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
      break
    except Exception:  # pylint: disable=broad-except
      continue
  if not isinstance(checkpoint_dict, Mapping):
    return None
  state_dict = next((checkpoint_dict[k] for k in ("ema", "weights") if k in checkpoint_dict),
                    checkpoint_dict)
  if not isinstance(state_dict, Mapping):
    return None
  try:
    return infer_architecture(state_dict)
  except UserError:
    return None


def _load_torch(path: str, use_ema: bool, num_groups: int | None, num_heads: int | None,
                data_range: str | None = None) -> Sampleable:
  arch = _torch_architecture(path)
  if arch is None:
    load_torch_checkpoint(path, use_ema)  # Raises a UserError saying what is wrong.
    raise UserError(f"cannot read the architecture of {path}")
  in_channels = arch.pop("in_channels")
  model = UNet(**arch, num_groups=num_groups or UNet.num_groups,
               num_heads=num_heads or UNet.num_heads)
  for channels, attention in zip(model.channels, model.attentions):
    if channels % model.num_groups or (attention and channels % model.num_heads):
      raise UserError(f"{path}: a layer of {channels} channels does not split into "
                      f"{model.num_groups} groups (or {model.num_heads} attention heads); "
                      "give the checkpoint's --num_groups and --num_heads")
  if model.out_channels != in_channels:
    raise UserError(f"{path}: the model maps {in_channels} channel(s) to "
                    f"{model.out_channels}; a noise predictor keeps the channel count")
  # The original predicts the noise on its linear schedule.
  return Sampleable(model=model, params=load_torch_checkpoint(path, use_ema, model),
                    schedule=linear_schedule(), data_range=data_range or "zero_one",
                    image_shape=(32, 32, in_channels), objective="eps")


def _num_steps(args: argparse.Namespace, num_train_steps: int) -> int:
  if args.sampler == "ddpm":
    if args.num_steps not in (None, num_train_steps):
      raise UserError(f"--sampler ddpm runs all {num_train_steps} steps of the schedule; "
                      f"got --num_steps {args.num_steps} (use --sampler ddim or dpmpp2m for "
                      "fewer)")
    return num_train_steps
  if args.num_steps is None:
    default = DEFAULT_DDIM_STEPS if args.sampler == "ddim" else DEFAULT_DPMPP2M_STEPS
    return min(default, num_train_steps)
  if not 1 <= args.num_steps <= num_train_steps:
    raise UserError(f"--num_steps for {args.sampler} must be in 1..{num_train_steps}, "
                    f"got {args.num_steps}")
  return args.num_steps


def host_bytes_available() -> int | None:
  """Memory the OS can give this process now (Linux's MemAvailable), or None if unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def _check_host_memory(num_samples: int, image_shape: tuple[int, ...]) -> None:
  """Refuses a ``--num_samples`` whose images (float32, and the grid made of them) would
  not fit in the host's available memory, before any sampling."""
  need = 2 * num_samples * math.prod(image_shape) * 4
  available = host_bytes_available()
  if available is not None and need > available:
    raise UserError(f"--num_samples {num_samples} needs ~{need / 2**30:.1f} GiB of host memory "
                    f"for its images, more than the {available / 2**30:.1f} GiB available; "
                    "sample fewer per command (several commands with other --seed values)")


def generate(run: Sampleable, sampler: str, num_steps: int, eta: float, seed: int,
             num_samples: int, batch_size: int, strip_rows: int = 0,
             clip_denoised: bool = False, spacing: str = DEFAULT_SPACING,
             labels: Sequence[int] | None = None,
             guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
             autoguide_scale: float = DEFAULT_AUTOGUIDE_SCALE,
             autoguide_min_t: int = DEFAULT_AUTOGUIDE_MIN_T
             ) -> tuple[np.ndarray, np.ndarray, float]:
  """``(images [N, H, W, C], frames [F, strip_rows, H, W, C], first_batch_seconds)``.

  Runs full batches of ``batch_size`` under a progress bar that counts the reverse process's
  updates over all batches (each batch reports after each of up to 20 chunks of its scan,
  :func:`sampling.chunk_length`); with ``strip_rows = 0`` no frames are collected
  (``F = 0``). ``clip_denoised`` (DDIM, DPM-Solver++) clips each predicted x0 to the data
  range; ``spacing`` is DPM-Solver++'s. The model's output is read as ``run.objective``.
  ``labels`` (cycled over the images, :func:`cycled_labels`) and ``guidance_scale`` are a
  class-conditional run's classes and classifier-free guidance. A run with
  ``guide_params`` is sampled with autoguidance of weight ``autoguide_scale`` at the steps
  ``t >= autoguide_min_t`` (:class:`sampling.Autoguided`).
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  rng = jax.random.key(seed)
  times = sampling.strip_times(run.schedule.num_steps) if strip_rows else ()
  shape = (batch_size,) + run.image_shape
  apply_fn, params = run.model.apply, run.params
  if run.guide_params is not None:
    apply_fn = sampling.Autoguided(apply_fn, float(autoguide_scale), int(autoguide_min_t))
    params = (run.params, run.guide_params)
  out = np.empty((num_samples,) + run.image_shape, np.float32)
  frames = []
  first_batch_seconds = 0.0
  start_time = time.perf_counter()
  num_batches = math.ceil(num_samples / batch_size)
  # The padding images of the last batch carry on the cycle.
  all_labels = None if labels is None else cycled_labels(labels, num_batches * batch_size)
  with tqdm(total=num_batches * num_steps, unit="step",
            desc=f"{sampler}-{num_steps}, {num_batches} x {batch_size} images") as bar:
    for start in range(0, num_samples, batch_size):
      count = min(batch_size, num_samples - start)
      classes = dict(guidance_scale=guidance_scale, labels=None if all_labels is None else
                     all_labels[start:start + batch_size])
      try:
        clip_x0 = DATA_BOUNDS[run.data_range] if clip_denoised else None
        if sampler == "ddpm":
          x, f = sampling.ddpm_sample(apply_fn, params, run.schedule, rng, shape, times,
                                      first_index=start, progress=bar.update,
                                      objective=run.objective, **classes)
        elif sampler == "ddim":
          x, f = sampling.ddim_sample(apply_fn, params, run.schedule, rng, shape,
                                      num_steps, eta, times, first_index=start,
                                      clip_x0=clip_x0, progress=bar.update,
                                      objective=run.objective, **classes)
        else:
          x, f = sampling.dpmpp2m_sample(apply_fn, params, run.schedule, rng, shape,
                                         num_steps, objective=run.objective, spacing=spacing,
                                         snapshot_times=times, first_index=start,
                                         clip_x0=clip_x0, progress=bar.update, **classes)
        out[start:start + count] = np.asarray(x[:count])
        if start < strip_rows:
          frames.append(np.asarray(f[:, :min(count, strip_rows - start)]))
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"a batch of {batch_size} images does not fit in the device's memory "
                        f"({reason}); use a smaller --batch_size") from e
      if start == 0:
        first_batch_seconds = time.perf_counter() - start_time
  frames_array = (np.concatenate(frames, axis=1) if frames else
                  np.zeros((0, 0) + run.image_shape, np.float32))
  return out, frames_array, first_batch_seconds


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  _check_args(args)
  labels = requested_labels(args)
  outputs = [p for p in (args.out, args.npz, args.reverse_strip) if p is not None]
  files.check_outputs(outputs, args.overwrite)
  batch_size = args.batch_size or min(args.num_samples, DEFAULT_BATCH_SIZE)
  # Before JAX starts: each batch split over one CPU device per core, as train does.
  if not cli.is_multi_process():
    cli.use_cpu_cores(batch_size)
  # The run's config, read once for what is said before the weights load: autoguidance's
  # defaults and the label check. A workdir without one: loading the run says what is wrong.
  run_config = (checkpoint.read_config(args.workdir) if args.workdir is not None and
                os.path.isfile(os.path.join(args.workdir, checkpoint.CONFIG_FILE)) else None)
  autoguide = _autoguidance(args, run_config)
  if args.workdir is not None:
    source = f"workdir {args.workdir}" + ("" if args.step is None else f" at step {args.step}")
    if labels is not None and run_config is not None:
      check_labels(labels, run_config.model.get("num_classes", 0), f"workdir {args.workdir}")
    run = _load_workdir(args.workdir, args.use_ema, args.step, autoguide.step,
                        autoguide.from_config)
    if labels is not None:
      check_labels(labels, run.num_classes, f"workdir {args.workdir}")
  else:
    run = _load_torch(args.torch_checkpoint, args.use_ema, args.num_groups, args.num_heads,
                      args.data_range)
    source = f"torch checkpoint {args.torch_checkpoint}"
  num_steps = _num_steps(args, run.schedule.num_steps)
  eta = DEFAULT_DDIM_ETA if args.eta is None else args.eta
  clip_denoised = (DEFAULT_CLIP_DENOISED[args.sampler] if args.clip_denoised is None
                   else args.clip_denoised)
  spacing = args.spacing or DEFAULT_SPACING
  strip_rows = min(STRIP_ROWS, args.num_samples) if args.reverse_strip else 0
  guidance_scale = (DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None
                    else args.guidance_scale)
  autoguide_scale, autoguide_min_t = autoguide.scale, autoguide.min_t
  if autoguide.note:
    run = dataclasses.replace(run, guide_note=autoguide.note)
  _check_host_memory(args.num_samples, run.image_shape)

  start_time = time.perf_counter()
  samples, frames, first_seconds = generate(run, args.sampler, num_steps, eta, args.seed,
                                            args.num_samples, batch_size, strip_rows,
                                            clip_denoised, spacing, labels, guidance_scale,
                                            autoguide_scale, autoguide_min_t)
  seconds = time.perf_counter() - start_time

  if labels is None:
    files.write_atomic(args.out, lambda f: images.save_grid(f, samples, run.data_range))
  else:
    sample_labels = cycled_labels(labels, args.num_samples)
    files.write_atomic(args.out, lambda f: save_label_grid(f, samples, sample_labels,
                                                           run.data_range))
  if args.npz:
    extra = {}
    if labels is not None:
      extra["labels"] = sample_labels
      extra["guidance_scale"] = np.float32(guidance_scale)
    if run.guide_step is not None:
      extra["autoguide_step"] = np.int64(run.guide_step)
      extra["autoguide_scale"] = np.float32(autoguide_scale)
      extra["autoguide_min_t"] = np.int64(autoguide_min_t)
    if args.sampler == "ddim":
      extra["eta"] = np.float32(eta)
    if args.sampler == "dpmpp2m":
      extra["spacing"] = np.str_(spacing)
    if args.sampler != "ddpm":
      extra["clip_denoised"] = np.bool_(clip_denoised)
    files.write_atomic(args.npz, lambda f: np.savez(
        f, images=samples, seed=np.int64(args.seed), data_range=np.str_(run.data_range),
        sampler=np.str_(args.sampler), num_steps=np.int32(num_steps), **extra))
  if args.reverse_strip:
    files.write_atomic(args.reverse_strip, lambda f: images.save_strip(f, frames, run.data_range))

  num_batches = math.ceil(args.num_samples / batch_size)
  rate = f"{args.num_samples / seconds:.2f} img/s"
  if num_batches > 1:
    after = (args.num_samples - batch_size) / max(seconds - first_seconds, 1e-9)
    rate += f", {after:.2f} img/s after the first batch"
  else:
    rate += " with compilation"
  settings = f"{args.sampler}, {num_steps} steps"
  if args.sampler == "ddim":
    settings += f", eta {eta:g}"
  if args.sampler == "dpmpp2m":
    settings += f", {spacing} spacing"
  if clip_denoised:
    settings += ", x0 clipped"
  if run.objective != "eps":
    settings += f", {run.objective}-prediction model"
  if labels is not None:
    shown = ",".join(map(str, labels[:10])) + (",..." if len(labels) > 10 else "")
    settings += f", labels {shown}, guidance {guidance_scale:g}"
  if run.guide_step is not None:
    settings += (f", autoguided by step {run.guide_step} at {autoguide_scale:g} for "
                 f"t >= {autoguide_min_t}")
  if run.guide_note:
    settings += f"; {run.guide_note}"
  print(f"sampled {args.num_samples} images ({settings}) from {source} in {seconds:.1f} s "
        f"({rate}; first batch of {batch_size} with compilation {first_seconds:.1f} s) "
        f"-> {', '.join(outputs)}", flush=True)
  return 0


if __name__ == "__main__":
  run_cli(main)
