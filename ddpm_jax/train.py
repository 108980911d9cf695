"""Training: ``python -m ddpm_jax.train --config configs/mnist.py --workdir runs/mnist``.

The original's objective and optimiser (MSE on the noise, Adam, an EMA of the weights) as
one jitted, data-parallel step: the global batch is split over every device on a ``data``
mesh axis and the state is replicated. The data set lives on the devices and each call
of the compiled program runs up to ``steps_per_call`` steps in a ``lax.scan``, gathering
each step's batch there from indices the host sends, so neither batches nor Python
dispatch cross from the host every step. Everything random in a step comes from
``fold_in(rng, step)`` and each batch is a pure function of ``(seed, step)``
(:class:`~ddpm_jax.data.BatchIterator`'s order), so a run resumed from a checkpoint
continues bit for bit as if it had never stopped, whatever ``steps_per_call``.
"""

from __future__ import annotations

import contextlib
import functools
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
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoint, cli, convert, data, diffusion, files
from ddpm_jax.config_checks import validate_config
from ddpm_jax.errors import UserError, run_cli
from ddpm_jax.hooks import Profile, SampleGrids, sample_grid_path  # pylint: disable=unused-import
from ddpm_jax.metrics import MetricsWriter
from ddpm_jax.model import build_unet
from ddpm_jax.schedule import Schedule
from ddpm_jax.train_state import (TrainState, abstract_train_state, apply_gradients,  # pylint: disable=unused-import
                                  create_train_state, lr_decay_steps, make_schedule, make_tx,
                                  state_from_torch)

# Steps per call of the compiled loop when config.steps_per_call is 0, by platform: on a
# GPU the host's dispatch and kernel launches are paid once per call (BENCHMARKS.md). A
# CPU runs one step a call (runs_in_scan).
DEFAULT_STEPS_PER_CALL = {"gpu": 50, "cuda": 50, "rocm": 50, "tpu": 50}


def loss_options(config: ml_collections.ConfigDict) -> dict:
  """The recipe keys of ``config`` that :func:`diffusion.loss` takes (those it has: a
  workdir written before a key existed trained with its default)."""
  keys = ("objective", "loss_weighting", "min_snr_gamma")
  return {k: config[k] for k in keys if k in config}


