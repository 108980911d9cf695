"""A run's ``metrics.jsonl``: per-step device metrics in, one JSON line per logged step out.

The train step returns each step's loss and whether it was finite; this collects them
without waiting on the device, fetches them only when a line, an epoch's loss or a
finiteness check needs them, and writes the line (process 0 only). Append-only: after a
resume the steps since the last checkpoint appear twice, the later line marked
``resumed_from`` (``checkpoint.read_metrics`` keeps the later one).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time

import jax
import ml_collections
import numpy as np

from ddpm_jax.errors import UserError
from ddpm_jax.train_state import learning_rate_at, lr_decay_steps


class MetricsWriter:
  """Collects per-step device metrics and writes ``metrics.jsonl`` lines (if ``write``)."""

  def __init__(self, path: pathlib.Path, config: ml_collections.ConfigDict, write: bool,
               resumed_from: int | None = None):
    self._path, self._config, self._write = path, config, write
    # Marks the first line after a resume: lines after it supersede earlier ones of the
    # same steps (``checkpoint.read_metrics``).
    self._resumed_from = resumed_from
    if write and path.is_file() and path.stat().st_size:
      # A line cut short by a kill is ended, not extended.
      with self._writing(), open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          f.write(b"\n")
    # (last step, metrics of the steps up to it): each entry covers one call of the step.
    self._pending: list[tuple[int, dict]] = []
    self._unlogged: list[float] = []  # Fetched losses of the steps since the last line.
    self._epoch: list[tuple[int, float]] = []  # (step, finite loss) not yet in an epoch line.
    self._last_time = time.perf_counter()
    self._last_step: int | None = None

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed write of the metrics file into a one-line error."""
    try:
      yield
    except OSError as e:
      raise UserError(f"cannot write {self._path} ({e.strerror or e}); the checkpoints "
                      "written so far are kept") from e

  def add(self, step: int, metrics: dict) -> None:
    """Metrics of the steps up to ``step``: arrays of one entry per step (or scalars)."""
    self._pending.append((step, metrics))

  def reset_clock(self, step: int) -> None:
    self._last_time, self._last_step = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` spent on something else (sampling) out of the next ``img_per_s``."""
    self._last_time += seconds

  def flush(self) -> int | None:
    """Fetches pending metrics, keeping their losses for the next line and the epoch's;
    returns the first step whose loss or gradient was not finite, if any."""
    fetched = jax.device_get(self._pending)
    self._pending = []
    bad = None
    for last, m in fetched:
      losses = np.atleast_1d(m["loss"]).astype(float)
      finite = np.atleast_1d(m["finite"])
      steps = range(last - len(losses) + 1, last + 1)
      if bad is None and not finite.all():
        bad = steps[int(np.argmin(finite))]
      self._unlogged.extend(losses.tolist())
      self._epoch.extend((s, l) for s, l in zip(steps, losses.tolist()) if np.isfinite(l))
    return bad

  def epoch_loss(self, last_step: int) -> float:
    """The mean finite loss of the fetched steps up to ``last_step`` not yet in an epoch's
    mean (the original's ``Epoch N | Loss`` line); those steps are then dropped."""
    losses = [l for s, l in self._epoch if s <= last_step]
    self._epoch = [(s, l) for s, l in self._epoch if s > last_step]
    return float(np.mean(losses)) if losses else float("nan")

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
                  img_per_s=steps * self._config.batch_size / max(now - self._last_time, 1e-9),
                  time=time.time())
    if self._resumed_from is not None:
      record["resumed_from"], self._resumed_from = self._resumed_from, None
    self._last_time, self._last_step = now, step
    if self._write:
      with self._writing(), open(self._path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record
