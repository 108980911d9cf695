"""What the training loop does beside training, called after each call of the step:
sample grids of the EMA weights and a profile of a few steps.

Each hook names the steps it needs the loop to stop at (:meth:`boundary`), so that a call
of several steps never runs past one, and returns the seconds it spent, which the loop
leaves out of the run's img/s.
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ddpm_jax import checkpoint, files, images, profiling, sampling
from ddpm_jax.model import build_unet
from ddpm_jax.train_state import make_schedule

# Steps of a run (or of a resumed run) before config.profile_steps are traced: compilation
# and the first steps' warm-up stay out of the profile.
PROFILE_AFTER_STEPS = 5

Report = Callable[[str], None]


def sample_grid_path(workdir: str | os.PathLike, step: int) -> pathlib.Path:
  return pathlib.Path(workdir) / checkpoint.SAMPLES / f"step_{step:07d}.png"


def make_sample_grid_writer(config: ml_collections.ConfigDict
                            ) -> Callable[[Any, pathlib.Path], None]:
  """``write(ema_params, path)``: a grid of ``config.sample_num_images`` EMA samples.

  Deterministic DDIM (eta 0) with ``config.sample_num_steps`` steps from the noise of
  ``fold_in(key(seed), -2)``: the same starting noise at every step of the run, so the
  grids show one set of samples improving. Images are not clipped (as the original).
  A class-conditional run (``model.num_classes = C > 0``) draws image ``i`` as class
  ``i mod C`` with the plain conditional model (guidance scale 1), so that the grid shows
  the model the run trains rather than its "no class" half. Made once per run: the sampler
  is compiled for its ``apply_fn``, so every grid of the run reuses one compilation.
  """
  apply_fn = build_unet(config.model).apply
  schedule = make_schedule(config)
  size, channels = config.data.image_size, config.data.channels
  shape = (config.sample_num_images, size, size, channels)
  rng = jax.random.fold_in(jax.random.key(config.seed), -2 % 2**31)
  num_classes = config.model.get("num_classes", 0)
  labels = (np.arange(config.sample_num_images, dtype=np.int32) % num_classes
            if num_classes else None)

  def write(ema_params: Any, path: pathlib.Path) -> None:
    x, _ = sampling.ddim_sample(apply_fn, ema_params, schedule, rng, shape,
                                config.sample_num_steps, snapshot_times=(),
                                objective=config.get("objective", "eps"), labels=labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, lambda f: images.save_grid(f, np.asarray(x), config.data.range))
  return write


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


class SampleGrids:
  """``DIR/samples/step_<step>.png`` every ``config.sample_every_steps`` steps (process 0).

  A grid already on disk (a run killed after writing it) is not written again.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, is_main: bool):
    self._every, self._workdir, self._is_main = config.sample_every_steps, workdir, is_main
    self._write = make_sample_grid_writer(config) if self._every and is_main else None

  def boundary(self, step: int) -> int | None:
    return _next_multiple(step, self._every) if self._every else None

  def after_step(self, step: int, state: Any, report: Report) -> float:
    if self._write is None or step % self._every:
      return 0.0
    path = sample_grid_path(self._workdir, step)
    if path.exists():
      return 0.0
    start = time.perf_counter()
    # This process's copy of the replicated params: sampling runs on its devices only.
    self._write(jax.tree.map(lambda a: a.addressable_data(0), state.ema_params), path)
    report(f"Step {step} | samples -> {path}")
    return time.perf_counter() - start


class Profile:
  """A ``jax.profiler`` trace of ``config.profile_steps`` steps, starting
  :data:`PROFILE_AFTER_STEPS` after the run's first, summarized when they are done (process
  0). ``hlo_text`` gives the step program's HLO, which names the traced ops."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, start_step: int,
               is_main: bool, hlo_text: Callable[[], str]):
    self._profile = (profiling.LoopProfile(workdir / checkpoint.PROFILE,
                                           start_step + PROFILE_AFTER_STEPS, config.profile_steps)
                     if config.profile_steps and is_main else None)
    self._hlo_text = hlo_text

  def boundary(self, step: int) -> int | None:
    p = self._profile
    if p is None:
      return None
    return next((b for b in (p.first, p.first + p.count) if b > step), None)

  def before_step(self, step: int) -> None:
    if self._profile is not None:
      self._profile.before_step(step)

  def after_step(self, step: int, state: Any, report: Report) -> float:
    if self._profile is None or not self._profile.due(step):
      return 0.0
    return self.finish(step, state, report)

  def finish(self, step: int, state: Any, report: Report) -> float:
    """Ends a trace still running (a run shorter than its profile) and reports it."""
    p = self._profile
    if p is None or not p.active:
      return 0.0
    start = time.perf_counter()
    first = p.first + 1
    try:
      report_text = profiling.format_summary(p.stop(step, state, self._hlo_text))
    except (OSError, ValueError, KeyError) as e:  # A trace it cannot read never stops a run.
      report_text = f"its summary failed ({type(e).__name__}: {e}); the trace itself is there"
    report(f"Step {step} | profile of steps {first}..{step} -> {p.logdir}\n{report_text}")
    return time.perf_counter() - start

  def abort(self) -> None:
    if self._profile is not None:
      self._profile.abort()
