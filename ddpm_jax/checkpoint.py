"""A run's workdir: orbax checkpoints of the train state, and the resolved config.

Layout (see CONTRACT): ``DIR/checkpoints/<step>/`` (orbax; written to
``<step>.orbax-checkpoint-tmp`` and committed by a rename, so a kill never leaves a
half-written step that looks complete), ``DIR/config.json``, ``DIR/metrics.jsonl`` and,
when ``sample_every_steps`` is set, ``DIR/samples/step_<step>.png``.
Old steps are renamed into ``checkpoints/todelete/`` before they are deleted, so a kill
never leaves a half-deleted one either. Each checkpoint's JSON meta holds a CRC32 of every
array, checked on restore: restoring tries the newest step first and falls back to older
ones when a step cannot be read or does not match its checksums, deleting nothing.
A step restores into the optimizer state of the config asking for it, whatever clipping,
warm-up or rate schedule wrote it: its Adam moments and count carry over, so a run can
resume with other optimizer settings and its older steps stay readable.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import warnings
import zlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.config_checks import check_resume_compatible
from ddpm_jax.errors import UserError
from ddpm_jax.train_state import abstract_train_state, fit_opt_state, stored_opt_state_target

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES = "samples"  # Sample grids written during training.
PROFILE = "profile"  # The profiler trace of config.profile_steps steps, and its summary.
UNREADABLE = "checkpoints_unreadable"  # Where training moves steps it cannot read.
_TODELETE = "todelete"  # Inside CHECKPOINTS: old steps on their way out.
_CHECKSUMS = "crc32"


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n"


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its workdir."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"{workdir} has no {CONFIG_FILE}: is it a ddpm_jax.train workdir?")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from e


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The run's ``metrics.jsonl`` records, at most one per step, in step order.

  The file is only ever appended to. A run killed after its last checkpoint logged steps
  that the resumed run trains again: the first line after a resume from step R carries
  ``resumed_from: R``, and the earlier lines of steps after R are dropped (those steps were
  redone, and may be logged at other steps this time), so this is the history of the run
  the latest checkpoint continues. A line cut short by a kill is skipped.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.is_file():
    raise UserError(f"{workdir} has no {METRICS_FILE}: is it a ddpm_jax.train workdir?")
  by_step = {}
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if not (isinstance(record, dict) and "step" in record):
      continue
    if "resumed_from" in record:
      by_step = {step: r for step, r in by_step.items() if step <= record["resumed_from"]}
    by_step[record["step"]] = record
  return [by_step[step] for step in sorted(by_step)]


def _not_the_read_only_notice(record: logging.LogRecord) -> bool:
  """Drops orbax's warning that a read-only manager's directory is read only: we asked."""
  return "Given directory is read only" not in record.getMessage()


def manager(workdir: str | os.PathLike, keep: int = 3, read_only: bool = False
            ) -> ocp.CheckpointManager:
  """The run's checkpoint manager; a writer also clears what a kill left half-done."""
  directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                           save_interval_steps=0)
  else:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, todelete_subdir=_TODELETE,
                                           cleanup_tmp_directories=True)
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_not_the_read_only_notice)
  try:
    # Handlers named up front, so that a step's tree metadata can be read before a restore.
    mngr = ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  finally:
    absl_logger.removeFilter(_not_the_read_only_notice)
  if not read_only:
    _empty_todelete(mngr)
  return mngr


def _empty_todelete(mngr: ocp.CheckpointManager) -> None:
  if jax.process_index() == 0:
    shutil.rmtree(pathlib.Path(mngr.directory) / _TODELETE, ignore_errors=True)


def _checksums(state: Any) -> dict[str, int]:
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  return {jax.tree_util.keystr(path): zlib.crc32(np.ascontiguousarray(x))
          for path, x in leaves}


def _plain_key(key: str) -> str:
  """A checksum's key whatever containers held the array: ``.opt_state[0].count`` (as
  saved, from optax's named tuple) and ``.opt_state[0]['count']`` (as restored from the
  checkpoint's own tree) both become ``.opt_state.0.count``."""
  return re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m[1] if m[1] is not None else m[2]),
                key)