def train_step(state: TrainState, batch: jax.Array, *, loss_fn: Callable, apply_fn,
               schedule: Schedule, update: Callable[[TrainState, Any], TrainState],
               skip_nonfinite: bool) -> tuple[TrainState, dict]:
  """One step: ``loss_fn`` (the original's loss, or a recipe's) on ``batch``, then
  ``update(state, grads)`` (Adam, the EMA and the step count:
  :func:`~ddpm_jax.train_state.apply_gradients`); rngs from ``fold_in(step)``.

  ``finite`` says the loss and every gradient were finite; with ``skip_nonfinite`` a step
  where they were not leaves the state as it was, except for the step count. ``batch`` is
  the images, or ``(images, labels)`` for a class-conditional model.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  extra = {}
  if isinstance(batch, tuple):
    batch, extra["labels"] = batch
  loss, grads = jax.value_and_grad(loss_fn)(state.params, apply_fn, schedule, batch, rng,
                                            **extra)
  new_state = update(state, grads)
  finite = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda g: jnp.isfinite(g).all(), grads),
                           jnp.isfinite(loss))
  if skip_nonfinite:
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = kept.replace(step=state.step + 1)
  return new_state, {"loss": loss, "finite": finite}


def train_step_fn(config: ml_collections.ConfigDict
                  ) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
  """``step(state, batch) -> (state, metrics)``: :func:`train_step` with ``config``'s
  model, schedule, loss, optimizer, EMA and ``nan_policy``, not yet jitted. A
  class-conditional model (``model.num_classes > 0``) takes ``(images, labels)`` batches
  and drops ``label_dropout`` of the labels."""
  update = functools.partial(apply_gradients, tx=make_tx(config), ema_decay=config.ema_decay,
                             ema_warmup=config.get("ema_warmup", False))
  options = loss_options(config)
  if config.model.get("num_classes", 0) > 0:
    options["label_dropout"] = config.get("label_dropout", 0.1)
  return functools.partial(
      train_step, loss_fn=functools.partial(diffusion.loss, **options),
      apply_fn=build_unet(config.model).apply, schedule=make_schedule(config), update=update,
      skip_nonfinite=config.nan_policy == "skip")


def train_steps_fn(config: ml_collections.ConfigDict, batch_sharding: jax.sharding.Sharding,
                   scan: bool = True
                   ) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
  """``steps(state, images, indices) -> (state, metrics)``: ``len(indices)`` steps of
  :func:`train_step_fn` in one ``lax.scan``, step ``i`` on ``images[indices[i]]`` (laid
  out on ``batch_sharding``); ``metrics`` holds one entry per step. For a class-conditional
  model ``images`` is ``(images, labels)``, both gathered with the same indices. Without
  ``scan``: one step (``len(indices) == 1``), outside any loop (see :func:`runs_in_scan`).
  """
  step = train_step_fn(config)

  def steps(state, images, indices):
    def body(state, idx):
      batch = jax.tree.map(lambda a: jax.lax.with_sharding_constraint(
          jnp.take(a, idx, axis=0), batch_sharding), images)
      return step(state, batch)
    if scan:
      return jax.lax.scan(body, state, indices)
    state, metrics = body(state, indices[0])
    return state, jax.tree.map(lambda m: m[None], metrics)
  return steps


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh):
  """The jitted step on a given batch: state replicated and donated, batch split on the
  ``data`` axis, every array in JAX's default (row-major) layout. The loop runs
  :func:`compile_train_steps`, with the state in the layouts XLA picks."""
  replicated = NamedSharding(mesh, P())
  return jax.jit(train_step_fn(config),
                 in_shardings=(replicated, NamedSharding(mesh, P("data"))),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def row_major_formats(tree: Any) -> Any:
  """A ``Format`` per array of ``tree``: row-major (JAX's default layout), same sharding."""
  return jax.tree.map(
      lambda a: Format(Layout(major_to_minor=tuple(range(a.ndim))), a.sharding), tree)


def _abstract(tree: Any) -> Any:
  # Shapes only: a jax.Array has a layout already, which jit checks against the formats.
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                      tree)


def _compile_keeping_layouts(fn: Callable, state: Any, args: tuple, arg_shardings: tuple,
                             mesh: Mesh, formats: Any = None) -> tuple[jax.stages.Compiled, Any]:
  """``fn(state, *args) -> (state, metrics)`` jitted and compiled with the state donated
  and kept in the layouts XLA picks for it (or in ``formats`` when given)."""
  replicated = NamedSharding(mesh, P())
  abstract = _abstract(state)

  def compile_with(state_formats):
    return jax.jit(fn, in_shardings=(state_formats,) + arg_shardings,
                   out_shardings=(state_formats, replicated),
                   donate_argnums=(0,)).lower(abstract, *args).compile()

  if formats is not None:
    return compile_with(formats), formats
  try:
    compiled = compile_with(Format(Layout.AUTO, replicated))
  except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
    # A backend that cannot choose layouts: JAX's own (an error of the step itself
    # comes back from this compilation too).
    formats = row_major_formats(abstract)
    return compile_with(formats), formats
  (formats, *_), _ = compiled.input_formats
  returned, _ = compiled.output_formats
  if any(f.layout != g.layout for f, g in zip(jax.tree.leaves(formats),
                                              jax.tree.leaves(returned))):
    compiled = compile_with(formats)  # A step that loops gives back what it takes.
  return compiled, formats


