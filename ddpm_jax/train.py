"""Training: ``python -m ddpm_jax.train --config configs/mnist.py --workdir runs/mnist``.

The original's objective and optimiser (MSE on the noise, Adam, an EMA of the weights) as
one jitted, data-parallel step: the global batch is split over every device on a ``data``
mesh axis and the state is replicated. Everything random in a step comes from
``fold_in(rng, step)`` and each batch is a pure function of ``(seed, step)``, so a run
resumed from a checkpoint continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import json
import logging
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoint, convert, data, diffusion, files, images, profiling, sampling
from ddpm_jax.config_checks import (check_overrides_given_once, check_resume_compatible,
                                    flatten_config, validate_config)
from ddpm_jax.errors import UserError, run_cli
from ddpm_jax.model import build_unet
from ddpm_jax.schedule import Schedule, linear_schedule
from ddpm_jax.train_state import TrainState, apply_gradients, learning_rate_at, make_optimizer

# Steps of a run (or of a resumed run) before config.profile_steps are traced: compilation
# and the first steps' warm-up stay out of the profile.
PROFILE_AFTER_STEPS = 5


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  return linear_schedule(**config.schedule)


def lr_decay_steps(config: ml_collections.ConfigDict) -> int:
  """The step where a cosine ``lr_schedule`` reaches 0 (the run's last), else 0 (no decay).

  Read with a default: a workdir written before the key existed trained at a constant rate.
  """
  return config.num_train_steps if config.get("lr_schedule", "constant") == "cosine" else 0


def make_tx(config: ml_collections.ConfigDict):
  return make_optimizer(config.learning_rate, config.warmup_steps, config.grad_clip_norm,
                        decay_steps=lr_decay_steps(config))


def _init_state(config: ml_collections.ConfigDict) -> TrainState:
  model = build_unet(config.model)
  rng = jax.random.PRNGKey(config.seed)
  size, channels = config.data.image_size, config.data.channels
  params = model.init(jax.random.fold_in(rng, -1 % 2**31),
                      jnp.zeros((1, size, size, channels), jnp.float32),
                      jnp.zeros((1,), jnp.int32))["params"]
  tx = make_tx(config)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.array, params), rng=rng)


def create_train_state(config: ml_collections.ConfigDict,
                       sharding: jax.sharding.Sharding | None = None) -> TrainState:
  """A fresh train state for ``config`` (params from ``config.seed``), on ``sharding``."""
  device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
  # The init runs once, and XLA's CPU backend spends most of its compilation optimizing
  # the ~1,000 small random-number kernels: LLVM at -O1 compiles the original UNET's init
  # in 5.4 s instead of 13.1 s on 2 cores, to the same bits (-O0 changes some in the last
  # place). Other backends keep their defaults.
  options = {"xla_backend_optimization_level": 1} if device.platform == "cpu" else None
  return jax.jit(functools.partial(_init_state, config), out_shardings=sharding,
                 compiler_options=options)()


def state_from_torch_checkpoint(config: ml_collections.ConfigDict, path: str,
                                sharding: jax.sharding.Sharding | None = None) -> TrainState:
  """The train state the original's checkpoint holds: its weights, EMA, Adam moments and
  step count (the warm-up schedule's count too), with ``config``'s seed; on ``sharding``."""
  params, ema_params, adam = convert.load_torch_training_state(path, build_unet(config.model))
  count = adam.count

  def restored(s):
    if isinstance(s, optax.ScaleByAdamState):
      return adam
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=count)
    return s

  opt_state = jax.tree.map(restored, make_tx(config).init(params),
                           is_leaf=lambda s: isinstance(s, (optax.ScaleByAdamState,
                                                            optax.ScaleByScheduleState)))
  state = TrainState(step=count, params=params, opt_state=opt_state, ema_params=ema_params,
                     rng=jax.random.PRNGKey(config.seed))
  # One buffer per leaf: the step count appears three times, and the step donates them all.
  return jax.device_put(jax.tree.map(jnp.array, state), sharding)


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """Shapes and dtypes of the train state, for restoring a checkpoint."""
  return jax.eval_shape(functools.partial(_init_state, config))


def train_step(state: TrainState, batch: jax.Array, *, apply_fn, schedule: Schedule,
               update: Callable[[TrainState, Any], TrainState],
               skip_nonfinite: bool) -> tuple[TrainState, dict]:
  """One step: the original's loss on ``batch``, then ``update(state, grads)`` (Adam, the
  EMA and the step count: :func:`~ddpm_jax.train_state.apply_gradients`); rngs from
  ``fold_in(step)``.

  ``finite`` says the loss and every gradient were finite; with ``skip_nonfinite`` a step
  where they were not leaves the state as it was, except for the step count.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  loss, grads = jax.value_and_grad(diffusion.loss)(state.params, apply_fn, schedule, batch, rng)
  new_state = update(state, grads)
  finite = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda g: jnp.isfinite(g).all(), grads),
                           jnp.isfinite(loss))
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = kept.replace(step=state.step + 1)
  return new_state, {"loss": loss, "finite": finite}