def _write_error(mngr: ocp.CheckpointManager, step: int, error: Exception) -> UserError:
  """One line for a checkpoint that could not be written: why, and what is kept."""
  text = " ".join(str(error).split())
  if isinstance(error, OSError) and error.errno:
    reason = os.strerror(error.errno)
  else:  # tensorstore reports errno text inside a ValueError.
    reason = next((os.strerror(n) for n in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)
                   if os.strerror(n) in text), f"{type(error).__name__}: {text[:200]}")
  hint = ("free some disk space (or lower keep_checkpoints)"
          if reason in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)) else "fix that")
  try:
    mngr.reload()
    kept = [s for s in mngr.all_steps() if s != step]
  except OSError:
    kept = []
  kept_text = (f"the earlier checkpoints are kept (newest: step {max(kept)})" if kept
               else "there is no earlier checkpoint")
  return UserError(f"cannot write the checkpoint of step {step} in {mngr.directory} ({reason}); "
                   f"{kept_text}. To resume, {hint} and run the same command again")


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Starts saving ``state`` and a JSON ``meta`` dict at ``step``; see :func:`finish`.

  The meta also gets a CRC32 of each array of ``state``, for :func:`restore_latest`.
  Raises :class:`UserError` if the checkpoint cannot be written.
  """
  # One host copy serves the checksums and the write. Orbax writes NumPy arrays with less
  # CPU time than device arrays (it slices and copies each of those itself; BENCHMARKS.md,
  # "Checkpoint writes"), and restores either as the sharded device arrays of the abstract
  # state it is given.
  state = jax.device_get(state)
  meta = dict(meta, **{_CHECKSUMS: _checksums(state)})
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)
  except Exception as e:  # orbax/tensorstore raise many types for a failed write.
    raise _write_error(mngr, step, e) from e


def finish(mngr: ocp.CheckpointManager, step: int) -> None:
  """Waits for the save of ``step`` to commit; :class:`UserError` if it could not be written."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # orbax/tensorstore raise many types for a failed write.
    raise _write_error(mngr, step, e) from e
  _empty_todelete(mngr)


class Saver:
  """Saves train states in the background, one at a time: a new save first waits for the
  one still being written. ``last`` is the newest step saved (or restored, when given as
  ``saved``); ``manager`` the orbax manager it writes with."""

  def __init__(self, mngr: ocp.CheckpointManager, saved: int | None = None):
    self.manager = mngr
    self.last = saved
    self._pending: int | None = None  # The step whose save is still being written.

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.finish()
    save(self.manager, step, state, meta)
    self._pending = self.last = step

  def finish(self) -> None:
    """Waits for the pending save; :class:`UserError` if it could not be written."""
    if self._pending is not None:
      step, self._pending = self._pending, None
      finish(self.manager, step)


def check_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Refuses, before anything is written, a workdir whose entries are of the wrong kind (a
  file named ``checkpoints``, a directory named ``metrics.jsonl``) or whose config the
  run cannot resume with."""
  entries = {CHECKPOINTS: True, METRICS_FILE: False,
             CONFIG_FILE: False}
  if config.sample_every_steps:  # Entries only a run that writes them needs.
    entries[SAMPLES] = True
  if config.profile_steps:
    entries[PROFILE] = True
  for name, is_dir in entries.items():
    path = workdir / name
    if path.exists() and path.is_dir() != is_dir:
      want, got = ("directory", "file") if is_dir else ("file", "directory")
      raise UserError(f"{path} is a {got}, not a {want}; move it away or use another --workdir")
  if (workdir / CONFIG_FILE).is_file():
    saved = read_config(workdir)
    check_resume_compatible(saved, config)
    checkpoints = workdir / CHECKPOINTS
    if saved.get("seed") != config.seed and checkpoints.is_dir() and any(checkpoints.iterdir()):
      print(f"note: {workdir} was trained with seed {saved.get('seed')}; resuming with seed "
            f"{config.seed}, the checkpoint's noise key carries on and the batches follow seed "
            f"{config.seed}, so the run is neither seed's uninterrupted run",
            file=sys.stderr, flush=True)


def create_workdir(workdir: pathlib.Path) -> None:
  """Creates the workdir (and its parents); refuses one this process cannot write in."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create workdir {workdir}: {e.strerror}") from e
  if not os.access(workdir, os.W_OK):
    raise UserError(f"workdir {workdir} is not writable")


@contextlib.contextmanager
def _quiet_failed_reads():
  """Silences the log records (asyncio's, orbax's) of a failed read; one line replaces them."""
  loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  hook = sys.unraisablehook

  def drop_coroutines(unraisable) -> None:
    # A failed read's coroutines can also be collected while it runs, each printing its
    # error and its array's whole TensorStore spec (thousands of lines).
    if not inspect.iscoroutine(unraisable.object):
      hook(unraisable)

  sys.unraisablehook = drop_coroutines
  try:
    yield
  finally:
    # Collects the failed read's tasks and coroutines now, with their complaints: errors
    # raised while collecting, and the warning for a coroutine the failed read never awaited.
    sys.unraisablehook = lambda unraisable: None
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                              category=RuntimeWarning)
      gc.collect()
    sys.unraisablehook = hook
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """``(state, meta)`` at ``step``, checked against its checksums, with the shapes and
  shardings of ``abstract_state`` (a ``TrainState``) but the ``opt_state`` tree the
  checkpoint holds: its optimizer may have been another chain (see :func:`_fit`)."""
  stored = mngr.item_metadata(step)["state"]
  if stored is None:
    raise ValueError("the checkpoint has no state")
  target = abstract_state.replace(opt_state=stored_opt_state_target(
      stored.tree["opt_state"], abstract_state.opt_state))
  with _quiet_failed_reads():
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  meta = dict(restored["meta"] or {})
  expected = meta.pop(_CHECKSUMS, None)
  if expected is not None:
    expected = {_plain_key(k): v for k, v in expected.items()}
    bad = [k for k, v in _checksums(restored["state"]).items() if expected.get(_plain_key(k)) != v]
    if bad:
      raise ValueError(f"{len(bad)} array(s) do not match their checksums, e.g. "
                       f"state{bad[0]}")
  return restored["state"], meta