def compile_train_step(config: ml_collections.ConfigDict, mesh: Mesh, state: Any, batch: Any,
                       formats: Any = None) -> tuple[jax.stages.Compiled, Any]:
  """:func:`make_train_step` compiled for ``state`` and ``batch`` (arrays or
  ``ShapeDtypeStruct``), with the state kept on the device in XLA's own layouts.

  JAX lays every array out row-major unless told otherwise, and a GPU's convolutions want
  their kernels in another order: the row-major step transposes each kernel of the params,
  both Adam moments and the EMA on every step. Compiled with ``Layout.AUTO`` for the
  state, XLA picks layouts for it instead; a CPU keeps every array row-major. The step
  takes and gives back its state in one format per leaf, returned with it (``formats``:
  given instead of chosen, for tests): move the state into them once,
  ``jax.device_put(state, formats)``. The values and everything read from the arrays
  (checkpoints, samples) are the same in any layout.
  """
  return _compile_keeping_layouts(train_step_fn(config), state, (batch,),
                                  (NamedSharding(mesh, P("data")),), mesh, formats)


def compile_train_steps(config: ml_collections.ConfigDict, mesh: Mesh, state: Any,
                        images: Any, num_steps: int, formats: Any = None,
                        scan: bool | None = None) -> tuple[jax.stages.Compiled, Any]:
  """:func:`train_steps_fn` compiled for ``num_steps`` steps on ``images`` (the whole data
  set, replicated on the devices), the state kept in XLA's layouts as in
  :func:`compile_train_step`. Call it as ``compiled(state, images, indices)`` with int32
  ``indices`` of shape ``[num_steps, batch_size]``; for a class-conditional model
  ``images`` is ``(images, labels)``, the labels int32 ``[N]``."""
  replicated = NamedSharding(mesh, P())
  indices = jax.ShapeDtypeStruct((num_steps, config.batch_size), jnp.int32, sharding=replicated)
  if scan is None:  # The loop's choice for the platform; the bench times the scan anywhere.
    scan = runs_in_scan(mesh.devices.flat[0].platform)
  if not scan and num_steps != 1:
    raise ValueError(f"a {mesh.devices.flat[0].platform} runs one step a call, not {num_steps}")
  return _compile_keeping_layouts(
      train_steps_fn(config, NamedSharding(mesh, P("data")), scan), state,
      (images, indices), (replicated, replicated), mesh, formats)


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def runs_in_scan(platform: str) -> bool:
  """Whether the loop's calls run their steps in a ``lax.scan`` on ``platform``: everywhere
  but on a CPU. XLA's CPU backend runs the train step inside a while loop several times
  slower than outside one, and rounds it differently, so a CPU runs one plain step a call
  (whatever ``steps_per_call``), where a step's own time dwarfs the call's overhead."""
  return platform != "cpu"


def steps_per_call(config: ml_collections.ConfigDict, platform: str) -> int:
  """``config.steps_per_call``, or the platform's default when it is 0; 1 where the loop
  does not run in a scan."""
  if not runs_in_scan(platform):
    return 1
  k = config.get("steps_per_call", 0)
  return k if k > 0 else DEFAULT_STEPS_PER_CALL.get(platform, 1)


