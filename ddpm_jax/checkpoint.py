"""A run's workdir: orbax checkpoints of the train state, and the resolved config.

Layout (see CONTRACT): ``DIR/checkpoints/<step>/`` (orbax; written to a temporary name and
committed by rename, so a kill never leaves a half-written step that looks complete),
``DIR/config.json`` and ``DIR/metrics.jsonl``. Restoring tries the newest step first and
falls back to older ones when a step cannot be read, deleting nothing.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from ddpm_jax.errors import UserError

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"

log = logging.getLogger(__name__)


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n"


def write_text_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its workdir."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"{workdir} has no {CONFIG_FILE}: is it a ddpm_jax.train workdir?")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path}: {e}") from e


def manager(workdir: str | os.PathLike, keep: int = 3, read_only: bool = False
            ) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(directory, options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves ``state`` and a JSON ``meta`` dict at ``step`` (asynchronously; see ``wait``)."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[int, Any, dict] | None:
  """``(step, state, meta)`` of the newest readable checkpoint, or None if there is none.

  An unreadable step (truncated file, missing item, another tree) is reported in one
  line and skipped; if no step can be read, :class:`UserError` says so. Nothing is deleted.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  problems = []
  for step in steps:
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax/tensorstore raise many types for a damaged checkpoint.
      reason = " ".join(str(e).split())[:200] or type(e).__name__
      problems.append(f"step {step}: {reason}")
      log.warning("checkpoint at step %d is unreadable (%s); trying an older one", step, reason)
      print(f"warning: checkpoint at step {step} is unreadable ({type(e).__name__}); "
            "trying an older one", flush=True)
      continue
    return step, restored["state"], dict(restored["meta"] or {})
  raise UserError(f"no readable checkpoint in {mngr.directory} ({'; '.join(problems)}); "
                  "move the checkpoints directory away to start afresh")


def with_sharding(abstract: Any, sharding: jax.sharding.Sharding | None) -> Any:
  """Attaches ``sharding`` to every ``ShapeDtypeStruct`` leaf of an abstract tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      abstract)


def load_run(workdir: str | os.PathLike,
             abstract_state_fn: Callable[[ml_collections.ConfigDict], Any] | None = None
             ) -> tuple[ml_collections.ConfigDict, Any, Any]:
  """``(config, params, ema_params)`` from a training workdir's newest readable checkpoint."""
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise UserError(f"workdir {workdir} does not exist")
  config = read_config(workdir)
  if abstract_state_fn is None:
    from ddpm_jax.train import abstract_train_state  # pylint: disable=g-import-not-at-top
    abstract_state_fn = abstract_train_state
  abstract = with_sharding(abstract_state_fn(config),
                           jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  if not (workdir / CHECKPOINTS).is_dir():
    raise UserError(f"{workdir} has no {CHECKPOINTS}/ directory: train first")
  mngr = manager(workdir, read_only=True)
  try:
    found = restore_latest(mngr, abstract)
  finally:
    mngr.close()
  if found is None:
    raise UserError(f"{workdir}/{CHECKPOINTS} holds no checkpoint yet: train first")
  _, state, _ = found
  return config, state.params, state.ema_params
