"""Writing outputs so that a kill or a full disk never leaves a half-written file."""

from __future__ import annotations

import os
import pathlib
from typing import BinaryIO, Callable, Sequence

from ddpm_jax.errors import UserError


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
  """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``.

  Creates ``path``'s directory if needed. A file already at ``path`` is replaced only once
  the new one is complete.
  """
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
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


def check_outputs(paths: Sequence[str], overwrite: bool) -> None:
  """Refuses empty names, duplicates, directories, existing files (without ``overwrite``)
  and outputs whose directory could not be created or written, all before anything is
  computed; changes nothing on disk (:func:`write_atomic` creates the directories)."""
  if any(not str(p) for p in paths):
    raise UserError("an output path is empty; give a file name")
  resolved = [pathlib.Path(p).resolve() for p in paths]
  if len(set(resolved)) != len(resolved):
    raise UserError(f"the output paths must differ, got {', '.join(map(str, paths))}")
  for path, full in zip(paths, resolved):
    if full.is_dir():
      raise UserError(f"output {path} is a directory; give a file name")
    if full.exists() and not overwrite:
      raise UserError(f"output {path} exists; pass --overwrite to replace it")
    existing = next(p for p in full.parents if p.exists())
    if not existing.is_dir():
      raise UserError(f"cannot create the directory of output {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise UserError(f"cannot write output {path}: {existing} is not writable")
