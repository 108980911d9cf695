"""The JSON document of a run (:func:`assemble`), the performance issue's targets, and the
text report (:func:`report`): markdown tables of every figure."""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Sequence

import jax
import ml_collections
import numpy as np

from ddpm_jax import profiling
from ddpm_jax.config_defaults import base_config

from .flops import PEAK_FLOPS, add_mfu, analytic_forward_flops
from .optional import torch
from .settings import Settings
from .timing import Devices

# The original's 75 epochs of 60,000 digits at batch 64 (937 full batches an epoch).
ORIGINAL_TRAIN_STEPS = 70_275

# Environment variables that change what is measured; recorded in the JSON.
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
            "OMP_NUM_THREADS", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")


def train_ratios(rows: Sequence[dict]) -> list[dict]:
  """JAX img/s over the float32 torch rows' img/s, per batch and JAX dtype."""
  ok = {(r["framework"], r["variant"], r["dtype"], r["batch"]): r["img_per_s"]
        for r in rows if r["status"] == "ok"}
  ratios = []
  for (framework, variant, dtype, batch), img_per_s in ok.items():
    if framework != "jax":
      continue
    eager = ok.get(("torch", "eager", "float32", batch))
    compiled = ok.get(("torch", "compile", "float32", batch))
    ratios.append(dict(batch=batch, dtype=dtype, variant=variant,
                       jax_over_eager=img_per_s / eager if eager else None,
                       jax_over_compile=img_per_s / compiled if compiled else None))
  return ratios


def is_seed_unet(config: ml_collections.ConfigDict) -> bool:
  """Whether the model is the original's UNET (any compute dtype) on 32x32x1 images."""
  def architecture(c):
    return ({k: v for k, v in c.model.to_dict().items() if k != "dtype"},
            c.data.image_size, c.data.channels)
  return architecture(config) == architecture(base_config())


def evaluate_targets(train_rows: Sequence[dict], ratios: Sequence[dict],
                     sample_rows: Sequence[dict], applicable: bool) -> list[dict]:
  """The performance issue's targets against this run's figures.

  They are set for a GPU and the original UNET (configs/mnist.py); elsewhere ``met`` is
  None and the figures are listed for reference only.
  """
  def first(items, **match):
    return next((r for r in items if all(r.get(k) == v for k, v in match.items())), None)

  def target(name, measured, limit, at_least, detail=""):
    met = None if measured is None or not applicable else (
        measured >= limit if at_least else measured <= limit)
    return dict(name=name, measured=measured, limit=limit, met=met, detail=detail)

  # Merged runs hold a ratio per run; each target takes the first run that measured it.
  fp32_64 = [r for r in ratios if r["batch"] == 64 and r["dtype"] == "float32"
             and r.get("variant", "jit") == "jit"]
  over_eager, over_compile = (next((r[key] for r in fp32_64 if r[key] is not None), None)
                              for key in ("jax_over_eager", "jax_over_compile"))
  bf16_256 = first(train_rows, framework="jax", variant="jit", dtype="bfloat16",
                   batch=256) or {}
  ddpm = [r for r in sample_rows if r["framework"] == "jax" and r["sampler"] == "DDPM-1000"
          and r["batch"] == 64]
  fastest_ddpm = min(ddpm, key=lambda r: r["seconds_per_batch"], default=None)
  jax_64 = [r for r in train_rows if r["framework"] == "jax" and r["variant"] == "jit"
            and r["batch"] == 64]
  fastest_64 = max(jax_64, key=lambda r: r["img_per_s"], default=None)
  return [
      target("train step fp32 batch 64: JAX / torch eager", over_eager, 2.0, True),
      target("train step fp32 batch 64: JAX / torch.compile", over_compile, 1.2, True),
      target("MFU bf16 batch 256", bf16_256.get("mfu"), 0.35, True),
      target("DDPM-1000, 64 images: seconds",
             fastest_ddpm["seconds_per_batch"] if fastest_ddpm else None, 3.0, False,
             f"JAX {fastest_ddpm['dtype']}" if fastest_ddpm else ""),
      target(f"{ORIGINAL_TRAIN_STEPS:,} steps at batch 64: minutes (step time only)",
             ORIGINAL_TRAIN_STEPS * 64 / fastest_64["img_per_s"] / 60 if fastest_64 else None,
             10.0, False, f"JAX {fastest_64['dtype']}" if fastest_64 else ""),
  ]


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return dict(python=platform.python_version(), jax=jax.__version__,
              jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__,
              torch=torch.__version__, numpy=np.__version__)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def device_info(devices: Devices) -> dict:
  info = dict(platform="gpu" if devices.is_gpu else "cpu", note=devices.note,
              jax_device=str(devices.jax_device), kind=devices.jax_device.device_kind,
              cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
              load_average_start=list(os.getloadavg()))
  if devices.is_gpu:
    info["kind"] = torch.cuda.get_device_name(devices.torch_device)
  return info


