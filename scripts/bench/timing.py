"""Timing calls on a device, the one device each framework runs on, and memory figures."""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh

from .optional import torch


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call, one entry per timed repetition of ``calls_per_rep`` calls."""
  seconds: tuple[float, ...]
  calls_per_rep: int

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  def to_json(self) -> dict:
    return dict(median_s=self.median, rep_s=list(self.seconds), calls_per_rep=self.calls_per_rep)


def time_calls(run: Callable[[], Any], sync: Callable[[Any], Any], reps: int, warmup: int,
               min_rep_s: float = 0.0) -> Timing:
  """Times ``run`` after ``warmup`` calls; ``sync(result)`` waits for the device's work.

  Each repetition runs enough calls to last about ``min_rep_s`` (found from one extra
  call), and the clock is read only after ``sync``.
  """
  for _ in range(warmup):
    sync(run())
  calls = 1
  if min_rep_s > 0:
    start = time.perf_counter()
    sync(run())
    calls = max(1, math.ceil(min_rep_s / max(time.perf_counter() - start, 1e-9)))
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = run()
    sync(out)
    seconds.append((time.perf_counter() - start) / calls)
  return Timing(tuple(seconds), calls)


@dataclasses.dataclass(frozen=True)
class Devices:
  """The one JAX device and the one torch device every measurement runs on."""
  jax_device: jax.Device
  torch_device: Any  # torch.device
  note: str

  @property
  def mesh(self) -> Mesh:
    """A one-device ``data`` mesh, as ``ddpm_jax.train`` takes."""
    return Mesh(np.asarray([self.jax_device]), ("data",))

  @property
  def host_mesh(self) -> Mesh | None:
    """On a CPU run, a ``data`` mesh of every host CPU device when there are several
    (``bench.py`` splits the host into one per core, as ``python -m ddpm_jax.train`` does),
    for the row of the step the CPU demo trains with; else None."""
    cpus = jax.devices("cpu")
    if self.is_gpu or self.jax_device.platform != "cpu" or len(cpus) < 2:
      return None
    return Mesh(np.asarray(cpus), ("data",))

  @property
  def is_gpu(self) -> bool:
    return self.torch_device is not None and self.torch_device.type == "cuda"

  def torch_sync(self, _=None) -> None:
    if self.is_gpu:
      torch.cuda.synchronize()


def pick_devices() -> Devices:
  """The first GPU when both JAX and torch see one, else the CPU for both."""
  torch_gpu = torch.cuda.is_available()
  jax_gpu = jax.default_backend() in ("gpu", "cuda", "rocm")
  if torch_gpu and jax_gpu:
    return Devices(jax.devices()[0], torch.device("cuda", 0), "GPU (JAX and torch see it)")
  note = "CPU"
  if torch_gpu != jax_gpu:
    note += f" (only {'torch' if torch_gpu else 'JAX'} sees a GPU; both run on the CPU)"
  return Devices(jax.devices("cpu")[0], torch.device("cpu"), note)


def host_memory() -> dict:
  """The process's peak RSS so far (getrusage) and, with psutil installed, its RSS now."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB.
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    now = psutil.Process().memory_info().rss
  except ImportError:
    now = None
  return dict(host_peak_rss_bytes=peak, host_rss_bytes=now)


def xla_memory(compiled: jax.stages.Compiled) -> dict | None:
  """XLA's buffer assignment: arguments + outputs - donated aliases + temporaries."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  parts = dict(argument=stats.argument_size_in_bytes, output=stats.output_size_in_bytes,
               alias=stats.alias_size_in_bytes, temp=stats.temp_size_in_bytes)
  parts["peak"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
  return parts


def jax_device_peak(device: jax.Device) -> int | None:
  """``peak_bytes_in_use`` of the device's allocator (GPU), a high-water mark since start."""
  stats = device.memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None
