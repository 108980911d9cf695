"""The command line shared by ``ddpm_jax.train``, ``scripts/bench.py`` and the tests:
``--config FILE`` with its ``--config.KEY=VALUE`` overrides (ml_collections config flags),
one-line errors for bad ones, and the process set-up a run needs before JAX starts.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import sys
from typing import Callable, Sequence

import ml_collections

from ddpm_jax.config_checks import check_overrides_given_once, flatten_config
from ddpm_jax.errors import UserError


def wants_help(argv: Sequence[str]) -> bool:
  """Whether ``argv`` asks for the usage (``-h`` or ``--help`` before any ``--``)."""
  argv = list(argv)
  flags = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  return any(arg in ("-h", "--help") for arg in flags)


def config_file_arg(argv: Sequence[str]) -> str | None:
  """The value of ``--config`` in ``argv`` (``--config=FILE`` or ``--config FILE``), with
  any ``:ARG`` suffix."""
  argv = list(argv)
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file at ``path`` (any ``:ARG`` suffix dropped)."""
  path = os.fspath(path)
  spec = importlib.util.spec_from_file_location("ddpm_jax_user_config", path.split(":", 1)[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _flag_error(error: Exception) -> str:
  """absl's message for a bad flag, without the traceback ml_collections puts in some."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    text = f"{text.split(':', 1)[0]}: {text.strip().splitlines()[-1]}"
  return " ".join(text.split())


def _unknown_key(error: LookupError | AttributeError, argv: Sequence[str], path: str
                 ) -> str | None:
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
    known = list(flatten_config(load_config_file(path)))
  except Exception:  # pylint: disable=broad-except  # Only for the hint.
    known = []
  close = difflib.get_close_matches(override, known, n=1)
  hint = f"did you mean --config.{close[0]}?" if close else f"the keys are those in {path}"
  return f"unknown config key {override!r} in --config.{override}; {hint}"


def parse_flags(argv: Sequence[str], define_flags: Callable[[object], None],
                example_config: str = "configs/mnist.py"):
  """``(config, flag_values)`` from ``argv``: ``--config FILE`` and its overrides, plus the
  flags ``define_flags(flag_values)`` defines. :class:`UserError` for a missing or broken
  config file, an unknown or repeated key, a bad value or a stray argument."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = list(argv)
  path = config_file_arg(argv)
  if path is None:
    raise UserError(f"--config is required, e.g. --config {example_config}")
  if not os.path.isfile(path.split(":", 1)[0]):
    raise UserError(f"config file {path.split(':', 1)[0]} does not exist; e.g. "
                    f"--config {example_config}")
  check_overrides_given_once(argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, f"A config file, e.g. {example_config}.",
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  define_flags(flag_values)
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
                    "--config.batch_size=64")
  return config, flag_values


def _ignore_closed_event_loop(unraisable) -> None:
  """Drops the "Event loop is closed" errors that a failed orbax read's coroutines raise
  when they are collected at exit (seen once as 2,000 lines after a one-line warning)."""
  if isinstance(unraisable.exc_value, RuntimeError) and \
      "Event loop is closed" in str(unraisable.exc_value):
    return
  sys.__unraisablehook__(unraisable)


def quiet_checkpoint_logs() -> None:
  """Orbax logs each failed checkpoint read or write with tracebacks; the one-line reports
  of ``checkpoint`` replace them on the command line."""
  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)
  sys.unraisablehook = _ignore_closed_event_loop


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def use_cpu_cores(batch_size: int, cores: int | None = None) -> int:
  """Splits the host CPU into one JAX device per core (as many as divide ``batch_size``),
  so that training on a CPU uses every core: XLA's CPU convolutions hardly use a second
  thread, while two devices each run their half of the batch. Call before JAX starts its
  backends. Leaves ``XLA_FLAGS`` alone when it already sets the device count; affects
  only the CPU platform (a GPU run ignores it). Returns the CPU device count set, or 0.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if DEVICE_COUNT_FLAG in flags:
    return 0
  cores = available_cores() if cores is None else cores
  count = max(d for d in range(1, max(cores, 1) + 1) if batch_size % d == 0)
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
  return count


def is_multi_process() -> bool:
  """Whether the environment describes a launch of several processes (see below)."""
  return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or int(
      os.environ.get("SLURM_NTASKS", "1")) > 1 or int(
          os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when a multi-process launch is described by the env.

  Set ``JAX_COORDINATOR_ADDRESS`` (host:port), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``; or run under SLURM / Open MPI, whose variables JAX reads itself.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(
      os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
