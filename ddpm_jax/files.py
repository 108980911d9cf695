"""Writing outputs so that a kill or a full disk never leaves a half-written file."""

from __future__ import annotations

import os
from typing import BinaryIO, Callable

from ddpm_jax.errors import UserError


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
  """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``.

  A file already at ``path`` is replaced only once the new one is complete.
  """
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"cannot write {path}: {e.strerror or type(e).__name__}") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
  write_atomic(path, lambda f: f.write(text.encode()))