def sample_grid_path(workdir: str | os.PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / checkpoint.SAMPLES / f"step_{step:07d}.png"


def make_sample_grid_writer(config: ml_collections.ConfigDict
                            ) -> Callable[[Any, pathlib.Path], None]:
  """``write(ema_params, path)``: a grid of ``config.sample_num_images`` EMA samples.

  Deterministic DDIM (eta 0) with ``config.sample_num_steps`` steps from the noise of
  ``fold_in(key(seed), -2)``: the same starting noise at every step of the run, so the
  grids show one set of samples improving. Images are not clipped (as the original).
  Made once per run: the sampler is compiled for its ``apply_fn``, so every grid of the
  run reuses one compilation.
  """
  apply_fn = build_unet(config.model).apply
  schedule = make_schedule(config)
  size, channels = config.data.image_size, config.data.channels
  shape = (config.sample_num_images, size, size, channels)
  rng = jax.random.fold_in(jax.random.key(config.seed), -2 % 2**31)

  def write(ema_params: Any, path: pathlib.Path) -> None:
    x, _ = sampling.ddim_sample(apply_fn, ema_params, schedule, rng, shape,
                                config.sample_num_steps, snapshot_times=())
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, lambda f: images.save_grid(f, np.asarray(x), config.data.range))
  return write


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def train_step_fn(config: ml_collections.ConfigDict, update: Callable | None = None
                  ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``: :func:`train_step` with ``config``'s
  model, schedule, optimizer, EMA and ``nan_policy``, not yet jitted. ``update`` replaces
  the optimizer and EMA update (the bench times others written the same way)."""
  if update is None:
    update = functools.partial(apply_gradients, tx=make_tx(config), ema_decay=config.ema_decay)
  return functools.partial(
      train_step, apply_fn=build_unet(config.model).apply, schedule=make_schedule(config),
      update=update, skip_nonfinite=config.nan_policy == "skip")


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh):
  """The jitted step: state replicated and donated, batch split on the ``data`` axis,
  every array in JAX's default (row-major) layout. The loop runs it compiled by
  :func:`compile_train_step`, with the state in the layouts XLA picks."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step_fn(config),
                 in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def row_major_formats(tree: Any) -> Any:
  """A ``Format`` per array of ``tree``: row-major (JAX's default layout), same sharding."""
  return jax.tree.map(
      lambda a: Format(Layout(major_to_minor=tuple(range(a.ndim))), a.sharding), tree)


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, state: Any, batch: Any,
                       formats: Any = None, update: Callable | None = None
                       ) -> tuple[jax.stages.Compiled, Any]:
  """:func:`make_train_step` compiled for ``state`` and ``batch`` (arrays or
  ``ShapeDtypeStruct``), with the state kept on the device in XLA's own layouts.

  JAX lays every array out row-major unless told otherwise, and a GPU's convolutions want
  their kernels in another order: the row-major step transposes each kernel of the params,
  both Adam moments and the EMA on every step (0.9 ms of 14.2 at float32 batch 64 on an
  H100). Compiled with ``Layout.AUTO`` for the state, XLA picks layouts for it instead; a
  CPU keeps every array row-major. The step takes and gives back its state in one format
  per leaf, returned with it (``formats``: given instead of chosen, for tests): move the
  state into them once, ``jax.device_put(state, formats)``. The values and everything read
  from the arrays (checkpoints, samples) are the same in any layout. ``update``: as
  :func:`train_step_fn`'s.
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  # Shapes only: a jax.Array has a layout already, which jit checks against the formats.
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)

  def compile_with(state_formats):
    return jax.jit(train_step_fn(config, update),
                   in_shardings=(state_formats, batch_sharding),
                   out_shardings=(state_formats, replicated),
                   donate_argnums=(0,)).lower(abstract, batch).compile()

  if formats is not None:
    return compile_with(formats), formats
  try:
    compiled = compile_with(Format(Layout.AUTO, replicated))
  except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
    # A backend that cannot choose layouts: JAX's own (an error of the step itself
    # comes back from this compilation too).
    formats = row_major_formats(abstract)
    return compile_with(formats), formats
  (formats, _), _ = compiled.input_formats
  returned, _ = compiled.output_formats
  if any(f.layout != g.layout for f, g in zip(jax.tree.leaves(formats),
                                              jax.tree.leaves(returned))):
    compiled = compile_with(formats)  # A step that loops gives back what it takes.
  return compiled, formats


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when a multi-process launch is described by the env.

  Set ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``; or run under SLURM / Open MPI, whose variables JAX reads itself.
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(
      os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()


class _StopSignal:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Metrics:
  """Collects per-step device metrics and writes ``metrics.jsonl`` lines (process 0)."""

  def __init__(self, path: pathlib.Path, batch_size: int, config: ml_collections.ConfigDict,
               write: bool, resumed_from: int | None = None):
    self._path, self._batch_size, self._config, self._write = path, batch_size, config, write
    # Marks the first line after a resume: lines after it supersede earlier ones of the
    # same steps (``checkpoint.read_metrics``).
    self._resumed_from = resumed_from
    if write and path.is_file() and path.stat().st_size:
      # A line cut short by a kill is ended, not extended.
      with self._writing(), open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          f.write(b"\n")
    self._pending: list[tuple[int, dict]] = []
    self._unlogged: list[float] = []  # Fetched losses of the steps since the last line.
    self._last_time = time.perf_counter()
    self._last_step: int | None = None
    self.epoch_losses: list[float] = []

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed write of the metrics file into a one-line error."""
    try:
      yield
    except OSError as e:
      raise UserError(f"cannot write {self._path} ({e.strerror or e}); the checkpoints "
                      "written so far are kept") from e

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def reset_clock(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` spent on something else (sampling) out of the next ``img_per_s``."""
    self._last_time += seconds

  def flush(self) -> int | None:
    """Fetches pending metrics, keeping their losses for the next line; returns the first
    step whose loss was not finite, if any."""
    fetched = jax.device_get(self._pending)
    self._pending = []
    losses = [float(m["loss"]) for _, m in fetched]
    bad = [s for s, m in fetched if not bool(m["finite"])]
    self._unlogged.extend(losses)
    self.epoch_losses.extend(l for l in losses if np.isfinite(l))
    return bad[0] if bad else None

  @property
  def unlogged(self) -> bool:
    """Whether steps were fetched since the last line."""
    return bool(self._unlogged)

  def log(self, step: int) -> dict:
    """Writes step's line: the mean finite loss of every step since the previous line."""
    now = time.perf_counter()
    losses, self._unlogged = self._unlogged, []
    steps = step - (self._last_step if self._last_step is not None else step - len(losses))
    finite = [l for l in losses if np.isfinite(l)]
    # The rate of the update that made ``step``: optax's schedule reads the count before it.
    lr = learning_rate_at(step - 1, self._config.learning_rate, self._config.warmup_steps,
                          lr_decay_steps(self._config))
    record = dict(step=step, loss=float(np.mean(finite)) if finite else float("nan"), lr=lr,
                  img_per_s=steps * self._batch_size / max(now - self._last_time, 1e-9),
                  time=time.time())
    if self._resumed_from is not None:
      record["resumed_from"], self._resumed_from = self._resumed_from, None
    self._last_time, self._last_step = now, step
    if self._write:
      with self._writing(), open(self._path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _num_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


def _check_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses, before anything is written, a workdir whose entries are of the wrong kind (a
  file named ``checkpoints``, a directory named ``metrics.jsonl``) or whose config the
  run cannot resume with."""
  entries = {checkpoint.CHECKPOINTS: True, checkpoint.METRICS_FILE: False,
             checkpoint.CONFIG_FILE: False}
  if config.sample_every_steps:  # Entries only a run that writes them needs.
    entries[checkpoint.SAMPLES] = True
  if config.profile_steps:
    entries[checkpoint.PROFILE] = True
  for name, is_dir in entries.items():
    path = workdir / name
    if path.exists() and path.is_dir() != is_dir:
      want, got = ("directory", "file") if is_dir else ("file", "directory")
      raise UserError(f"{path} is a {got}, not a {want}; move it away or use another --workdir")
  if (workdir / checkpoint.CONFIG_FILE).is_file():
    saved = checkpoint.read_config(workdir)
    check_resume_compatible(saved, config)
    checkpoints = workdir / checkpoint.CHECKPOINTS
    if saved.get("seed") != config.seed and checkpoints.is_dir() and any(checkpoints.iterdir()):
      print(f"note: {workdir} was trained with seed {saved.get('seed')}; resuming with seed "
            f"{config.seed}, the checkpoint's noise key carries on and the batches follow seed "
            f"{config.seed}, so the run is neither seed's uninterrupted run",
            file=sys.stderr, flush=True)


def _create_workdir(workdir: pathlib.Path) -> None:
  """Creates the workdir (and its parents); refuses one this process cannot write in."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create workdir {workdir}: {e.strerror}") from e
  if not os.access(workdir, os.W_OK):
    raise UserError(f"workdir {workdir} is not writable")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the run in ``workdir`` to the configured number of steps."""
  mesh = make_mesh()
  validate_config(config, num_devices=mesh.size)
  if config.init_torch_checkpoint and not os.path.isfile(config.init_torch_checkpoint):
    raise UserError(f"init_torch_checkpoint {config.init_torch_checkpoint} is not a file; give "
                    "the original's checkpoint, e.g. checkpoints/ddpm_checkpoint")
  workdir = pathlib.Path(workdir)
  _check_workdir(config, workdir)
  replicated = NamedSharding(mesh, P())
  # A new workdir starting from the original's checkpoint is created only once that file
  # has been read and found to fit the model: a refused one leaves no workdir behind.
  from_torch = None
  if config.init_torch_checkpoint and not (workdir / checkpoint.CONFIG_FILE).is_file():
    from_torch = state_from_torch_checkpoint(config, config.init_torch_checkpoint, replicated)
  images, _ = data.load_dataset(config.data, "train")
  images = data.preprocess(images, config.data.image_size, config.data.range)
  if len(images) < config.batch_size:  # Said before anything compiles.
    raise UserError(f"the data set has {len(images)} images, fewer than one batch of "
                    f"{config.batch_size}; lower batch_size")
  _create_workdir(workdir)

  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  try:
    # Unreadable steps newer than the one restored are set aside: this run writes them again.
    # The checkpoint's Adam state goes into this config's optimizer, whatever clipping,
    # warm-up or decay wrote it.
    abstract = checkpoint.with_sharding(abstract_train_state(config), replicated)
    found = checkpoint.restore_latest(mngr, abstract, set_aside=True)
    if found is None and config.init_torch_checkpoint:
      state = from_torch if from_torch is not None else state_from_torch_checkpoint(
          config, config.init_torch_checkpoint, replicated)
      start_step = int(state.step)
      print(f"Starting {workdir} from the PyTorch checkpoint {config.init_torch_checkpoint} "
            f"at step {start_step}", flush=True)
    elif found is None:
      state, start_step = create_train_state(config, replicated), 0
    else:
      start_step, state, _ = found
      print(f"Resuming {workdir} from step {start_step}", flush=True)
    # Written once the state is in hand: a resume refused until here leaves the config that
    # describes the workdir's checkpoints.
    if jax.process_index() == 0:
      files.write_text_atomic(workdir / checkpoint.CONFIG_FILE, checkpoint.config_to_json(config))
    return _train(config, workdir, mngr, images, state, start_step, found is not None, mesh)
  finally:
    # Waits for a save still running when an error came (its own error, if any, is dropped).
    with contextlib.suppress(Exception):
      mngr.wait_until_finished()
    mngr.close()


def run_summary(config: ml_collections.ConfigDict, params: Any, mesh: Mesh, start_step: int,
                total: int, steps_per_epoch: int, num_images: int) -> str:
  """One line saying what the run trains, where, for how long and how."""
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  m = config.model
  devices = f"{mesh.size} {mesh.devices.flat[0].platform} device{'s' * (mesh.size > 1)}"
  if jax.process_count() > 1:
    devices += f" in {jax.process_count()} processes"
  rate = f"Adam lr {config.learning_rate:g}"
  if config.warmup_steps:
    rate += f" (warm-up {config.warmup_steps} steps)"
  if lr_decay_steps(config):
    rate += ", cosine decay to 0"
  return (f"UNet {tuple(m.channels)}: {num_params:,} parameters, {m.dtype} compute, on "
          f"{devices}; batch {config.batch_size}, steps {start_step} -> {total} "
          f"({total / steps_per_epoch:.3g} epochs of {num_images:,} images); {rate}, "
          f"EMA {config.ema_decay:g}")


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
           mngr: ocp.CheckpointManager, images: np.ndarray, state: TrainState, start_step: int,
           found: bool, mesh: Mesh) -> TrainState:
  """The loop: steps, metrics, checkpoints, until ``num_train_steps`` or a stop signal."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  is_main = jax.process_index() == 0
  batch_sharding = NamedSharding(mesh, P("data"))
  batches = data.BatchIterator(images, config.batch_size, config.seed, start_step=start_step,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
  total = _num_steps(config, batches.steps_per_epoch)
  metrics = _Metrics(workdir / checkpoint.METRICS_FILE, config.batch_size, config, is_main,
                     resumed_from=start_step if found else None)
  global_shape = (config.batch_size,) + images.shape[1:]
  if is_main:
    print(run_summary(config, state.params, mesh, start_step, total, batches.steps_per_epoch,
                      len(images)), flush=True)
  step_fn, formats = compile_train_step(
      config, mesh, state, jax.ShapeDtypeStruct(global_shape, images.dtype,
                                                sharding=batch_sharding))
  state = jax.device_put(state, formats)

  pending = None  # The step whose checkpoint is still being written in the background.
  saved = start_step if found else None  # The newest step this run saved or restored.

  def finish_save() -> None:
    nonlocal pending
    if pending is not None:
      saving, pending = pending, None
      checkpoint.finish(mngr, saving)

  def save(step: int) -> None:
    nonlocal pending, saved
    finish_save()
    checkpoint.save(mngr, step, state, {"step": step, "epoch": step // batches.steps_per_epoch})
    pending = saved = step

  write_grid = make_sample_grid_writer(config)

  def sample(step: int) -> None:
    """The step's sample grid when one is due, unless a run killed after writing it did."""
    if not config.sample_every_steps or step % config.sample_every_steps:
      return
    path = sample_grid_path(workdir, step)
    if is_main and not path.exists():
      start_time = time.perf_counter()
      # This process's copy of the replicated params: sampling runs on its devices only.
      write_grid(jax.tree.map(lambda a: a.addressable_data(0), state.ema_params), path)
      metrics.exclude(time.perf_counter() - start_time)
      bar.write(f"Step {step} | samples -> {path}")

  def check_finite(step: int, bad_step: int | None) -> None:
    if bad_step is not None and config.nan_policy == "stop":
      finish_save()
      last = mngr.latest_step()
      kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
          "no checkpoint was written"
      raise UserError(f"the loss or its gradient is not finite at step {bad_step} (stopped at "
                      f"step {step}); {kept}; lower learning_rate, set grad_clip_norm, or set "
                      "--config.nan_policy=skip to skip such steps")

  # Process 0 traces config.profile_steps steps once compilation and warm-up are behind.
  profile = (profiling.LoopProfile(workdir / checkpoint.PROFILE, start_step + PROFILE_AFTER_STEPS,
                                   config.profile_steps)
             if config.profile_steps and is_main else None)

  def report_profile(step: int) -> None:
    start_time = time.perf_counter()
    first = profile.first + 1
    try:
      summary = profile.stop(step, state, step_fn.as_text)  # The ops' names.
      report = profiling.format_summary(summary)
    except (OSError, ValueError, KeyError) as e:  # A trace it cannot read never stops a run.
      report = f"its summary failed ({type(e).__name__}: {e}); the trace itself is there"
    metrics.exclude(time.perf_counter() - start_time)
    bar.write(f"Step {step} | profile of steps {first}..{step} -> {profile.logdir}\n{report}")

  bar = tqdm(total=total, initial=start_step, disable=not is_main, dynamic_ncols=True,
             unit="step", file=sys.stderr)
  step = start_step
  try:
    if step > 0:
      sample(step)  # A run killed between the checkpoint and its samples.
    metrics.reset_clock(step)
    with batches, _StopSignal() as stop:
      while step < total and stop.received is None:
        local = next(batches)
        if jax.process_count() == 1:
          batch = jax.device_put(local, batch_sharding)
        else:
          batch = jax.make_array_from_process_local_data(batch_sharding, local, global_shape)
        if profile is not None:
          profile.before_step(step)
        state, step_metrics = step_fn(state, batch)
        step += 1
        metrics.add(step, step_metrics)
        bar.update(1)
        if profile is not None and profile.due(step):
          report_profile(step)
        end_of_epoch = step % batches.steps_per_epoch == 0
        if step % config.log_every_steps == 0 or step == total or end_of_epoch or \
            step % config.checkpoint_every_steps == 0:
          check_finite(step, metrics.flush())
          if step % config.log_every_steps == 0 or step == total:
            record = metrics.log(step)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
          if end_of_epoch and is_main:
            epoch = step // batches.steps_per_epoch
            epoch_loss = (float(np.mean(metrics.epoch_losses)) if metrics.epoch_losses
                          else float("nan"))
            bar.write(f"Epoch {epoch} | Loss {epoch_loss:.5f}")
            metrics.epoch_losses = []
        if step % config.checkpoint_every_steps == 0 and step < total:
          save(step)
        sample(step)
      if profile is not None and profile.active:  # A run shorter than its profile.
        report_profile(step)
      check_finite(step, metrics.flush())
      if metrics.unlogged:
        metrics.log(step)
      if step != saved:  # A stop signal can land on a step the loop just saved.
        save(step)
      finish_save()
  finally:
    if profile is not None:
      profile.abort()
    bar.close()
  if stop.received is not None:
    print(f"Stopped by {stop.received} at step {step}; checkpoint saved in {workdir}. "
          "Run the same command again to resume.", flush=True)
  elif is_main:
    print(f"Trained to step {step}; checkpoints in {workdir / checkpoint.CHECKPOINTS}. "
          f"Sample: python -m ddpm_jax.sample --workdir {workdir} --out samples.png",
          flush=True)
  return state


USAGE = """\
usage: python -m ddpm_jax.train --config FILE --workdir DIR [--config.KEY=VALUE ...]

Trains the UNet of FILE's config (configs/mnist.py: the original's settings;
configs/mnist_tiny.py: the CPU demo) into DIR, or resumes DIR from its latest checkpoint.

  --config FILE        a config file; every key and its default: ddpm_jax/config_defaults.py
  --workdir DIR        the run: DIR/checkpoints/, DIR/metrics.jsonl, DIR/config.json
  --config.KEY=VALUE   overrides a key, e.g. --config.num_train_steps=1000 or
                       --config.model.channels='(16,32,64,128,128,96)'
  -h, --help           this message
"""


def _wants_help(argv: list[str]) -> bool:
  """Whether ``argv`` asks for the usage (``-h`` or ``--help`` before any ``--``)."""
  flags = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(arg in ("-h", "--help") for arg in flags)


def _config_file_arg(argv: list[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (``--config=FILE`` or ``--config FILE``)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error(error: Exception) -> str:
  """absl's message for a bad flag, without the traceback ml_collections puts in some."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    text = f"{text.split(':', 1)[0]}: {text.strip().splitlines()[-1]}"
  return " ".join(text.split())


def _unknown_key(error: LookupError | AttributeError, argv: list[str], path: str) -> str | None:
  """Names the ``--config.KEY`` override whose key the config does not have, if any."""
  arg = error.args[0] if error.args else ""
  if isinstance(arg, LookupError):  # ml_collections wraps the KeyError in an AttributeError.
    arg = arg.args[0] if arg.args else ""
  key = (str(arg).splitlines() or [""])[0].strip("'\"")
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  override = next((o for o in overrides if key in o.split(".")), None)
  if override is None:
    return None
  try:
    known = list(flatten_config(_load_config_file(path)))
  except Exception:  # pylint: disable=broad-except  # Only for the hint.
    known = []
  close = difflib.get_close_matches(override, known, n=1)
  hint = f"did you mean --config.{close[0]}?" if close else f"the keys are those in {path}"
  return f"unknown config key {override!r} in --config.{override}; {hint}"


def _load_config_file(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("ddpm_jax_user_config", path.split(":", 1)[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _parse_flags(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
  """``(config, workdir)`` from the command line; :class:`UserError` for a bad one."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  path = _config_file_arg(argv)
  if path is None:
    raise UserError("--config is required, e.g. --config configs/mnist.py")
  if not os.path.isfile(path.split(":", 1)[0]):
    raise UserError(f"config file {path.split(':', 1)[0]} does not exist; e.g. "
                    "--config configs/mnist.py")
  check_overrides_given_once(argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/mnist.py.",
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.",
                      flag_values=flag_values)
  try:
    rest = flag_values(argv)
    config = flag_values.config
  except flags.Error as e:
    raise UserError(_flag_error(e)) from e
  except Exception as e:  # The config file is user code: report its error in one line.
    message = _unknown_key(e, argv, path) if isinstance(e, (LookupError, AttributeError)) else None
    overrides = " with its --config.KEY=VALUE overrides" if "--config." in " ".join(argv) else ""
    raise UserError(message or f"cannot load config file {path}{overrides}: "
                    f"{type(e).__name__}: {' '.join(str(e).split())}") from e
  if len(rest) > 1:
    raise UserError(f"unexpected argument {rest[1]!r}: every setting is a flag, e.g. "
                    "--workdir DIR or --config.batch_size=64")
  if not flag_values.workdir:
    raise UserError("--workdir is required, e.g. --workdir runs/mnist")
  return config, flag_values.workdir


def _ignore_closed_event_loop(unraisable) -> None:
  """Drops the "Event loop is closed" errors that a failed orbax read's coroutines raise
  when they are collected at exit (seen once as 2,000 lines after a one-line warning)."""
  if isinstance(unraisable.exc_value, RuntimeError) and \
      "Event loop is closed" in str(unraisable.exc_value):
    return
  sys.__unraisablehook__(unraisable)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  if _wants_help(argv):
    print(USAGE, end="")
    return 0
  config, workdir = _parse_flags(argv)
  # Orbax logs each failed checkpoint read or write with tracebacks; the one-line reports
  # of ``checkpoint`` replace them on the command line.
  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  sys.unraisablehook = _ignore_closed_event_loop
  maybe_initialize_distributed()
  train_and_evaluate(config, workdir)
  return 0


if __name__ == "__main__":
  run_cli(main)
