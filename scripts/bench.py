"""Benchmarks the JAX train step and samplers against the PyTorch original, on one device.

  python scripts/bench.py --config configs/mnist.py --json bench.json
  python scripts/bench.py --config configs/mnist_tiny.py --json bench.json --quick

In one process, on one device (the first GPU when both JAX and torch see one, else the
CPU), with the same architecture, batch and float32 weights on both sides:

* train step img/s: ``ddpm_jax.train.make_train_step`` (jitted; Adam + EMA) per compute
  dtype, against ``reference_torch.train_step`` (the original's eager step; Adam + EMA)
  and the same step with the model under ``torch.compile``;
* sampling img/s: the batched DDPM and DDIM scans of ``ddpm_jax.sampling`` against the
  original's one-image-at-a-time loop (``reference_torch.sample``);
* memory, FLOPs per image (XLA's cost analysis and an analytic count), MFU on a GPU
  (of the analytic count),
  a forward / backward / optimizer+EMA breakdown of the float32 step, and that step's op
  time by phase and UNet layer in a jax.profiler trace (``ddpm_jax.profiling``);
* parity: the same weights in both frameworks, and how far JAX's output, loss and
  gradients are from the original's on this device, at the timed precision (JAX's
  default; TF32 on a recent GPU), at full float32 and per JAX compute dtype.

Warm-up calls are not timed; each figure is the median of ``--reps`` repetitions, with
``jax.block_until_ready`` / ``torch.cuda.synchronize`` before every clock read. Every
figure goes to ``--json``; a summary table goes to stdout. Config overrides use
``--config.KEY=VALUE`` (e.g. ``--config.model.dropout_rate=0``). See BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

# One device: the first GPU. JAX must not take most of the GPU's memory up front, since
# torch allocates in the same process.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Runnable from a plain checkout (e.g. on a GPU machine where the package is not installed).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,g-bad-import-order
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import platform
import resource
import shlex
import statistics
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from jax.experimental.layout import Format
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from ddpm_jax import convert, diffusion, files, profiling, sampling, train
from ddpm_jax.config_checks import check_overrides_given_once, validate_config
from ddpm_jax.config_defaults import base_config
from ddpm_jax.errors import UserError, run_cli
from ddpm_jax.model import build_unet
from ddpm_jax.schedule import linear_schedule
from ddpm_jax.train_state import adam_states, apply_gradients, fit_opt_state

try:
  import torch
  import reference_torch as R
except ImportError:  # Reported by main() as a one-line error.
  torch = R = None
# pylint: enable=g-import-not-at-top,g-bad-import-order

# Train FLOPs per 32x32 image of the original UNET quoted by the performance issue.
SEED_TRAIN_GFLOP = 21.8
# The original's 75 epochs of 60,000 digits at batch 64 (937 full batches an epoch).
ORIGINAL_TRAIN_STEPS = 70_275

# Dense (no sparsity) peak FLOP/s by device kind, from the vendors' datasheets. The
# float32 rows use the TF32 peak: JAX's default precision runs float32 convolutions and
# matmuls on the tensor cores as TF32 on these GPUs (the bench sets torch to match).
# The first key found in ``device_kind`` wins, so 'H100 PCIe' comes before 'H100'.
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "tf32": 378e12, "float32": 51e12},
    "H100": {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},  # SXM
    "H200": {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},  # H100 SXM's compute
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}
# Which peak each compute dtype's MFU is taken against.
PEAK_KEY = {"float32": "tf32", "bfloat16": "bfloat16", "float16": "bfloat16"}

# Environment variables that change what is measured; recorded in the JSON.
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
            "OMP_NUM_THREADS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")

PARTS = ("train", "sample", "parity")
# Images in the parity check: the numbers, not the speed, so a small batch.
PARITY_BATCH = 8

# Calls of the train step that --profile traces.
PROFILE_STEPS = 3

# --quick: CI-sized settings, applied to the flags not given on the command line.
QUICK = dict(batch_sizes=["8"], reps=2, warmup=1, min_rep_s=0.0, sample_timed_steps=4,
             reference_timed_steps=2, sample_reps=1, torch_compile=False, xla_layouts=False,
             variant_steps=False)


def define_flags(fv: flags.FlagValues) -> None:
  """The bench's flags on ``fv`` (``--config`` with its ``--config.KEY=VALUE`` overrides)."""
  config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/mnist.py.",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("json", None, "Where to write every figure (JSON).", flag_values=fv)
  flags.DEFINE_bool("quick", False, "CI-sized run: batch 8, 2 timed repetitions, 4 sampler "
                    "steps, 2 steps of the original's sampler, no torch.compile, no "
                    "--xla_layouts or --variant_steps (flags given explicitly still win).",
                    flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["64", "256"], "Batch sizes of the train step and the "
                    "batched samplers.", flag_values=fv)
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "JAX compute dtypes (params stay "
                    "float32); the torch rows are float32.", flag_values=fv)
  flags.DEFINE_integer("reps", 5, "Timed repetitions per train figure (median reported).",
                       flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed calls before timing a train step.",
                       flag_values=fv)
  flags.DEFINE_float("min_rep_s", 1.0, "A train repetition runs enough steps to last about "
                     "this long (0: one step).", flag_values=fv)
  flags.DEFINE_integer("ddim_steps", 50, "Steps of the DDIM sampler.", flag_values=fv)
  flags.DEFINE_integer("sample_timed_steps", 0, "If > 0, a batched sampler runs only this "
                       "many reverse steps and its img/s is scaled to the full count (every "
                       "step does the same work).", flag_values=fv)
  flags.DEFINE_integer("reference_timed_steps", 10, "Steps of the original's one-image "
                       "sampler that are timed; img/s is scaled to the full count.",
                       flag_values=fv)
  flags.DEFINE_integer("sample_reps", 3, "Timed repetitions per sampling figure.",
                       flag_values=fv)
  flags.DEFINE_bool("torch_compile", True, "Also time the original's step with the model "
                    "under torch.compile (minutes to compile on a CPU).", flag_values=fv)
  flags.DEFINE_list("parts", list(PARTS), "What to measure: 'train' (the train-step rows, "
                    "ratios and breakdown), 'sample' (the samplers and the original's loop) "
                    "and/or 'parity' (JAX's output, loss and gradients against the "
                    "original's, same weights, on this device). On a machine with a time "
                    "limit per command, run them apart.", flag_values=fv)
  flags.DEFINE_bool("breakdown", True, "Time forward, backward and optimizer+EMA of the "
                    "float32 step separately, for both frameworks (first batch size).",
                    flag_values=fv)
  flags.DEFINE_bool("xla_layouts", True, "In the breakdown, count the state arrays that "
                    "the train step keeps in layouts XLA picks (Layout.AUTO) and, if any, "
                    "time the float32 step with them all row-major instead: one more "
                    "compilation (off with --quick).",
                    flag_values=fv)
  flags.DEFINE_bool("variant_steps", True, "In the breakdown, also time the whole float32 "
                    "step with each way of writing the optimizer+EMA update in it: three "
                    "more compilations, one a cache load for a constant-rate config (off "
                    "with --quick).", flag_values=fv)
  flags.DEFINE_bool("profile", True, f"Trace {PROFILE_STEPS} calls of the JAX step of the "
                    "first of --dtypes at the first batch size with jax.profiler and report "
                    "its op time by phase and UNet layer.", flag_values=fv)
  flags.DEFINE_string("profile_dir", None, "Keep that trace here, for Perfetto or "
                      "TensorBoard (default: a temporary folder, deleted).", flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure and how often."""
  batch_sizes: tuple[int, ...]
  dtypes: tuple[str, ...]
  reps: int
  warmup: int
  min_rep_s: float
  ddim_steps: int
  sample_timed_steps: int
  reference_timed_steps: int
  sample_reps: int
  torch_compile: bool
  breakdown: bool
  xla_layouts: bool
  variant_steps: bool
  profile: bool
  profile_dir: str | None
  parts: tuple[str, ...]
  quick: bool


def settings_from_flags(fv: flags.FlagValues) -> Settings:
  """Applies ``--quick`` to the flags left at their defaults, then checks the values."""
  values = {name: fv[name].value for name in (
      "batch_sizes", "dtypes", "reps", "warmup", "min_rep_s", "ddim_steps",
      "sample_timed_steps", "reference_timed_steps", "sample_reps", "torch_compile",
      "breakdown", "xla_layouts", "variant_steps", "profile", "profile_dir", "parts")}
  if fv.quick:
    values.update({k: v for k, v in QUICK.items() if not fv[k].present})
  try:
    batch_sizes = tuple(int(b) for b in values.pop("batch_sizes"))
  except ValueError as e:
    raise UserError(f"--batch_sizes must be integers, e.g. 64,256: {e}") from e
  if not batch_sizes or min(batch_sizes) < 1:
    raise UserError("--batch_sizes needs at least one positive batch size")
  dtypes = tuple(values.pop("dtypes"))
  bad = [d for d in dtypes if d not in PEAK_KEY]
  if bad or not dtypes:
    raise UserError(f"--dtypes must be some of {', '.join(PEAK_KEY)}; got {','.join(dtypes)}")
  parts = tuple(values.pop("parts"))
  if not parts or any(p not in PARTS for p in parts):
    raise UserError(f"--parts must be some of {','.join(PARTS)}; got {','.join(parts)}")
  for name in ("reps", "ddim_steps", "sample_reps"):
    if values[name] < 1:
      raise UserError(f"--{name} must be >= 1, got {values[name]}")
  if values["profile_dir"] and os.path.exists(values["profile_dir"]) and \
      not os.path.isdir(values["profile_dir"]):
    raise UserError(f"--profile_dir {values['profile_dir']} is a file; give a folder")
  if values["warmup"] < 0 or values["min_rep_s"] < 0:
    raise UserError("--warmup and --min_rep_s must be >= 0")
  # A timed schedule needs two steps at least.
  timed = values["sample_timed_steps"]
  if not (timed == 0 or timed >= 2) or values["reference_timed_steps"] < 2:
    raise UserError("--sample_timed_steps must be 0 (all) or >= 2, and "
                    "--reference_timed_steps >= 2")
  return Settings(batch_sizes=batch_sizes, dtypes=dtypes, parts=parts, quick=fv.quick,
                  **values)


# --- Timing ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call, one entry per timed repetition of ``calls_per_rep`` calls."""
  seconds: tuple[float, ...]
  calls_per_rep: int

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  def to_json(self) -> dict:
    return dict(median_s=self.median, rep_s=list(self.seconds), calls_per_rep=self.calls_per_rep)


def time_calls(run: Callable[[], Any], sync: Callable[[Any], Any], reps: int, warmup: int,
               min_rep_s: float = 0.0) -> Timing:
  """Times ``run`` after ``warmup`` calls; ``sync(result)`` waits for the device's work.

  Each repetition runs enough calls to last about ``min_rep_s`` (found from one extra
  call), and the clock is read only after ``sync``.
  """
  for _ in range(warmup):
    sync(run())
  calls = 1
  if min_rep_s > 0:
    start = time.perf_counter()
    sync(run())
    calls = max(1, math.ceil(min_rep_s / max(time.perf_counter() - start, 1e-9)))
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = run()
    sync(out)
    seconds.append((time.perf_counter() - start) / calls)
  return Timing(tuple(seconds), calls)


# --- Devices and memory ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Devices:
  """The one JAX device and the one torch device every measurement runs on."""
  jax_device: jax.Device
  torch_device: Any  # torch.device
  note: str

  @property
  def mesh(self) -> Mesh:
    """A one-device ``data`` mesh, as ``ddpm_jax.train`` takes."""
    return Mesh(np.asarray([self.jax_device]), ("data",))

  @property
  def is_gpu(self) -> bool:
    return self.torch_device.type == "cuda"

  def torch_sync(self, _=None) -> None:
    if self.is_gpu:
      torch.cuda.synchronize()


def pick_devices() -> Devices:
  """The first GPU when both JAX and torch see one, else the CPU for both."""
  torch_gpu = torch.cuda.is_available()
  jax_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  if torch_gpu and jax_gpu:
    return Devices(jax.devices()[0], torch.device("cuda", 0), "GPU (JAX and torch see it)")
  note = "CPU"
  if torch_gpu != jax_gpu:
    note += f" (only {'torch' if torch_gpu else 'JAX'} sees a GPU; both run on the CPU)"
  return Devices(jax.devices("cpu")[0], torch.device("cpu"), note)


def host_memory() -> dict:
  """The process's peak RSS so far (getrusage) and, with psutil installed, its RSS now."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB.
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    now = psutil.Process().memory_info().rss
  except ImportError:
    now = None
  return dict(host_peak_rss_bytes=peak, host_rss_bytes=now)


def xla_memory(compiled: jax.stages.Compiled) -> dict | None:
  """XLA's buffer assignment: arguments + outputs - donated aliases + temporaries."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  parts = dict(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
               alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
  parts["peak"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
  return parts


def jax_device_peak(device: jax.Device) -> int | None:
  """``peak_bytes_in_use`` of the device's allocator (GPU), a high-water mark since start."""
  stats = device.memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


# --- FLOPs -----------------------------------------------------------------------------


def analytic_forward_flops(model: ml_collections.ConfigDict, image_size: int,
                           in_channels: int) -> int:
  """FLOPs (2 per multiply-add) of one image's forward pass, convs and matmuls only.

  Follows ``ddpm_jax.model.UNet``: the shallow conv; per layer two ResBlocks of two 3x3
  convs, the optional attention (qkv and output projections, QK^T and AV), then a
  stride-2 3x3 conv down or the 4x4 stride-2 transposed conv up (its products: each input
  pixel times 4x4 taps; ``model.UpConv`` multiplies 2.25x as many, counting zero taps);
  the late and output convs. Norms, activations and the embedding add are left out.
  """
  def conv(size: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * size * size * c_in * c_out * kernel * kernel

  n = len(model.channels)
  size, c = image_size, model.channels[0]
  flops = conv(size, in_channels, c, 3)
  skips = []
  for i in range(n):
    flops += 4 * conv(size, c, c, 3)
    if model.attentions[i]:
      tokens = size * size
      flops += 2 * tokens * c * 4 * c + 2 * 2 * tokens * tokens * c
    if i < n // 2:
      skips.append(c)
      flops += conv(size // 2, c, 2 * c, 3)
      size, c = size // 2, 2 * c
    else:
      flops += 2 * size * size * c * (c // 2) * 16
      size, c = 2 * size, c // 2 + skips[n - i - 1]
  late = (model.channels[-1] // 2 + model.channels[0]) // 2
  return flops + conv(size, c, late, 3) + conv(size, late, model.out_channels, 1)


def xla_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
  """The ``flops`` of XLA's cost analysis of a lowered or compiled computation."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_flops(device_kind: str, dtype: str) -> tuple[str, float] | None:
  """``(table key / peak name, FLOP/s)`` for the device and compute dtype, if in the table."""
  for key, peaks in PEAK_FLOPS.items():
    if key.lower() in device_kind.lower():
      return f"{key} {PEAK_KEY[dtype]}", peaks[PEAK_KEY[dtype]]
  return None


def seed_unet_flops(devices: Devices) -> dict:
  """The original UNET's train FLOPs per 32x32 image: analytic and XLA (unoptimised HLO).

  Only lowered, never compiled or run, so it costs a trace even on a CPU.
  """
  config = base_config()
  batch = config.batch_size
  x = jax.ShapeDtypeStruct((batch, 32, 32, 1), jnp.float32)
  lowered = train.make_train_step(config, devices.mesh).lower(train.abstract_train_state(config), x)
  flops = xla_flops(lowered)
  return dict(analytic_train_flops_per_img=3 * analytic_forward_flops(config.model, 32, 1),
              xla_lowered_train_flops_per_img=flops / batch if flops else None,
              issue_train_flops_per_img=SEED_TRAIN_GFLOP * 1e9)


# --- JAX -------------------------------------------------------------------------------


def with_settings(config: ml_collections.ConfigDict, batch: int | None = None,
                  dtype: str | None = None) -> ml_collections.ConfigDict:
  """A copy of ``config`` with another batch size and/or compute dtype."""
  config = copy.deepcopy(config)
  if batch is not None:
    config.batch_size = batch
  if dtype is not None:
    config.model.dtype = dtype
  return config


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  return (config.data.image_size, config.data.image_size, config.data.channels)


def jax_train(config: ml_collections.ConfigDict, dtype: str, batch: int,
              initial: train.TrainState, devices: Devices, settings: Settings,
              breakdown: bool, profile: bool = False) -> dict:
  """The jitted train step's row, from a copy of ``initial`` (the step donates its state);
  with ``breakdown``, also its forward and optimizer+EMA alone; with ``profile``, its op
  time in a profiler trace (:mod:`ddpm_jax.profiling`)."""
  config = with_settings(config, batch, dtype)
  mesh = devices.mesh
  state = jax.tree.map(lambda a: a.copy(), initial)
  x = jax.device_put(jax.random.uniform(jax.random.PRNGKey(1), (batch,) + image_shape(config)),
                     NamedSharding(mesh, P("data")))
  start = time.perf_counter()
  compiled, formats = train.compile_train_step(config, mesh, state, x)
  compile_s = time.perf_counter() - start
  state = jax.device_put(state, formats)  # The state in the layouts the loop keeps it in.

  def run():
    nonlocal state
    state, _ = compiled(state, x)
    return state

  timing = time_calls(run, jax.block_until_ready, settings.reps, settings.warmup,
                      settings.min_rep_s)
  flops = xla_flops(compiled)
  hlo_text = compiled.as_text()  # Read by the copy count and the profile's op names.
  row = dict(framework="jax", variant="jit", dtype=dtype, batch=batch, status="ok",
             img_per_s=batch / timing.median, step_ms=1e3 * timing.median,
             timing=timing.to_json(), compile_s=compile_s,
             xla_train_flops_per_img=flops / batch if flops else None,
             xla_copies=profiling.copy_instructions(hlo_text),
             memory=dict(xla_bytes=xla_memory(compiled),
                         device_peak_bytes=jax_device_peak(devices.jax_device),
                         **host_memory()))
  if profile:  # Before the breakdown, whose optimizer update donates the state.
    with contextlib.ExitStack() as stack:
      logdir = settings.profile_dir or stack.enter_context(tempfile.TemporaryDirectory())
      try:
        summary = profiling.profile_calls(run, PROFILE_STEPS, logdir, hlo_text)
      except (OSError, ValueError, KeyError, RuntimeError) as e:  # Keep the row's timings.
        summary = dict(error=f"{type(e).__name__}: {e}")
      row["profile"] = dict(summary, trace_dir=settings.profile_dir)
  if breakdown:
    row["breakdown"] = jax_breakdown(config, state, x, timing.median, settings)
  return row


# The optimizer + EMA update written three ways, timed alone with --breakdown. On the H100
# it took 2.5 ms of the 14.2 ms float32 step at batch 64 as optax's Adam and a tree-mapped
# EMA, ~6x what its memory traffic (UPDATE_PASSES x the parameter bytes) needs at the
# card's bandwidth. Each variant computes the same numbers; the faster one earns its place
# in the train step only by measurement on a GPU.
UPDATE_VARIANTS = ("optax", "one map per leaf", "flat")
# Arrays each parameter's update reads (param, grad, mu, nu, EMA) and writes (param, mu,
# nu, EMA), at least.
UPDATE_PASSES = 9


def _adam_ema(p, g, mu, nu, ema, *, lr, c1, c2, b1, b2, eps, ema_decay):
  """optax.adam's update (bias corrections ``c1``/``c2`` of the incremented count) and the
  EMA toward the new params, on one array: ``(p, mu, nu, ema)`` after the step."""
  mu = (1 - b1) * g + b1 * mu
  nu = (1 - b2) * (g ** 2) + b2 * nu
  p = p + -lr * ((mu / c1) / (jnp.sqrt(nu / c2) + eps))
  return p, mu, nu, ema + (1.0 - ema_decay) * (p - ema)


def update_variant(config: ml_collections.ConfigDict, variant: str) -> Callable:
  """``update(state, grads) -> state`` of ``config``'s constant-rate Adam (no warm-up,
  decay or clipping) and EMA: optax's as the train step runs it, one fused function mapped
  over the leaves, or the whole tree as one concatenated vector."""
  tx = train.make_tx(config)
  if variant == "optax":
    return functools.partial(apply_gradients, tx=tx, ema_decay=config.ema_decay)
  b1, b2, eps = 0.9, 0.999, 1e-8  # make_optimizer's, torch.optim.Adam's defaults.

  def update(state: train.TrainState, grads: Any) -> train.TrainState:
    (adam,) = adam_states(state.opt_state)
    count = optax.safe_increment(adam.count)
    step = functools.partial(_adam_ema, lr=config.learning_rate, c1=1 - b1 ** count,
                             c2=1 - b2 ** count, b1=b1, b2=b2, eps=eps,
                             ema_decay=config.ema_decay)
    trees = (state.params, grads, adam.mu, adam.nu, state.ema_params)
    if variant == "one map per leaf":
      out = jax.tree.map(step, *trees)
      params, mu, nu, ema = (jax.tree.map(lambda o, i=i: o[i], out,
                                          is_leaf=lambda o: isinstance(o, tuple))
                             for i in range(4))
    else:
      leaves, treedef = jax.tree.flatten(state.params)
      ends = np.cumsum([leaf.size for leaf in leaves])[:-1].tolist()
      flat = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)]) for t in trees)
      params, mu, nu, ema = (
          treedef.unflatten([a.reshape(leaf.shape) for a, leaf in zip(jnp.split(v, ends), leaves)])
          for v in step(*flat))
    opt_state = fit_opt_state(adam._replace(count=count, mu=mu, nu=nu), state.opt_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema)
  return update


def time_step_in(config: ml_collections.ConfigDict, state: train.TrainState, x: jax.Array,
                 formats: Any, settings: Settings, update: Callable | None = None
                 ) -> tuple[float, jax.stages.Compiled]:
  """The train step (with ``update``, if given) compiled for its state in ``formats``
  (None: the layouts XLA picks) and timed looping on a copy of ``state`` moved into them:
  its median seconds, and the program."""
  compiled, formats = train.compile_train_step(config, x.sharding.mesh, state, x,
                                               formats=formats, update=update)
  current = jax.device_put(state, formats, may_alias=False)

  def run():
    nonlocal current
    current, _ = compiled(current, x)
    return current

  return time_calls(run, jax.block_until_ready, settings.reps, max(settings.warmup, 1),
                    settings.min_rep_s).median, compiled


def constant_rate(config: ml_collections.ConfigDict, state: train.TrainState
                  ) -> tuple[ml_collections.ConfigDict, train.TrainState]:
  """A copy of ``config`` whose Adam is the one :func:`update_variant` writes out, and
  ``state`` with that Adam's fresh optimizer state (``config``'s own may hold a schedule's
  or clipping's)."""
  config = copy.deepcopy(config)
  config.lr_schedule, config.warmup_steps, config.grad_clip_norm = "constant", 0, 0.0
  # Every leaf where the params are: a leaf elsewhere would make a second call of a jitted
  # update compile again, for the first call's output shardings.
  fresh = jax.device_put(
      train.TrainState(step=state.step, params=state.params,
                       opt_state=train.make_tx(config).init(state.params),
                       ema_params=state.ema_params, rng=state.rng),
      jax.tree.leaves(state.params)[0].sharding)
  return config, fresh


def time_variant_steps(config: ml_collections.ConfigDict, state: train.TrainState,
                       x: jax.Array, settings: Settings) -> dict[str, float]:
  """The whole train step with each of :data:`UPDATE_VARIANTS` as its update (constant
  rate), its state in the layouts XLA picks as in the train step: ms a step by variant.
  Alone, the three updates took the same time on the H100 whatever their form (the host's
  dispatch of ~2,000 arrays, likely); inside the step only the kernels count. Where the
  config's optimizer is already constant-rate Adam, ``optax``'s step is the train row's
  program (a compilation-cache load where the cache is on)."""
  config, state = constant_rate(config, state)
  return {variant: 1e3 * time_step_in(config, state, x, None, settings,
                                      update_variant(config, variant))[0]
          for variant in UPDATE_VARIANTS}


def time_update_variants(config: ml_collections.ConfigDict, state: train.TrainState,
                         settings: Settings) -> list[dict]:
  """Each of :data:`UPDATE_VARIANTS` timed alone on a copy of ``state``, with the GB/s of
  its least memory traffic."""
  config, fresh = constant_rate(config, state)
  traffic = UPDATE_PASSES * sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(state.params))
  grads = jax.tree.map(jnp.ones_like, state.params)
  rows = []
  for variant in UPDATE_VARIANTS:
    update = jax.jit(update_variant(config, variant), donate_argnums=(0,))
    current = jax.tree.map(lambda a: a.copy(), fresh)

    def run():
      nonlocal current
      current = update(current, grads)  # pylint: disable=cell-var-from-loop
      return current

    seconds = time_calls(run, jax.block_until_ready, settings.reps, max(settings.warmup, 1),
                         settings.min_rep_s).median
    rows.append(dict(variant=variant, ms=1e3 * seconds, gb_per_s=traffic / seconds / 1e9))
  return rows


def is_row_major(array: Any, layout_format: Format) -> bool:
  """Whether ``layout_format`` lays ``array`` out as JAX does by default (row-major)."""
  return tuple(layout_format.layout.major_to_minor) == tuple(range(array.ndim))


def time_row_major(config: ml_collections.ConfigDict, state: train.TrainState, x: jax.Array,
                   settings: Settings) -> dict:
  """How many arrays of the train step's ``state`` XLA lays out other than row-major
  (:func:`ddpm_jax.train.compile_train_step`) and, where it does, the step with its state
  kept row-major (JAX's default layouts, as the step ran before it left them to XLA),
  timed on a copy of ``state`` moved into them. With none (as on a CPU) the two steps are
  one program and it is not timed again."""
  leaves = jax.tree.leaves(state)
  relaid = [a for a in leaves if not is_row_major(a, a.format)]
  row = dict(leaves=len(leaves), relaid_leaves=len(relaid),
             relaid_bytes=sum(a.nbytes for a in relaid))
  if not relaid:
    return row
  seconds, compiled = time_step_in(config, state, x, train.row_major_formats(state), settings)
  return dict(row, row_major_step_ms=1e3 * seconds, row_major_img_per_s=x.shape[0] / seconds,
              row_major_xla_copies=profiling.copy_instructions(compiled.as_text()))


def jax_breakdown(config: ml_collections.ConfigDict, state: train.TrainState, x: jax.Array,
                  step_s: float, settings: Settings) -> dict:
  """Forward (loss, train mode) and optimizer+EMA timed alone; backward is the rest. Also
  the optimizer+EMA update written other ways (:func:`time_update_variants`) and, with
  ``settings.xla_layouts``, the step with its state row-major rather than in the layouts
  XLA picks (:func:`time_row_major`)."""
  # First, while ``state`` is in the train step's layouts; the parts alone are plain jits,
  # timed on a row-major copy, as JAX lays out their arrays by default.
  layouts = time_row_major(config, state, x, settings) if settings.xla_layouts else None
  steps = time_variant_steps(config, state, x, settings) if settings.variant_steps else {}
  state = jax.device_put(state, train.row_major_formats(state), may_alias=False)
  apply_fn = build_unet(config.model).apply
  schedule = train.make_schedule(config)
  forward = jax.jit(lambda p, x, rng: diffusion.loss(p, apply_fn, schedule, x, rng))
  update = jax.jit(functools.partial(apply_gradients, tx=train.make_tx(config),
                                     ema_decay=config.ema_decay), donate_argnums=(0,))
  grads = jax.tree.map(jnp.ones_like, state.params)
  rng = jax.random.PRNGKey(2)
  forward_s = time_calls(lambda: forward(state.params, x, rng), jax.block_until_ready,
                         settings.reps, max(settings.warmup, 1), settings.min_rep_s).median

  def run_update():
    nonlocal state
    state = update(state, grads)
    return state

  update_s = time_calls(run_update, jax.block_until_ready, settings.reps,
                        max(settings.warmup, 1), settings.min_rep_s).median
  return dict(step_ms=1e3 * step_s, forward_ms=1e3 * forward_s,
              backward_ms=1e3 * (step_s - forward_s - update_s),
              optimizer_ema_ms=1e3 * update_s,
              update_variants=[dict(row, **({"step_ms": steps[row["variant"]]} if steps else {}))
                               for row in time_update_variants(config, state, settings)],
              xla_layouts=layouts)


def jax_sample(config: ml_collections.ConfigDict, dtype: str, batch: int, sampler: str,
               params: Any, devices: Devices, settings: Settings) -> dict:
  """The batched DDPM or DDIM scan's row: img/s at its full step count."""
  config = with_settings(config, dtype=dtype)
  full = config.schedule.num_steps if sampler == "ddpm" else settings.ddim_steps
  timed = min(full, settings.sample_timed_steps or full)
  apply_fn = build_unet(config.model).apply
  shape = (batch,) + image_shape(config)
  if sampler == "ddpm":
    # A `timed`-step schedule: each step costs what a step of the full one does.
    schedule = linear_schedule(timed, config.schedule.beta_start, config.schedule.beta_end)
    fn = jax.jit(lambda p, rng: sampling.ddpm_sample(apply_fn, p, schedule, rng, shape,
                                                     sampling.strip_times(timed)))
  else:
    schedule = train.make_schedule(config)
    fn = jax.jit(lambda p, rng: sampling.ddim_sample(apply_fn, p, schedule, rng, shape,
                                                     num_steps=timed))
  rng = jax.device_put(jax.random.PRNGKey(3), devices.jax_device)
  start = time.perf_counter()
  compiled = fn.lower(params, rng).compile()
  compile_s = time.perf_counter() - start
  timing = time_calls(lambda: compiled(params, rng), jax.block_until_ready,
                      settings.sample_reps, 1)
  batch_s = timing.median * full / timed
  return dict(framework="jax", sampler=f"{sampler.upper()}-{full}", dtype=dtype, batch=batch,
              steps=full, timed_steps=timed, scaled=timed < full, img_per_s=batch / batch_s,
              seconds_per_batch=batch_s, timing=timing.to_json(), compile_s=compile_s)


# --- PyTorch ---------------------------------------------------------------------------


def reference_model(config: ml_collections.ConfigDict, devices: Devices,
                    dropout_prob: float | None = None):
  """``reference_torch.UNET`` with the config's architecture (and dropout unless given),
  on the torch device."""
  torch.manual_seed(config.seed)
  m = config.model
  return R.UNET(Channels=list(m.channels), Attentions=list(m.attentions),
                Upscales=list(m.upscales), num_groups=m.num_groups,
                dropout_prob=m.dropout_rate if dropout_prob is None else dropout_prob,
                num_heads=m.num_heads,
                input_channels=config.data.channels, output_channels=m.out_channels,
                time_steps=m.time_steps).to(devices.torch_device)


def torch_train(config: ml_collections.ConfigDict, batch: int, devices: Devices,
                settings: Settings, compiled: bool, breakdown: bool) -> dict:
  """The original's step (eager, or the model under ``torch.compile``): Adam + EMA."""
  model = reference_model(config, devices)
  optimizer, ema, criterion = R.make_training(model, lr=config.learning_rate,
                                              ema_decay=config.ema_decay)
  scheduler = R.DDPM_Scheduler(num_time_steps=config.schedule.num_steps)
  if compiled:
    # Forget earlier compilations: having seen another batch size, dynamo would otherwise
    # compile a dynamic-shape graph for this one.
    torch.compiler.reset()
  net = torch.compile(model) if compiled else model
  size, channels = config.data.image_size, config.data.channels
  x = torch.rand(batch, channels, size, size, device=devices.torch_device)
  num_steps = config.schedule.num_steps

  def run():
    # As the original's loop: t on the host, the noise on the device, drawn every step.
    t = torch.randint(0, num_steps, (batch,))
    e = torch.randn_like(x)
    return R.train_step(net, optimizer, ema, criterion, scheduler, x, t, e)

  if devices.is_gpu:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  devices.torch_sync(run())
  first_step_s = time.perf_counter() - start
  timing = time_calls(run, devices.torch_sync, settings.reps, settings.warmup,
                      settings.min_rep_s)
  row = dict(framework="torch", variant="compile" if compiled else "eager", dtype="float32",
             batch=batch, status="ok", img_per_s=batch / timing.median,
             step_ms=1e3 * timing.median, timing=timing.to_json(), first_step_s=first_step_s,
             memory=dict(device_peak_bytes=torch.cuda.max_memory_allocated()
                         if devices.is_gpu else None, **host_memory()))
  if breakdown:
    row["breakdown"] = torch_breakdown(model, optimizer, ema, criterion, scheduler, x,
                                       num_steps, timing.median, devices, settings)
  return row


def torch_breakdown(model, optimizer, ema, criterion, scheduler, x, num_steps: int,
                    step_s: float, devices: Devices, settings: Settings) -> dict:
  """The pieces of ``reference_torch.train_step`` timed alone: forward, ``loss.backward()``,
  ``optimizer.step()`` and the EMA update."""
  batch = x.shape[0]
  t = torch.randint(0, num_steps, (batch,))
  e = torch.randn_like(x)
  a = scheduler.alpha[t].view(batch, 1, 1, 1).to(x.device)
  x_t = torch.sqrt(a) * x + torch.sqrt(1 - a) * e

  def forward():
    return criterion(model(x_t, t), e)

  def backward() -> float:
    """Seconds of one ``loss.backward()``, its forward run and synced before the clock."""
    optimizer.zero_grad()
    loss = forward()
    devices.torch_sync()
    start = time.perf_counter()
    loss.backward()
    devices.torch_sync()
    return time.perf_counter() - start

  def timed(fn):
    return time_calls(fn, devices.torch_sync, settings.reps, max(settings.warmup, 1),
                      settings.min_rep_s).median

  forward_s = timed(forward)
  backward_s = statistics.median([backward() for _ in range(max(settings.warmup, 1) +
                                                            settings.reps)][-settings.reps:])
  optimizer_s = timed(optimizer.step)
  ema_s = timed(lambda: ema.update(model))
  return dict(step_ms=1e3 * step_s, forward_ms=1e3 * forward_s, backward_ms=1e3 * backward_s,
              optimizer_ms=1e3 * optimizer_s, ema_ms=1e3 * ema_s)


def torch_compile_row(config: ml_collections.ConfigDict, batch: int, devices: Devices,
                      settings: Settings) -> dict:
  """The ``torch.compile`` row, or a row saying why it was skipped or failed."""
  row = dict(framework="torch", variant="compile", dtype="float32", batch=batch)
  if not settings.torch_compile:
    return dict(row, status="skipped (--quick)" if settings.quick else
                "skipped (--notorch_compile)")
  try:
    return torch_train(config, batch, devices, settings, compiled=True, breakdown=False)
  except Exception as e:  # pylint: disable=broad-except
    reason = " ".join(str(e).split()) or type(e).__name__
    return dict(row, status=f"failed: {type(e).__name__}: {reason[:300]}")


def torch_sample(config: ml_collections.ConfigDict, devices: Devices,
                 settings: Settings) -> dict:
  """The original's sampler, one image at a time; a few steps timed, scaled to all."""
  full = config.schedule.num_steps
  timed = min(full, settings.reference_timed_steps)
  model = reference_model(config, devices).eval()
  # A `timed`-step schedule runs `timed` model calls of the original's loop. As in the
  # original, z and the schedule stay on the CPU and each model call moves z to the
  # device and its output back.
  scheduler = R.DDPM_Scheduler(num_time_steps=timed)
  size, channels = config.data.image_size, config.data.channels
  z = torch.randn(1, channels, size, size)
  timing = time_calls(lambda: R.sample(model, scheduler, z)[0], devices.torch_sync,
                      settings.sample_reps, 1)
  image_s = timing.median * full / timed
  return dict(framework="torch", sampler=f"DDPM-{full} (original, one image at a time)",
              dtype="float32", batch=1, steps=full, timed_steps=timed, scaled=timed < full,
              img_per_s=1.0 / image_s, seconds_per_batch=image_s, timing=timing.to_json())


# --- Parity ----------------------------------------------------------------------------


@contextlib.contextmanager
def torch_full_float32(enabled: bool):
  """With ``enabled``, torch's float32 convolutions and matmuls at full precision (no TF32)."""
  saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
  if enabled:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
  try:
    yield
  finally:
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def parity_inputs(config: ml_collections.ConfigDict, batch: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(x_t, t, e)`` of a training step, NCHW float32: digits-like uniform images noised to
  timesteps spread over the schedule, and their noise."""
  rng = np.random.default_rng(config.seed)
  shape = (batch, config.data.channels, config.data.image_size, config.data.image_size)
  x0 = rng.random(shape, dtype=np.float32)
  e = rng.standard_normal(shape, dtype=np.float32)
  t = np.linspace(0, config.schedule.num_steps - 1, batch).round().astype(np.int64)
  x_t = diffusion.q_sample(train.make_schedule(config), jnp.asarray(x0), jnp.asarray(t),
                           jnp.asarray(e))
  return np.asarray(x_t), t, e


def torch_loss_and_grads(model, x_t: np.ndarray, t: np.ndarray, e: np.ndarray,
                         devices: Devices) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
  """The original's output (NCHW), MSE loss on the noise and gradients by parameter name."""
  model.zero_grad(set_to_none=True)
  out = model(torch.from_numpy(x_t).to(devices.torch_device), torch.from_numpy(t))
  loss = torch.mean((out - torch.from_numpy(e).to(devices.torch_device)) ** 2)
  loss.backward()
  grads = {name: p.grad.detach().cpu().numpy() for name, p in model.named_parameters()}
  return out.detach().cpu().numpy(), float(loss), grads


def jax_loss_and_grads(config: ml_collections.ConfigDict, dtype: str, params: Any,
                       x_t: np.ndarray, t: np.ndarray, e: np.ndarray
                       ) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
  """The same from ``ddpm_jax`` at compute ``dtype``: output as NCHW, gradients as the
  original's ``state_dict`` names and layouts (``convert.flax_to_torch``)."""
  apply_fn = build_unet(with_settings(config, dtype=dtype).model).apply
  x = jnp.asarray(x_t.transpose(0, 2, 3, 1))
  eps = jnp.asarray(e.transpose(0, 2, 3, 1))

  def loss_fn(p):
    out = apply_fn({"params": p}, x, jnp.asarray(t, jnp.int32)).astype(jnp.float32)
    return jnp.mean((out - eps) ** 2), out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return (np.asarray(out).transpose(0, 3, 1, 2), float(loss),
          convert.flax_to_torch(jax.device_get(grads)))


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def parity_rows(config: ml_collections.ConfigDict, devices: Devices,
                settings: Settings) -> Iterator[dict]:
  """JAX against the original on this device, from the same weights and inputs.

  The original UNET (dropout 0: the original applies attention dropout even in eval
  mode) is converted to Flax params; both compute the output, the MSE on the noise and
  every gradient for ``PARITY_BATCH`` noised images. Rows: float32 at the precision the
  bench times ('default': JAX's default, TF32 on a recent GPU; torch set to match), float32
  at full precision on both sides ('highest'), and each other JAX compute dtype against
  torch float32 at the timed precision.
  """
  model = reference_model(config, devices, dropout_prob=0.0).eval()
  state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
  params = jax.device_put(convert.torch_to_flax(state, build_unet(config.model)),
                          devices.jax_device)
  x_t, t, e = parity_inputs(config, PARITY_BATCH)
  cases = [("float32", "default"), ("float32", "highest")]
  cases += [(d, "default") for d in settings.dtypes if d != "float32"]
  references = {}
  for dtype, precision in cases:
    highest = precision == "highest"
    if precision not in references:
      with torch_full_float32(highest):
        references[precision] = torch_loss_and_grads(model, x_t, t, e, devices)
    ref_out, ref_loss, ref_grads = references[precision]
    with jax.default_matmul_precision("highest") if highest else contextlib.nullcontext():
      out, loss, grads = jax_loss_and_grads(config, dtype, params, x_t, t, e)
    names = list(ref_grads)

    def off(k: str) -> float:  # A parameter's largest gradient error over its largest entry.
      return float(np.abs(grads[k] - ref_grads[k]).max()
                   / max(float(np.abs(ref_grads[k]).max()), 1e-30))

    worst = max(names, key=off)
    flat = [np.concatenate([g[k].ravel() for k in names]) for g in (grads, ref_grads)]
    yield dict(
        dtype=dtype, precision=precision, batch=PARITY_BATCH,
        timesteps=[int(t.min()), int(t.max())], output_scale=float(np.abs(ref_out).max()),
        output_max_abs_diff=float(np.abs(out - ref_out).max()),
        output_rel_l2=_rel_l2(out, ref_out), loss_jax=loss, loss_torch=ref_loss,
        grads_rel_l2=_rel_l2(*flat), worst_param=worst,
        worst_param_max_abs_diff_over_max=off(worst))


# --- The run ---------------------------------------------------------------------------


def train_ratios(rows: Sequence[dict]) -> list[dict]:
  """JAX img/s over the float32 torch rows' img/s, per batch and JAX dtype."""
  ok = {(r["framework"], r["variant"], r["dtype"], r["batch"]): r["img_per_s"]
        for r in rows if r["status"] == "ok"}
  ratios = []
  for (framework, _, dtype, batch), img_per_s in ok.items():
    if framework != "jax":
      continue
    eager = ok.get(("torch", "eager", "float32", batch))
    compiled = ok.get(("torch", "compile", "float32", batch))
    ratios.append(dict(batch=batch, dtype=dtype,
                       jax_over_eager=img_per_s / eager if eager else None,
                       jax_over_compile=img_per_s / compiled if compiled else None))
  return ratios


def add_mfu(rows: list[dict], train_flops_per_img: float, device_kind: str,
            is_gpu: bool) -> None:
  """MFU of each JAX row on a GPU: the model's train FLOPs/img x img/s / the dtype's peak.

  Model FLOPs (the analytic count), not XLA's: on a GPU, XLA's cost analysis of the
  compiled step leaves out the convolutions it hands to cuDNN as custom calls (it counted
  0.64 of the seed UNet's 21.8 GFLOP/img on an H100).
  """
  for row in rows:
    if row["framework"] != "jax":
      continue
    peak = peak_flops(device_kind, row["dtype"]) if is_gpu else None
    row["mfu"] = train_flops_per_img * row["img_per_s"] / peak[1] if peak else None
    row["mfu_peak"] = dict(name=peak[0], flops_per_s=peak[1]) if peak else None


def is_seed_unet(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is the original's UNET (any compute dtype) on 32x32x1 images."""
  def architecture(c):
    return ({k: v for k, v in c.model.to_dict().items() if k != "dtype"},
            c.data.image_size, c.data.channels)
  return architecture(config) == architecture(base_config())


def evaluate_targets(train_rows: Sequence[dict], ratios: Sequence[dict],
                     sample_rows: Sequence[dict], applicable: bool) -> list[dict]:
  """The performance issue's targets against this run's figures.

  They are set for a GPU and the original UNET (configs/mnist.py); elsewhere ``met`` is
  None and the figures are listed for reference only.
  """
  def first(items, **match):
    return next((r for r in items if all(r.get(k) == v for k, v in match.items())), None)

  def target(name, measured, limit, at_least, detail=""):
    met = None if measured is None or not applicable else (
        measured >= limit if at_least else measured <= limit)
    return dict(name=name, measured=measured, limit=limit, met=met, detail=detail)

  # Merged runs hold a ratio per run; each target takes the first run that measured it.
  fp32_64 = [r for r in ratios if r["batch"] == 64 and r["dtype"] == "float32"]
  over_eager, over_compile = (next((r[key] for r in fp32_64 if r[key] is not None), None)
                              for key in ("jax_over_eager", "jax_over_compile"))
  bf16_256 = first(train_rows, framework="jax", dtype="bfloat16", batch=256) or {}
  ddpm = [r for r in sample_rows if r["framework"] == "jax" and r["sampler"] == "DDPM-1000"
          and r["batch"] == 64]
  fastest_ddpm = min(ddpm, key=lambda r: r["seconds_per_batch"], default=None)
  jax_64 = [r for r in train_rows if r["framework"] == "jax" and r["batch"] == 64]
  fastest_64 = max(jax_64, key=lambda r: r["img_per_s"], default=None)
  return [
      target("train step fp32 batch 64: JAX / torch eager", over_eager, 2.0, True),
      target("train step fp32 batch 64: JAX / torch.compile", over_compile, 1.2, True),
      target("MFU bf16 batch 256", bf16_256.get("mfu"), 0.35, True),
      target("DDPM-1000, 64 images: seconds",
             fastest_ddpm["seconds_per_batch"] if fastest_ddpm else None, 3.0, False,
             f"JAX {fastest_ddpm['dtype']}" if fastest_ddpm else ""),
      target(f"{ORIGINAL_TRAIN_STEPS:,} steps at batch 64: minutes (step time only)",
             ORIGINAL_TRAIN_STEPS * 64 / fastest_64["img_per_s"] / 60 if fastest_64 else None,
             10.0, False, f"JAX {fastest_64['dtype']}" if fastest_64 else ""),
  ]


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return dict(python=platform.python_version(), jax=jax.__version__,
              jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
              torch=torch.__version__, numpy=np.__version__)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info(devices: Devices) -> dict:
  info = dict(platform="gpu" if devices.is_gpu else "cpu", note=devices.note,
              jax_device=str(devices.jax_device), kind=devices.jax_device.device_kind,
              cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
              load_average_start=list(os.getloadavg()))
  if devices.is_gpu:
    info["kind"] = torch.cuda.get_device_name(devices.torch_device)
  return info


def breakdown_and_profile(settings: Settings, batch_index: int, dtype: str
                          ) -> tuple[bool, bool]:
  """Whether the JAX train row of the ``batch_index``-th batch size and ``dtype`` gets the
  breakdown and the profile. The breakdown sets JAX's float32 step beside torch's, at the
  first batch size; the profile takes the first row, so that ``--dtypes bfloat16
  --batch_sizes 256`` profiles that step."""
  first_batch = batch_index == 0
  return (settings.breakdown and first_batch and dtype == "float32",
          settings.profile and first_batch and dtype == settings.dtypes[0])


def run_bench(config: ml_collections.ConfigDict, settings: Settings, command: str,
              save: Callable[[dict], None] = lambda doc: None) -> dict:
  """Every measurement, as the JSON document; ``save`` gets the document so far (its
  ``complete`` False) after each row, so a run cut short still leaves its figures."""
  devices = pick_devices()
  if devices.is_gpu:
    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as JAX's default precision.
  info = device_info(devices)
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  start = time.perf_counter()
  train_rows, sample_rows, parity, seed = [], [], [], None

  def document(complete: bool) -> dict:
    return assemble(config, settings, command, date, devices, info, train_rows, sample_rows,
                    parity, seed, complete)

  def log(message: str) -> None:
    save(document(complete=False))  # Before the line: whoever reads it finds the figure.
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

  log(f"{info['kind']} ({devices.note}); batch sizes {settings.batch_sizes}, "
      f"JAX dtypes {settings.dtypes}, parts {','.join(settings.parts)}")
  with jax.default_device(devices.jax_device):
    if "parity" in settings.parts:  # First: quick, and the numbers the timings stand on.
      for row in parity_rows(config, devices, settings):
        parity.append(row)
        log(f"parity JAX {row['dtype']} {row['precision']} precision: output rel L2 "
            f"{row['output_rel_l2']:.1e}, gradients rel L2 {row['grads_rel_l2']:.1e}")
    # Params and Adam state are float32 whatever the compute dtype: one state serves all.
    initial = (train.create_train_state(config, NamedSharding(devices.mesh, P()))
               if {"train", "sample"} & set(settings.parts) else None)
    for i, batch in enumerate(settings.batch_sizes if "train" in settings.parts else ()):
      for dtype in settings.dtypes:
        train_rows.append(jax_train(config, dtype, batch, initial, devices, settings,
                                    *breakdown_and_profile(settings, i, dtype)))
        log(f"train JAX {dtype} batch {batch}: {train_rows[-1]['img_per_s']:.1f} img/s")
      train_rows.append(torch_train(config, batch, devices, settings, compiled=False,
                                    breakdown=settings.breakdown and i == 0))
      log(f"train torch eager batch {batch}: {train_rows[-1]['img_per_s']:.1f} img/s")
      train_rows.append(torch_compile_row(config, batch, devices, settings))
      log(f"train torch.compile batch {batch}: " + (
          f"{train_rows[-1]['img_per_s']:.1f} img/s" if train_rows[-1]["status"] == "ok"
          else train_rows[-1]["status"]))

    if "sample" in settings.parts:
      # The original's loop first: every batched row's speed-up is taken against it.
      sample_rows.append(torch_sample(config, devices, settings))
      log(f"sample torch original: {sample_rows[-1]['img_per_s']:.3f} img/s")
      for dtype in settings.dtypes:
        for batch in settings.batch_sizes:
          for sampler in ("ddpm", "ddim"):
            sample_rows.append(jax_sample(config, dtype, batch, sampler, initial.params,
                                          devices, settings))
            log(f"sample JAX {sampler} {dtype} batch {batch}: "
                f"{sample_rows[-1]['img_per_s']:.1f} img/s")
    if "train" in settings.parts:
      seed = seed_unet_flops(devices)
      log("seed UNet FLOPs")
  return document(complete=True)


def assemble(config: ml_collections.ConfigDict, settings: Settings, command: str, date: str,
             devices: Devices, info: dict, train_rows: list[dict], sample_rows: list[dict],
             parity: list[dict], seed: dict | None, complete: bool) -> dict:
  """The JSON document from the rows measured so far."""
  analytic = analytic_forward_flops(config.model, config.data.image_size, config.data.channels)
  add_mfu(train_rows, 3 * analytic, info["kind"], devices.is_gpu)
  ratios = train_ratios(train_rows)
  reference = next((r for r in sample_rows if r["framework"] == "torch"), None)
  for row in sample_rows:
    if row["framework"] == "jax":
      row["speedup_over_original"] = row["img_per_s"] / reference["img_per_s"]
  info = dict(info, load_average_end=list(os.getloadavg()))
  applicable = devices.is_gpu and is_seed_unet(config)
  return dict(
      command=command, date=date, complete=complete, device=info, versions=versions(),
      config=dict(model=config.model.to_dict(), image_size=config.data.image_size,
                  channels=config.data.channels, schedule_steps=config.schedule.num_steps,
                  learning_rate=config.learning_rate, ema_decay=config.ema_decay),
      settings=dict(dataclasses.asdict(settings),
                    jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
                    jax_compilation_cache_dir=jax.config.jax_compilation_cache_dir,
                    torch_float32_matmul_precision=torch.get_float32_matmul_precision(),
                    torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    env={k: os.environ.get(k) for k in ENV_VARS}),
      flops=dict(analytic_forward_flops_per_img=analytic,
                 analytic_train_flops_per_img=3 * analytic, seed_unet=seed),
      train=train_rows, train_ratios=ratios, sampling=sample_rows, parity=parity,
      breakdown=dict(batch=settings.batch_sizes[0],
                     **{framework: next((r["breakdown"] for r in train_rows
                                         if r["framework"] == framework and "breakdown" in r),
                                        None) for framework in ("jax", "torch")}),
      peak_flops_table=PEAK_FLOPS,
      targets_applicable=applicable,
      targets=evaluate_targets(train_rows, ratios, sample_rows, applicable))


# --- Report ----------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
  return "–" if value is None else format(value * scale, spec)


def _times(value: float | None, spec: str = ".2f") -> str:
  return "–" if value is None else f"{value:{spec}}x"


def _mib(value: int | None) -> str:
  return _fmt(value, ".0f", 1 / 2**20)


def report(doc: dict) -> str:
  """The human summary: markdown tables."""
  d, v = doc["device"], doc["versions"]
  s = doc["settings"]
  lines = [
      f"device: {d['kind']} — {d['note']}; {d['cpu_count']} CPUs ({d['cpu']}), torch threads "
      f"{d['torch_threads']}; load average {d['load_average_start'][0]:.1f} at start, "
      f"{d['load_average_end'][0]:.1f} at end",
      f"versions: jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, optax {v['optax']}, "
      f"torch {v['torch']}, python {v['python']}",
      f"command: {doc['command']}", f"date: {doc['date']}",
      f"model: channels {tuple(doc['config']['model']['channels'])}, groups "
      f"{doc['config']['model']['num_groups']}, heads {doc['config']['model']['num_heads']}, "
      f"{doc['config']['image_size']}x{doc['config']['image_size']}x{doc['config']['channels']}"
      + (" — QUICK: CI-sized settings, not a measurement to quote" if s["quick"] else ""),
  ]
  if doc["train"]:
    lines += [
        "", f"Train step (Adam + EMA), img/s: median of {s['reps']} repetitions after "
        f"{s['warmup']} warm-up steps; torch rows are float32",
        "| framework | dtype | batch | img/s | ms/step | compile / first step s | "
        "XLA GFLOP/img | MFU | XLA peak MiB | device peak MiB | host peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in doc["train"]:
    name = "JAX jit" if r["framework"] == "jax" else f"torch {r['variant']}"
    if r["status"] != "ok":
      lines.append(f"| {name} | {r['dtype']} | {r['batch']} | {r['status']} "
                   "| | | | | | | |")
      continue
    mem = r["memory"]
    lines.append(
        f"| {name} | {r['dtype']} | {r['batch']} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | "
        f"{_fmt(r.get('compile_s', r.get('first_step_s')))} | "
        f"{_fmt(r.get('xla_train_flops_per_img'), '.3f', 1e-9)} | "
        f"{_fmt(r.get('mfu'), '.1%')} | "
        f"{_mib((mem.get('xla_bytes') or {}).get('peak'))} | "
        f"{_mib(mem['device_peak_bytes'])} | {_mib(mem['host_peak_rss_bytes'])} |")
  if doc["train_ratios"]:
    lines += ["", "| batch | JAX dtype | JAX / torch eager | JAX / torch.compile |",
              "|---|---|---|---|"]
  for r in doc["train_ratios"]:
    lines.append(f"| {r['batch']} | {r['dtype']} | {_times(r['jax_over_eager'])} | "
                 f"{_times(r['jax_over_compile'])} |")
  if doc["sampling"]:
    lines += ["", f"Sampling, img/s (median of {s['sample_reps']} calls after one warm-up; "
              "'timed' steps run, then scaled to the full count)",
              "| sampler | framework | dtype | batch | timed steps | img/s | s per batch | "
              "vs original |", "|---|---|---|---|---|---|---|---|"]
  for r in doc["sampling"]:
    timed = f"{r['timed_steps']} of {r['steps']}" + (" (scaled)" if r["scaled"] else "")
    lines.append(f"| {r['sampler']} | {r['framework']} | {r['dtype']} | {r['batch']} | "
                 f"{timed} | {r['img_per_s']:.2f} | {r['seconds_per_batch']:.2f} | "
                 f"{_times(r.get('speedup_over_original'), '.0f')} |")
  if doc.get("parity"):
    lines += ["", f"Parity on this device: the original's weights in both, batch "
              f"{doc['parity'][0]['batch']}, no dropout; JAX against torch float32 at the same "
              "precision ('default': as timed; 'highest': no TF32 on either side)",
              "| JAX dtype | precision | output max abs diff (output scale) | output rel L2 | "
              "loss JAX / torch | gradients rel L2 | worst parameter: max abs diff / max |",
              "|---|---|---|---|---|---|---|"]
  for r in doc.get("parity", []):
    lines.append(
        f"| {r['dtype']} | {r['precision']} | {r['output_max_abs_diff']:.2e} "
        f"({r['output_scale']:.2f}) | {r['output_rel_l2']:.2e} | {r['loss_jax']:.6f} / "
        f"{r['loss_torch']:.6f} | {r['grads_rel_l2']:.2e} | {r['worst_param']}: "
        f"{r['worst_param_max_abs_diff_over_max']:.2e} |")
  f = doc["flops"]
  seed = f["seed_unet"]
  xla = [r["xla_train_flops_per_img"] for r in doc["train"]
         if r["framework"] == "jax" and r.get("xla_train_flops_per_img")]
  lines += ["", "FLOPs per image (train = forward + backward):",
            f"  this model: analytic {f['analytic_train_flops_per_img'] / 1e9:.3f} GFLOP "
            f"(3 x forward {f['analytic_forward_flops_per_img'] / 1e9:.3f}); XLA compiled step "
            + (", ".join(f"{x / 1e9:.3f}" for x in xla) or "–") + " GFLOP"]
  if seed:  # Computed with the train rows.
    lines.append(
        f"  seed UNet 32x32: analytic {seed['analytic_train_flops_per_img'] / 1e9:.2f} GFLOP, "
        f"XLA (unoptimised HLO) {_fmt(seed['xla_lowered_train_flops_per_img'], '.2f', 1e-9)} "
        f"GFLOP, issue {seed['issue_train_flops_per_img'] / 1e9:.1f} GFLOP")
  copies = [f"{r['dtype']} batch {r['batch']}: {r['xla_copies']['count']} "
            f"({r['xla_copies']['bytes'] / 2**20:.0f} MiB)"
            for r in doc["train"] if r["framework"] == "jax" and r.get("xla_copies")]
  if copies:
    lines.append("  copy kernels XLA added to the JAX step (count, MiB written per step): "
                 + "; ".join(copies))
  mfu_peaks = {r["mfu_peak"]["name"] for r in doc["train"] if r.get("mfu_peak")}
  lines.append("  MFU: analytic train FLOPs x img/s / peak (" + (
      ", ".join(sorted(mfu_peaks)) if mfu_peaks else
      "–: reported on a GPU of the peak table only") + ")")
  b = doc["breakdown"]
  if b["jax"] and b["torch"]:
    j, t = b["jax"], b["torch"]
    lines += ["", f"Where the step time goes (float32, batch {b['batch']}, ms; JAX's backward "
              "is the rest of its fused step, torch's is timed alone):",
              "| part | JAX | torch eager |", "|---|---|---|",
              f"| forward + loss | {j['forward_ms']:.1f} | {t['forward_ms']:.1f} |",
              f"| backward | {j['backward_ms']:.1f} | {t['backward_ms']:.1f} |",
              f"| optimizer + EMA | {j['optimizer_ema_ms']:.1f} | "
              f"{t['optimizer_ms']:.1f} + {t['ema_ms']:.1f} |",
              f"| whole step | {j['step_ms']:.1f} | {t['step_ms']:.1f} |"]
    if j.get("update_variants"):
      in_step = all("step_ms" in v for v in j["update_variants"])
      lines += ["", "JAX's optimizer + EMA alone, written three ways (constant rate; GB/s of "
                f"its least memory traffic, {UPDATE_PASSES} x the parameter bytes)"
                + (", and the whole step with each in it:" if in_step else ":"),
                "| update | ms | GB/s |" + (" step ms |" if in_step else ""),
                "|---|---|---|" + ("---|" if in_step else "")]
      lines += [f"| {v['variant']} | {v['ms']:.2f} | {v['gb_per_s']:.0f} |"
                + (f" {v['step_ms']:.2f} |" if in_step else "")
                for v in j["update_variants"]]
    layouts = j.get("xla_layouts")
    if layouts:
      lines += ["", "The float32 step keeps its state in the layouts XLA picks: "
                f"{layouts['relaid_leaves']} of {layouts['leaves']} arrays not row-major" + (
                    f" ({layouts['relaid_bytes'] / 2**20:.0f} MiB); with all of them "
                    f"row-major it takes {layouts['row_major_step_ms']:.2f} ms a step "
                    f"against {j['step_ms']:.2f}, with "
                    f"{layouts['row_major_xla_copies']['count']} copy kernels writing "
                    f"{layouts['row_major_xla_copies']['bytes'] / 2**20:.0f} MiB"
                    if layouts["relaid_leaves"] else
                    " (all row-major: the default step's own program)")]
  profiled = next((r for r in doc["train"] if r.get("profile")), None)
  if profiled:
    lines += ["", f"JAX's {profiled['dtype']} step at batch {profiled['batch']} in a "
              "jax.profiler trace (ms of op time per step by phase, UNet module and op; "
              "on a CPU, ops on several threads each count):",
              profiled["profile"].get("error") or profiling.format_summary(profiled["profile"])]
  lines += ["", "Targets of the performance issue (GPU, configs/mnist.py)" + (
      ":" if doc["targets_applicable"] else
      " — not applicable to this run (not a GPU, or not the original UNET):")]
  for t in doc["targets"]:
    met = ({True: "met", False: "NOT met"}[t["met"]] if t["met"] is not None else
           "not measured" if t["measured"] is None else "")
    lines.append(f"  {t['name']}: {_fmt(t['measured'], '.3g')} (limit {t['limit']:g})"
                 + (f" {met}" if met else "") + (f" [{t['detail']}]" if t["detail"] else ""))
  return "\n".join(lines)


def config_path(argv: Sequence[str]) -> str | None:
  """The file named by ``--config FILE`` or ``--config=FILE`` (any ``:ARG`` dropped)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  path = config_path(argv)
  if path is None:
    raise UserError("--config is required, e.g. --config configs/mnist_tiny.py")
  if not os.path.isfile(path):
    raise UserError(f"config file {path} does not exist; e.g. --config configs/mnist_tiny.py")
  check_overrides_given_once(argv)
  fv = flags.FlagValues()
  define_flags(fv)
  try:
    rest = fv(argv)
    config = fv.config
    validate_config(config)  # The first use of the config: a file that failed raises here.
  except UserError:
    raise
  except flags.Error as e:
    raise UserError(" ".join(str(e).split())) from e
  except Exception as e:  # The config file and its overrides are user input.
    raise UserError(f"cannot load config file {path} with its overrides: "
                    f"{type(e).__name__}: {' '.join(str(e).split())}") from e
  if len(rest) > 1:
    raise UserError(f"unexpected argument {rest[1]!r}; every setting is a flag")
  if not fv.json:
    raise UserError("--json is required, e.g. --json bench.json")
  if not os.path.isdir(os.path.dirname(os.path.abspath(fv.json))):
    raise UserError(f"--json {fv.json}: its directory does not exist")
  settings = settings_from_flags(fv)
  if settings.ddim_steps > config.schedule.num_steps:
    raise UserError(f"--ddim_steps {settings.ddim_steps} is more than the schedule's "
                    f"{config.schedule.num_steps} steps")
  if torch is None:
    raise UserError("the bench needs torch: pip install torch==2.13.0")
  command = "python " + shlex.join(argv)

  def save(doc: dict) -> None:
    files.write_text_atomic(fv.json, json.dumps(doc, indent=1))

  doc = run_bench(config, settings, command, save)
  save(doc)
  print()
  print(report(doc))
  print(f"\nwrote {fv.json}")
  return 0


if __name__ == "__main__":
  run_cli(main)
