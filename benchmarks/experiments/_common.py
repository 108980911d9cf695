"""What the experiments share: the import paths, the command line, the train state and
batch they time on one device, and the timing of a compiled step.

Timing is the bench's (``scripts/bench/timing.py``): warm-up calls untimed, the median of
``--reps`` repetitions of about ``--min_rep_s`` each, ``jax.block_until_ready`` before
every clock read.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Any, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
for _path in (os.path.join(_ROOT, "scripts"), _ROOT):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bench.jax_rows import bench_images, copy_state, with_settings
from bench.timing import time_calls
from ddpm_jax import cli, files
from ddpm_jax.config_checks import validate_config
from ddpm_jax.errors import UserError
from ddpm_jax.train_state import TrainState, create_train_state


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("json", None, "Also write the figures here (JSON).", flag_values=fv)
  flags.DEFINE_integer("batch", 64, "Batch size of the train step.", flag_values=fv)
  flags.DEFINE_string("dtype", "float32", "Compute dtype of the train step.", flag_values=fv)
  flags.DEFINE_integer("reps", 5, "Timed repetitions (median reported).", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed calls before timing (at least 1).",
                       flag_values=fv)
  flags.DEFINE_float("min_rep_s", 1.0, "A repetition runs enough calls to last about this "
                     "long (0: one call).", flag_values=fv)


def setup(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, flags.FlagValues,
                                        TrainState, jax.Array]:
  """``(config, flags, state, batch)`` from the command line: ``config`` at ``--batch`` and
  ``--dtype``, its fresh train state replicated on a one-device mesh of the first device,
  and the bench's batch split over it, as the bench's train rows run."""
  config, fv = cli.parse_flags(argv, define_flags)
  validate_config(config)
  if fv.batch < 1 or fv.reps < 1 or fv.warmup < 0 or fv.min_rep_s < 0:
    raise UserError("--batch and --reps must be >= 1, --warmup and --min_rep_s >= 0")
  config = with_settings(config, fv.batch, fv.dtype)
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
  state = create_train_state(config, NamedSharding(mesh, P()))
  return config, fv, state, bench_images(config, fv.batch, NamedSharding(mesh, P("data")))


def median_s(run, fv: flags.FlagValues) -> float:
  """Median seconds of a call of ``run``, whose result ``jax.block_until_ready`` waits for."""
  return time_calls(run, jax.block_until_ready, fv.reps, max(fv.warmup, 1),
                    fv.min_rep_s).median


def time_step(compiled: jax.stages.Compiled, state: TrainState, formats: Any, x: jax.Array,
              fv: flags.FlagValues) -> float:
  """Median seconds of the compiled step looping on a copy of ``state`` moved into the
  ``formats`` it takes (its own buffers: the step donates them)."""
  current = jax.device_put(copy_state(state), formats, may_alias=False)

  def run():
    nonlocal current
    current, _ = compiled(current, x)
    return current

  return median_s(run, fv)


def finish(doc: dict, fv: flags.FlagValues) -> None:
  """Writes the figures, with the device and the command, to ``--json`` when given."""
  if fv.json:
    doc = dict(doc, device=jax.devices()[0].device_kind, jax=jax.__version__,
               command="python " + shlex.join(sys.argv))
    files.write_text_atomic(fv.json, json.dumps(doc, indent=1))
    print(f"wrote {fv.json}")