def compare_loop_program(loop_rows: Sequence[dict], train_rows: Sequence[dict]) -> None:
  """Sets each loop-program row's img/s against its one-step-a-call row's
  (``over_one_step_per_call``) and against the single step's train row of the same dtype
  and batch (``over_single_step``), where they were measured."""
  def img_per_s(rows, **match):
    row = next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)
    return row["img_per_s"] if row else None

  for row in loop_rows:
    key = dict(dtype=row["dtype"], batch=row["batch"])
    one = img_per_s(loop_rows, steps_per_call=1, **key)
    single = img_per_s(train_rows, framework="jax", status="ok", **key)
    row["over_one_step_per_call"] = row["img_per_s"] / one if one else None
    row["over_single_step"] = row["img_per_s"] / single if single else None


def assemble(config: ml_collections.ConfigDict, settings: Settings, command: str, date: str,
             devices: Devices, info: dict, train_rows: list[dict], loop_program: list[dict],
             sample_rows: list[dict], parity: list[dict], seed: dict | None,
             complete: bool) -> dict:
  """The JSON document from the rows measured so far."""
  analytic = analytic_forward_flops(config.model, config.data.image_size, config.data.channels)
  add_mfu(train_rows, 3 * analytic, info["kind"], devices.is_gpu)
  ratios = train_ratios(train_rows)
  compare_loop_program(loop_program, train_rows)
  reference = next((r for r in sample_rows if r["framework"] == "torch"), None)
  for row in sample_rows:
    if row["framework"] == "jax":
      row["speedup_over_original"] = row["img_per_s"] / reference["img_per_s"]
  info = dict(info, load_average_end=list(os.getloadavg()))
  applicable = devices.is_gpu and is_seed_unet(config)
  return dict(
      command=command, date=date, complete=complete, device=info, versions=versions(),
      config=dict(model=config.model.to_dict(), image_size=config.data.image_size,
                  channels=config.data.channels, schedule_steps=config.schedule.num_steps,
                  learning_rate=config.learning_rate, ema_decay=config.ema_decay),
      settings=dict(dataclasses.asdict(settings),
                    jax_default_matmul_precision=jax.config.jax_default_matmul_precision,
                    jax_compilation_cache_dir=jax.config.jax_compilation_cache_dir,
                    torch_float32_matmul_precision=torch.get_float32_matmul_precision(),
                    torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    env={k: os.environ.get(k) for k in ENV_VARS}),
      flops=dict(analytic_forward_flops_per_img=analytic,
                 analytic_train_flops_per_img=3 * analytic, seed_unet=seed),
      train=train_rows, train_ratios=ratios, loop_program=loop_program, sampling=sample_rows,
      parity=parity,
      breakdown=dict(batch=settings.batch_sizes[0],
                     **{framework: next((r["breakdown"] for r in train_rows
                                         if r["framework"] == framework and "breakdown" in r),
                                        None) for framework in ("jax", "torch")}),
      peak_flops_table=PEAK_FLOPS,
      targets_applicable=applicable,
      targets=evaluate_targets(train_rows, ratios, sample_rows, applicable))


def _fmt(value: float | None, spec: str = ".1f", scale: float = 1.0) -> str:
  return "–" if value is None else format(value * scale, spec)


def _times(value: float | None, spec: str = ".2f") -> str:
  return "–" if value is None else f"{value:{spec}}x"


def _mib(value: int | None) -> str:
  return _fmt(value, ".0f", 1 / 2**20)