def _fit(state: Any, abstract_state: Any) -> Any:
  """A restored ``state`` with the optimizer state of ``abstract_state``'s optimizer: the
  checkpoint's Adam moments and count in it, whatever clipping, warm-up or decay the run
  had then (``train_state.fit_opt_state``)."""
  return state.replace(opt_state=fit_opt_state(state.opt_state, abstract_state.opt_state))


def _reason(error: BaseException) -> str:
  """The root cause of ``error``, in one line of at most 240 characters."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  text = " ".join(text.split()).split(" [tensorstore_spec")[0]
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= 240 else text[:237] + "..."


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   set_aside: bool = False) -> tuple[int, Any, dict] | None:
  """``(step, state, meta)`` of the newest readable checkpoint, or None if there is none.

  ``abstract_state`` is a ``TrainState`` of abstract arrays; ``state`` has its structure,
  the checkpoint's Adam state in its optimizer's state. A step that cannot be read (a
  truncated or missing file, another tree, an array that does not match its checksum) is
  skipped and reported in one line on stderr. With ``set_aside`` (training, which writes
  those steps again) the skipped steps are moved to ``DIR/checkpoints_unreadable/``.
  Nothing is deleted. If no step can be read, :class:`UserError` says so and nothing is
  moved.
  """
  mngr.reload()
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  directory = pathlib.Path(mngr.directory)
  problems = []
  for step in steps:
    try:
      state, meta = _restore(mngr, step, abstract_state)
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint.
      problems.append((step, _reason(e)))
      continue
    for bad, reason in problems:
      where = "skipped it"
      if set_aside:
        where = f"moved it to {_set_aside(directory / str(bad), directory.parent / UNREADABLE)}"
      print(f"warning: checkpoint step {bad} in {directory} is unreadable ({reason}); {where} "
            f"and used step {step}", file=sys.stderr, flush=True)
    if set_aside and problems:
      mngr.reload()
    return step, _fit(state, abstract_state), meta
  details = "; ".join(f"step {step}: {reason}" for step, reason in problems)
  raise UserError(f"no readable checkpoint in {directory} ({details}); move the checkpoints "
                  "directory away to start afresh")


def restore_step(mngr: ocp.CheckpointManager, step: int, abstract_state: Any
                 ) -> tuple[Any, dict]:
  """``(state, meta)`` of the checkpoint at ``step``; :class:`UserError` naming the steps
  there are if it is missing or cannot be read."""
  mngr.reload()
  steps = sorted(mngr.all_steps())
  kept = ", ".join(map(str, steps)) or "none"
  if step not in steps:
    raise UserError(f"{mngr.directory} has no checkpoint at step {step}; its steps: {kept}")
  try:
    state, meta = _restore(mngr, step, abstract_state)
  except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint.
    raise UserError(f"checkpoint step {step} in {mngr.directory} is unreadable ({_reason(e)}); "
                    f"its steps: {kept}") from e
  return _fit(state, abstract_state), meta


def _set_aside(path: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
  """Moves ``path`` into ``folder`` under a name not yet taken there (process 0 only)."""
  target = folder / path.name
  n = 0
  while target.exists():
    n += 1
    target = folder / f"{path.name}.{n}"
  if jax.process_index() == 0:
    folder.mkdir(exist_ok=True)
    os.replace(path, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"ddpm_jax set aside {path}")
  return target


def with_sharding(abstract: Any, sharding: jax.sharding.Sharding | None) -> Any:
  """Attaches ``sharding`` to every ``ShapeDtypeStruct`` leaf of an abstract tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


def load_run(workdir: str | os.PathLike, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """``(config, params, ema_params)`` from a training workdir's newest readable checkpoint,
  or from its checkpoint at ``step``."""
  config, _, state = load_run_state(workdir, step)
  return config, state.params, state.ema_params


def kept_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps whose checkpoints a training workdir holds, ascending, without reading them."""
  mngr = manager(workdir, read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def load_run_state(workdir: str | os.PathLike, step: int | None = None
                   ) -> tuple[ml_collections.ConfigDict, int, Any]:
  """``(config, step, train_state)`` from a training workdir's newest readable checkpoint,
  or from its checkpoint at ``step``."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise UserError(f"workdir {workdir} does not exist")
  config = read_config(workdir)
  abstract = with_sharding(abstract_train_state(config),
                           jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  if not (workdir / CHECKPOINTS).is_dir():
    raise UserError(f"{workdir} has no {CHECKPOINTS}/ directory: train first")
  mngr = manager(workdir, read_only=True)
  try:
    if step is not None:
      return config, step, restore_step(mngr, step, abstract)[0]
    found = restore_latest(mngr, abstract)
  finally:
    mngr.close()
  if found is None:
    raise UserError(f"{workdir}/{CHECKPOINTS} holds no checkpoint yet: train first")
  step, state, _ = found
  return config, step, state
