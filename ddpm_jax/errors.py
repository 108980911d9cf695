"""User-facing errors: one line on stderr, starting ``error:``, and a non-zero exit.

Library code raises :class:`UserError` (a ``ValueError``) for input a user can fix: a bad
config value, a missing file, a checkpoint with the wrong keys. Command-line entry points
wrap their ``main`` in :func:`run_cli`, which turns such an error into one line without a
traceback. Programming errors still raise normally, so bugs keep their tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """An error caused by input the user can fix; its message says how."""


class ArgumentParser(argparse.ArgumentParser):
  """An argparse parser whose errors are :class:`UserError` (one line, exit status 2)."""

  def error(self, message: str):
    raise UserError(message)


def fail(message: str) -> NoReturn:
  """Prints ``error: message`` on one line to stderr and exits with status 2."""
  one_line = " ".join(str(message).split())
  print(f"error: {one_line}", file=sys.stderr, flush=True)
  raise SystemExit(EXIT_USER_ERROR)


def run_cli(main: Callable[[], int | None]) -> NoReturn:
  """Runs a command's ``main`` and exits, turning :class:`UserError` into one line."""
  try:
    code = main()
  except UserError as e:
    fail(str(e))
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr, flush=True)
    raise SystemExit(130)
  raise SystemExit(code or 0)