class _StopSignal:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each call of the step."""

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


def num_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


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
  ema = f"EMA {config.ema_decay:g}" + (" warmed up" if config.ema_warmup else "")
  recipe = f"predicts {config.objective}"
  if config.loss_weighting == "min_snr":
    recipe += f" with Min-SNR-{config.min_snr_gamma:g} weights"
  recipe += f", {config.schedule.kind} schedule of {config.schedule.num_steps} steps"
  if m.num_classes:
    recipe += f", {m.num_classes} classes (label dropout {config.label_dropout:g})"
  return (f"UNet {tuple(m.channels)}: {num_params:,} parameters, {m.dtype} compute, on "
          f"{devices}; batch {config.batch_size}, steps {start_step} -> {total} "
          f"({total / steps_per_epoch:.3g} epochs of {num_images:,} images); {rate}, "
          f"{ema}; {recipe}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (or resumes) the run in ``workdir`` to the configured number of steps."""
  mesh = make_mesh()
  validate_config(config, num_devices=mesh.size)
  if config.init_torch_checkpoint and not os.path.isfile(config.init_torch_checkpoint):
    raise UserError(f"init_torch_checkpoint {config.init_torch_checkpoint} is not a file; give "
                    "the original's checkpoint, e.g. checkpoints/ddpm_checkpoint")
  workdir = pathlib.Path(workdir)
  checkpoint.check_workdir(config, workdir)
  replicated = NamedSharding(mesh, P())

  def from_torch() -> TrainState:
    trees = convert.load_torch_training_state(config.init_torch_checkpoint,
                                              build_unet(config.model))
    return state_from_torch(config, *trees, replicated)

  # A new workdir starting from the original's checkpoint is created only once that file
  # has been read and found to fit the model: a refused one leaves no workdir behind.
  torch_state = None
  if config.init_torch_checkpoint and not (workdir / checkpoint.CONFIG_FILE).is_file():
    torch_state = from_torch()
  images, labels = data.load_dataset(config.data, "train")
  images = data.preprocess(images, config.data.image_size, config.data.range)
  labels = _class_labels(config, labels)
  if len(images) < config.batch_size:  # Said before anything compiles.
    raise UserError(f"the data set has {len(images)} images, fewer than one batch of "
                    f"{config.batch_size}; lower batch_size")
  checkpoint.create_workdir(workdir)

  mngr = checkpoint.manager(workdir, keep=config.keep_checkpoints)
  try:
    # Unreadable steps newer than the one restored are set aside: this run writes them again.
    # The checkpoint's Adam state goes into this config's optimizer, whatever clipping,
    # warm-up or decay wrote it.
    abstract = checkpoint.with_sharding(abstract_train_state(config), replicated)
    found = checkpoint.restore_latest(mngr, abstract, set_aside=True)
    if found is None and config.init_torch_checkpoint:
      state = torch_state if torch_state is not None else from_torch()
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
    saver = checkpoint.Saver(mngr, saved=start_step if found is not None else None)
    return _train(config, workdir, saver, images, state, start_step, found is not None, mesh,
                  labels)
  finally:
    # Waits for a save still running when an error came (its own error, if any, is dropped).
    with contextlib.suppress(Exception):
      mngr.wait_until_finished()
    mngr.close()


class _CompiledSteps:
  """The loop's program for each call length it needs, compiled on first use; every
  length keeps the state in the formats the first one chose."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, state: Any, images: Any):
    self._config, self._mesh, self._images = config, mesh, images
    self._abstract = _abstract(state)
    self._programs: dict[int, jax.stages.Compiled] = {}
    self.formats = None
    self.last: jax.stages.Compiled | None = None

  def __call__(self, num_steps: int) -> jax.stages.Compiled:
    if num_steps not in self._programs:
      self._programs[num_steps], self.formats = compile_train_steps(
          self._config, self._mesh, self._abstract, self._images, num_steps, self.formats)
    self.last = self._programs[num_steps]
    return self.last


def _replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """``array`` on every device of ``mesh``; each process holds all of it (the data set, a
  call's batch indices)."""
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()),
                                      lambda index: array[index])