def _loop_program_table(rows: Sequence[dict], settings: dict) -> list[str]:
  """The loop program's rows (:func:`bench.jax_rows.loop_program_rows`), per step."""
  if not rows:
    return []
  lines = ["", "The training loop's program (train.compile_train_steps: k steps a call in one "
           f"lax.scan, each step on the train rows' batch), per step: median of "
           f"{settings['reps']} repetitions",
           "| dtype | batch | steps a call | ms/step | img/s | vs 1 step a call | "
           "vs the single step | ms a call | compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['dtype']} | {r['batch']} | {r['steps_per_call']} | {r['step_ms']:.2f} | "
                 f"{r['img_per_s']:.1f} | {_times(r.get('over_one_step_per_call'), '.3f')} | "
                 f"{_times(r.get('over_single_step'), '.3f')} | {r['call_ms']:.1f} | "
                 f"{_fmt(r['compile_s'])} |")
  return lines


def report(doc: dict) -> str:
  """The human summary: markdown tables."""
  d, v = doc["device"], doc["versions"]
  s = doc["settings"]
  lines = [
      f"device: {d['kind']} — {d['note']}; {d['cpu_count']} CPUs ({d['cpu']}), torch threads "
      f"{d['torch_threads']}; load average {d['load_average_start'][0]:.1f} at start, "
      f"{d['load_average_end'][0]:.1f} at end",
      f"versions: jax {v['jax']} (jaxlib {v['jaxlib']}), flax {v['flax']}, optax {v['optax']}, "
      f"torch {v['torch']}, python {v['python']}",
      f"command: {doc['command']}", f"date: {doc['date']}",
      f"model: channels {tuple(doc['config']['model']['channels'])}, groups "
      f"{doc['config']['model']['num_groups']}, heads {doc['config']['model']['num_heads']}, "
      f"{doc['config']['image_size']}x{doc['config']['image_size']}x{doc['config']['channels']}"
      + (" — QUICK: CI-sized settings, not a measurement to quote" if s["quick"] else ""),
  ]
  if doc["train"]:
    lines += [
        "", f"Train step (Adam + EMA), img/s: median of {s['reps']} repetitions after "
        f"{s['warmup']} warm-up steps; torch rows are float32",
        "| framework | dtype | batch | img/s | ms/step | compile / first step s | "
        "XLA GFLOP/img | MFU | XLA peak MiB | device peak MiB | host peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in doc["train"]:
    name = f"JAX {r['variant']}" if r["framework"] == "jax" else f"torch {r['variant']}"
    if r["status"] != "ok":
      lines.append(f"| {name} | {r['dtype']} | {r['batch']} | {r['status']} "
                   "| | | | | | | |")
      continue
    mem = r["memory"]
    lines.append(
        f"| {name} | {r['dtype']} | {r['batch']} | {r['img_per_s']:.1f} | {r['step_ms']:.1f} | "
        f"{_fmt(r.get('compile_s', r.get('first_step_s')))} | "
        f"{_fmt(r.get('xla_train_flops_per_img'), '.3f', 1e-9)} | "
        f"{_fmt(r.get('mfu'), '.1%')} | "
        f"{_mib((mem.get('xla_bytes') or {}).get('peak'))} | "
        f"{_mib(mem['device_peak_bytes'])} | {_mib(mem['host_peak_rss_bytes'])} |")
  if doc["train_ratios"]:
    lines += ["", "| batch | JAX | JAX dtype | JAX / torch eager | JAX / torch.compile |",
              "|---|---|---|---|---|"]
  for r in doc["train_ratios"]:
    lines.append(f"| {r['batch']} | {r.get('variant', 'jit')} | {r['dtype']} | "
                 f"{_times(r['jax_over_eager'])} | "
                 f"{_times(r['jax_over_compile'])} |")
  lines += _loop_program_table(doc.get("loop_program", []), s)
  if doc["sampling"]:
    lines += ["", f"Sampling, img/s (median of {s['sample_reps']} calls after one warm-up; "
              "'timed' steps run, then scaled to the full count)",
              "| sampler | framework | dtype | batch | timed steps | img/s | s per batch | "
              "vs original |", "|---|---|---|---|---|---|---|---|"]
  for r in doc["sampling"]:
    timed = f"{r['timed_steps']} of {r['steps']}" + (" (scaled)" if r["scaled"] else "")
    lines.append(f"| {r['sampler']} | {r['framework']} | {r['dtype']} | {r['batch']} | "
                 f"{timed} | {r['img_per_s']:.2f} | {r['seconds_per_batch']:.2f} | "
                 f"{_times(r.get('speedup_over_original'), '.0f')} |")
  if doc.get("parity"):
    lines += ["", f"Parity on this device: the original's weights in both, batch "
              f"{doc['parity'][0]['batch']}, no dropout; JAX against torch float32 at the same "
              "precision ('default': as timed; 'highest': no TF32 on either side)",
              "| JAX dtype | precision | output max abs diff (output scale) | output rel L2 | "
              "loss JAX / torch | gradients rel L2 | worst parameter: max abs diff / max |",
              "|---|---|---|---|---|---|---|"]
  for r in doc.get("parity", []):
    lines.append(
        f"| {r['dtype']} | {r['precision']} | {r['output_max_abs_diff']:.2e} "
        f"({r['output_scale']:.2f}) | {r['output_rel_l2']:.2e} | {r['loss_jax']:.6f} / "
        f"{r['loss_torch']:.6f} | {r['grads_rel_l2']:.2e} | {r['worst_param']}: "
        f"{r['worst_param_max_abs_diff_over_max']:.2e} |")
  f = doc["flops"]
  seed = f["seed_unet"]
  xla = [r["xla_train_flops_per_img"] for r in doc["train"]
         if r["framework"] == "jax" and r.get("xla_train_flops_per_img")]
  lines += ["", "FLOPs per image (train = forward + backward):",
            f"  this model: analytic {f['analytic_train_flops_per_img'] / 1e9:.3f} GFLOP "
            f"(3 x forward {f['analytic_forward_flops_per_img'] / 1e9:.3f}); XLA compiled step "
            + (", ".join(f"{x / 1e9:.3f}" for x in xla) or "–") + " GFLOP"]
  if seed:  # Computed with the train rows.
    lines.append(
        f"  seed UNet 32x32: analytic {seed['analytic_train_flops_per_img'] / 1e9:.2f} GFLOP, "
        f"XLA (unoptimised HLO) {_fmt(seed['xla_lowered_train_flops_per_img'], '.2f', 1e-9)} "
        f"GFLOP, issue {seed['issue_train_flops_per_img'] / 1e9:.1f} GFLOP")
  copies = [f"{r['dtype']} batch {r['batch']}: {r['xla_copies']['count']} "
            f"({r['xla_copies']['bytes'] / 2**20:.0f} MiB)"
            for r in doc["train"] if r["framework"] == "jax" and r.get("xla_copies")]
  if copies:
    lines.append("  copy kernels XLA added to the JAX step (count, MiB written per step): "
                 + "; ".join(copies))
  mfu_peaks = {r["mfu_peak"]["name"] for r in doc["train"] if r.get("mfu_peak")}
  lines.append("  MFU: analytic train FLOPs x img/s / peak (" + (
      ", ".join(sorted(mfu_peaks)) if mfu_peaks else
      "–: reported on a GPU of the peak table only") + ")")
  b = doc["breakdown"]
  if b["jax"] and b["torch"]:
    j, t = b["jax"], b["torch"]
    lines += ["", f"Where the step time goes (float32, batch {b['batch']}, ms; JAX's backward "
              "is the rest of its fused step, torch's is timed alone):",
              "| part | JAX | torch eager |", "|---|---|---|",
              f"| forward + loss | {j['forward_ms']:.1f} | {t['forward_ms']:.1f} |",
              f"| backward | {j['backward_ms']:.1f} | {t['backward_ms']:.1f} |",
              f"| optimizer + EMA | {j['optimizer_ema_ms']:.1f} | "
              f"{t['optimizer_ms']:.1f} + {t['ema_ms']:.1f} |",
              f"| whole step | {j['step_ms']:.1f} | {t['step_ms']:.1f} |"]
  profiled = next((r for r in doc["train"] if r.get("profile")), None)
  if profiled:
    lines += ["", f"JAX's {profiled['dtype']} step at batch {profiled['batch']} in a "
              "jax.profiler trace (ms of op time per step by phase, UNet module and op; "
              "on a CPU, ops on several threads each count):",
              profiled["profile"].get("error") or profiling.format_summary(profiled["profile"])]
  lines += ["", "Targets of the performance issue (GPU, configs/mnist.py)" + (
      ":" if doc["targets_applicable"] else
      " — not applicable to this run (not a GPU, or not the original UNET):")]
  for t in doc["targets"]:
    met = ({True: "met", False: "NOT met"}[t["met"]] if t["met"] is not None else
           "not measured" if t["measured"] is None else "")
    lines.append(f"  {t['name']}: {_fmt(t['measured'], '.3g')} (limit {t['limit']:g})"
                 + (f" {met}" if met else "") + (f" [{t['detail']}]" if t["detail"] else ""))
  return "\n".join(lines)
