"""Every measurement in order (:func:`run_bench`) and the command line (:func:`main`)."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from typing import Callable, Sequence

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import cli, files
from ddpm_jax.config_checks import validate_config
from ddpm_jax.errors import UserError
from ddpm_jax.train_state import create_train_state

from . import jax_rows, torch_rows
from .flops import seed_unet_flops
from .optional import torch
from .parity import parity_rows
from .report import assemble, device_info, report
from .settings import (Settings, breakdown_and_profile, define_flags, settings_from_flags,
                       times_loop_program)
from .timing import pick_devices


def run_bench(config: ml_collections.ConfigDict, settings: Settings, command: str,
              save: Callable[[dict], None] = lambda doc: None) -> dict:
  """Every measurement, as the JSON document; ``save`` gets the document so far (its
  ``complete`` False) after each row, so a run cut short still leaves its figures."""
  devices = pick_devices()
  if devices.is_gpu:
    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as JAX's default precision.
  info = device_info(devices)
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  start = time.perf_counter()
  train_rows, loop_rows, sample_rows, parity, seed = [], [], [], [], None

  def document(complete: bool) -> dict:
    return assemble(config, settings, command, date, devices, info, train_rows, loop_rows,
                    sample_rows, parity, seed, complete)

  def log(message: str) -> None:
    save(document(complete=False))  # Before the line: whoever reads it finds the figure.
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

  log(f"{info['kind']} ({devices.note}); batch sizes {settings.batch_sizes}, "
      f"JAX dtypes {settings.dtypes}, parts {','.join(settings.parts)}")
  with jax.default_device(devices.jax_device):
    if "parity" in settings.parts:  # First: quick, and the numbers the timings stand on.
      for row in parity_rows(config, devices, settings):
        parity.append(row)
        log(f"parity JAX {row['dtype']} {row['precision']} precision: output rel L2 "
            f"{row['output_rel_l2']:.1e}, gradients rel L2 {row['grads_rel_l2']:.1e}")
    # Params and Adam state are float32 whatever the compute dtype: one state serves all.
    initial = (create_train_state(config, NamedSharding(devices.mesh, P()))
               if {"train", "sample"} & set(settings.parts) else None)
    for i, batch in enumerate(settings.batch_sizes if "train" in settings.parts else ()):
      for dtype in settings.dtypes:
        train_rows.append(jax_rows.jax_train(config, dtype, batch, initial, devices, settings,
                                             *breakdown_and_profile(settings, i, dtype)))
        log(f"train JAX {dtype} batch {batch}: {train_rows[-1]['img_per_s']:.1f} img/s")
        host = devices.host_mesh
        if host is not None and dtype == "float32" and batch % host.size == 0:
          train_rows.append(jax_rows.jax_train(config, dtype, batch, initial, devices,
                                               settings, False, mesh=host))
          log(f"train JAX {dtype} batch {batch} on {host.size} CPU devices: "
              f"{train_rows[-1]['img_per_s']:.1f} img/s")
        if times_loop_program(settings, i, dtype):
          for row in jax_rows.loop_program_rows(config, dtype, batch, initial, devices,
                                                settings):
            loop_rows.append(row)
            log(f"train JAX loop program {dtype} batch {batch}, {row['steps_per_call']} "
                f"steps a call: {row['img_per_s']:.1f} img/s")
      train_rows.append(torch_rows.torch_train(config, batch, devices, settings,
                                               compiled=False,
                                               breakdown=settings.breakdown and i == 0))
      log(f"train torch eager batch {batch}: {train_rows[-1]['img_per_s']:.1f} img/s")
      train_rows.append(torch_rows.torch_compile_row(config, batch, devices, settings))
      log(f"train torch.compile batch {batch}: " + (
          f"{train_rows[-1]['img_per_s']:.1f} img/s" if train_rows[-1]["status"] == "ok"
          else train_rows[-1]["status"]))

    if "sample" in settings.parts:
      # The original's loop first: every batched row's speed-up is taken against it.
      sample_rows.append(torch_rows.torch_sample(config, devices, settings))
      log(f"sample torch original: {sample_rows[-1]['img_per_s']:.3f} img/s")
      for dtype in settings.dtypes:
        for batch in settings.batch_sizes:
          for sampler in ("ddpm", "ddim"):
            sample_rows.append(jax_rows.jax_sample(config, dtype, batch, sampler,
                                                   initial.params, devices, settings))
            log(f"sample JAX {sampler} {dtype} batch {batch}: "
                f"{sample_rows[-1]['img_per_s']:.1f} img/s")
    if "train" in settings.parts:
      seed = seed_unet_flops(devices)
      log("seed UNet FLOPs")
  return document(complete=True)


def main(argv: Sequence[str] | None = None) -> int:
  """``scripts/bench.py``'s command line: checks every flag before measuring anything."""
  argv = list(sys.argv if argv is None else argv)
  config, fv = cli.parse_flags(argv, define_flags, example_config="configs/mnist_tiny.py")
  validate_config(config)
  if not fv.json:
    raise UserError("--json is required, e.g. --json bench.json")
  if not os.path.isdir(os.path.dirname(os.path.abspath(fv.json))):
    raise UserError(f"--json {fv.json}: its directory does not exist")
  settings = settings_from_flags(fv)
  if settings.ddim_steps > config.schedule.num_steps:
    raise UserError(f"--ddim_steps {settings.ddim_steps} is more than the schedule's "
                    f"{config.schedule.num_steps} steps")
  if torch is None:
    raise UserError("the bench needs torch: pip install torch==2.13.0")
  command = "python " + shlex.join(argv)

  def save(doc: dict) -> None:
    files.write_text_atomic(fv.json, json.dumps(doc, indent=1))

  doc = run_bench(config, settings, command, save)
  save(doc)
  print()
  print(report(doc))
  print(f"\nwrote {fv.json}")
  return 0