def _class_labels(config: ml_collections.ConfigDict, labels: np.ndarray) -> np.ndarray | None:
  """The data set's labels (int32) for a class-conditional model, None for an
  unconditional one; refuses labels outside ``0..model.num_classes - 1``."""
  num_classes = config.model.get("num_classes", 0)
  if num_classes == 0:
    return None
  labels = np.asarray(labels, np.int32)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise UserError(f"the data's labels run {labels.min()}..{labels.max()}, outside "
                    f"0..{num_classes - 1} of model.num_classes = {num_classes}; set "
                    f"--config.model.num_classes={labels.max() + 1}")
  return labels


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, saver: checkpoint.Saver,
           images: np.ndarray, state: TrainState, start_step: int, found: bool,
           mesh: Mesh, labels: np.ndarray | None = None) -> TrainState:
  """The loop: calls of k steps, then metrics, hooks and checkpoints at their boundaries,
  until the run's last step or a stop signal. ``labels`` (a class-conditional model's)
  stay on the devices beside the images and are gathered with the same indices."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  is_main = jax.process_index() == 0
  # The order of the batches; the loop sends their indices, the images stay on the devices.
  order = data.BatchIterator(images, config.batch_size, config.seed, prefetch=0)
  steps_per_epoch = order.steps_per_epoch
  total = num_train_steps(config, steps_per_epoch)
  k = steps_per_call(config, mesh.devices.flat[0].platform)
  metrics = MetricsWriter(workdir / checkpoint.METRICS_FILE, config, is_main,
                          resumed_from=start_step if found else None)
  if is_main:
    print(run_summary(config, state.params, mesh, start_step, total, steps_per_epoch,
                      len(images)), flush=True)
  device_images = _replicated(images, mesh)
  if labels is not None:
    device_images = (device_images, _replicated(labels, mesh))
  programs = _CompiledSteps(config, mesh, state, device_images)
  profile = Profile(config, workdir, start_step, is_main, lambda: programs.last.as_text())
  grids = SampleGrids(config, workdir, is_main)
  hooks = (profile, grids)

  def call_length(step: int) -> int:
    """Steps of the next call: up to the next multiple of k, the next step a line, a
    checkpoint or a hook is due at, or the run's end."""
    every = (k, config.log_every_steps, config.checkpoint_every_steps)
    ends = [(step // n + 1) * n for n in every] + [total]
    ends += [b for b in (h.boundary(step) for h in hooks) if b is not None]
    return min(ends) - step

  if start_step < total:  # The first call's program chooses the state's formats.
    programs(call_length(start_step))
    state = jax.device_put(state, programs.formats)

  def check_finite(step: int, bad_step: int | None) -> None:
    if bad_step is not None and config.nan_policy == "stop":
      saver.finish()
      last = saver.manager.latest_step()
      kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
          "no checkpoint was written"
      raise UserError(f"the loss or its gradient is not finite at step {bad_step} (stopped at "
                      f"step {step}); {kept}; lower learning_rate, set grad_clip_norm, or set "
                      "--config.nan_policy=skip to skip such steps")

  def save(step: int) -> None:
    saver.save(step, state, {"step": step, "epoch": step // steps_per_epoch})

  bar = tqdm(total=total, initial=start_step, disable=not is_main, dynamic_ncols=True,
             unit="step", file=sys.stderr)
  step = start_step
  try:
    if step > 0:  # A run killed between the checkpoint and its samples.
      metrics.exclude(grids.after_step(step, state, bar.write))
    metrics.reset_clock(step)
    with _StopSignal() as stop:
      while step < total and stop.received is None:
        n = call_length(step)
        indices = np.stack([order.indices_at(s) for s in range(step, step + n)])
        profile.before_step(step)
        state, step_metrics = programs(n)(state, device_images, _replicated(indices, mesh))
        previous, step = step, step + n
        metrics.add(step, step_metrics)
        bar.update(n)
        for hook in hooks:
          metrics.exclude(hook.after_step(step, state, bar.write))
        log_due = step % config.log_every_steps == 0 or step == total
        checkpoint_due = step % config.checkpoint_every_steps == 0
        epochs_ended = range(previous // steps_per_epoch + 1, step // steps_per_epoch + 1)
        if log_due or checkpoint_due or epochs_ended:
          check_finite(step, metrics.flush())
        if log_due:
          record = metrics.log(step)
          bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
        for epoch in epochs_ended:
          loss = metrics.epoch_loss(epoch * steps_per_epoch)
          if is_main:
            bar.write(f"Epoch {epoch} | Loss {loss:.5f}")
        if checkpoint_due and step < total:
          save(step)
      metrics.exclude(profile.finish(step, state, bar.write))  # A run shorter than its profile.
      check_finite(step, metrics.flush())
      if metrics.unlogged:
        metrics.log(step)
      if step != saver.last:  # A stop signal can land on a step the loop just saved.
        save(step)
      saver.finish()
  finally:
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


def _define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.",
                      flag_values=flag_values)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  if cli.wants_help(argv):
    print(USAGE, end="")
    return 0
  config, flag_values = cli.parse_flags(argv, _define_flags)
  if not flag_values.workdir:
    raise UserError("--workdir is required, e.g. --workdir runs/mnist")
  cli.quiet_checkpoint_logs()
  if not cli.is_multi_process():
    cli.use_cpu_cores(config.batch_size)
  cli.maybe_initialize_distributed()
  train_and_evaluate(config, flag_values.workdir)
  return 0


if __name__ == "__main__":
  run_cli(main)
