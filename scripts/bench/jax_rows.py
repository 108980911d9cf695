"""``ddpm_jax``'s rows: the train step, the loop's k-step program, the step's breakdown and
the batched samplers."""

from __future__ import annotations

import contextlib
import copy
import functools
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, profiling, sampling, train
from ddpm_jax.model import build_unet
from ddpm_jax.train_state import TrainState, apply_gradients, make_schedule, make_tx

from .flops import xla_flops
from .settings import PROFILE_STEPS, Settings
from .timing import Devices, host_memory, jax_device_peak, time_calls, xla_memory


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


def bench_images(config: ml_collections.ConfigDict, batch: int,
                 sharding: jax.sharding.Sharding) -> jax.Array:
  """The batch every train row steps on, the same in each row: uniform images."""
  return jax.device_put(
      jax.random.uniform(jax.random.PRNGKey(1), (batch,) + image_shape(config)), sharding)


def copy_state(state: TrainState) -> TrainState:
  """A copy of ``state`` in buffers of its own: the train step donates the one it takes."""
  return jax.tree.map(lambda a: a.copy(), state)


def jax_train(config: ml_collections.ConfigDict, dtype: str, batch: int,
              initial: TrainState, devices: Devices, settings: Settings,
              breakdown: bool, profile: bool = False, mesh: Mesh | None = None) -> dict:
  """The jitted train step's row, from a copy of ``initial`` (the step donates its state);
  with ``breakdown``, also its forward and optimizer+EMA alone; with ``profile``, its op
  time in a profiler trace (:mod:`ddpm_jax.profiling`). ``mesh``: the batch split over
  its devices (the state replicated), as the training loop runs on several; the row's
  variant names their count. Default: the one device of ``devices``."""
  config = with_settings(config, batch, dtype)
  variant = "jit" if mesh is None else f"jit, {mesh.size} CPU devices"
  mesh = devices.mesh if mesh is None else mesh
  state = jax.device_put(copy_state(initial), NamedSharding(mesh, P()))
  x = bench_images(config, batch, NamedSharding(mesh, P("data")))
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
  row = dict(framework="jax", variant=variant, dtype=dtype, batch=batch, status="ok",
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


def jax_breakdown(config: ml_collections.ConfigDict, state: TrainState, x: jax.Array,
                  step_s: float, settings: Settings) -> dict:
  """Forward (loss, train mode) and optimizer+EMA of the train step timed alone, each a
  plain jit; backward is the rest of ``step_s``."""
  # The parts alone are plain jits, which take JAX's default (row-major) layouts: their
  # copy of the state is moved there, whatever layouts the step keeps it in.
  state = jax.device_put(state, train.row_major_formats(state), may_alias=False)
  apply_fn = build_unet(config.model).apply
  schedule = make_schedule(config)
  loss = functools.partial(diffusion.loss, **train.loss_options(config))
  forward = jax.jit(lambda p, x, rng: loss(p, apply_fn, schedule, x, rng))
  update = jax.jit(functools.partial(apply_gradients, tx=make_tx(config),
                                     ema_decay=config.ema_decay,
                                     ema_warmup=config.get("ema_warmup", False)),
                   donate_argnums=(0,))
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
              optimizer_ema_ms=1e3 * update_s)


def loop_program_rows(config: ml_collections.ConfigDict, dtype: str, batch: int,
                      initial: TrainState, devices: Devices, settings: Settings) -> list[dict]:
  """The training loop's own program, :func:`ddpm_jax.train.compile_train_steps`, timed
  for each k of ``settings.loop_steps_per_call``: k steps a call in one ``lax.scan`` (also
  on a CPU, whose loop runs the plain step instead: the row shows why).

  Its data set on the device is the train rows' one batch, and every step gathers all of
  it, so each step computes what the single step's row does; the state stays in the
  formats the first k's compilation chose, as the loop keeps it. What differs from the
  single step is what a call costs the host (dispatch, launches), paid once per k steps.
  A row per k: ms and img/s per step, and the whole call's timing.
  """
  config = with_settings(config, batch, dtype)
  mesh = devices.mesh
  replicated = NamedSharding(mesh, P())
  images = bench_images(config, batch, replicated)
  state, formats, rows = copy_state(initial), None, []
  for k in settings.loop_steps_per_call:
    indices = jax.device_put(np.tile(np.arange(batch, dtype=np.int32), (k, 1)), replicated)
    start = time.perf_counter()
    compiled, formats = train.compile_train_steps(config, mesh, state, images, k, formats,
                                                  scan=True)
    compile_s = time.perf_counter() - start
    state = jax.device_put(state, formats)

    def run(compiled=compiled, indices=indices):
      nonlocal state
      state, _ = compiled(state, images, indices)
      return state

    timing = time_calls(run, jax.block_until_ready, settings.reps, settings.warmup,
                        settings.min_rep_s)
    step_s = timing.median / k
    rows.append(dict(framework="jax", program="train.compile_train_steps", dtype=dtype,
                     batch=batch, steps_per_call=k, img_per_s=batch / step_s,
                     step_ms=1e3 * step_s, call_ms=1e3 * timing.median,
                     timing=timing.to_json(), compile_s=compile_s,
                     xla_copies=profiling.copy_instructions(compiled.as_text())))
  return rows


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
    timed_config = copy.deepcopy(config)
    timed_config.schedule.num_steps = timed
    schedule = make_schedule(timed_config)
    fn = jax.jit(lambda p, rng: sampling.ddpm_sample(apply_fn, p, schedule, rng, shape,
                                                     sampling.strip_times(timed)))
  else:
    schedule = make_schedule(config)
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
