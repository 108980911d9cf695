"""The original's rows (``reference_torch``): its train step, eager and with the model under
``torch.compile``, the step's parts timed alone, and its one-image-at-a-time sampler."""

from __future__ import annotations

import statistics
import time

import ml_collections

from .optional import R, torch
from .settings import Settings
from .timing import Devices, host_memory, time_calls


def reference_model(config: ml_collections.ConfigDict, devices: Devices,
                    dropout_prob: float | None = None):
  """``reference_torch.UNET`` with the config's architecture (and dropout unless given),
  on the torch device."""
  torch.manual_seed(config.seed)
  m = config.model
  return R.UNET(Channels=list(m.channels), Attentions=list(m.attentions),
                Upscales=list(m.upscales), num_groups=m.num_groups,
                dropout_prob=m.dropout_rate if dropout_prob is None else dropout_prob,
                num_heads=m.num_heads,
                input_channels=config.data.channels, output_channels=m.out_channels,
                time_steps=m.time_steps).to(devices.torch_device)


def torch_train(config: ml_collections.ConfigDict, batch: int, devices: Devices,
                settings: Settings, compiled: bool, breakdown: bool) -> dict:
  """The original's step (eager, or the model under ``torch.compile``): Adam + EMA."""
  model = reference_model(config, devices)
  optimizer, ema, criterion = R.make_training(model, lr=config.learning_rate,
                                              ema_decay=config.ema_decay)
  scheduler = R.DDPM_Scheduler(num_time_steps=config.schedule.num_steps)
  if compiled:
    # Forget earlier compilations: having seen another batch size, dynamo would otherwise
    # compile a dynamic-shape graph for this one.
    torch.compiler.reset()
  net = torch.compile(model) if compiled else model
  size, channels = config.data.image_size, config.data.channels
  x = torch.rand(batch, channels, size, size, device=devices.torch_device)
  num_steps = config.schedule.num_steps

  def run():
    # As the original's loop: t on the host, the noise on the device, drawn every step.
    t = torch.randint(0, num_steps, (batch,))
    e = torch.randn_like(x)
    return R.train_step(net, optimizer, ema, criterion, scheduler, x, t, e)

  if devices.is_gpu:
    torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  devices.torch_sync(run())
  first_step_s = time.perf_counter() - start
  timing = time_calls(run, devices.torch_sync, settings.reps, settings.warmup,
                      settings.min_rep_s)
  row = dict(framework="torch", variant="compile" if compiled else "eager", dtype="float32",
             batch=batch, status="ok", img_per_s=batch / timing.median,
             step_ms=1e3 * timing.median, timing=timing.to_json(), first_step_s=first_step_s,
             memory=dict(device_peak_bytes=torch.cuda.max_memory_allocated()
                         if devices.is_gpu else None, **host_memory()))
  if breakdown:
    row["breakdown"] = torch_breakdown(model, optimizer, ema, criterion, scheduler, x,
                                       num_steps, timing.median, devices, settings)
  return row


def torch_breakdown(model, optimizer, ema, criterion, scheduler, x, num_steps: int,
                    step_s: float, devices: Devices, settings: Settings) -> dict:
  """The pieces of ``reference_torch.train_step`` timed alone: forward, ``loss.backward()``,
  ``optimizer.step()`` and the EMA update."""
  batch = x.shape[0]
  t = torch.randint(0, num_steps, (batch,))
  e = torch.randn_like(x)
  a = scheduler.alpha[t].view(batch, 1, 1, 1).to(x.device)
  x_t = torch.sqrt(a) * x + torch.sqrt(1 - a) * e

  def forward():
    return criterion(model(x_t, t), e)

  def backward() -> float:
    """Seconds of one ``loss.backward()``, its forward run and synced before the clock."""
    optimizer.zero_grad()
    loss = forward()
    devices.torch_sync()
    start = time.perf_counter()
    loss.backward()
    devices.torch_sync()
    return time.perf_counter() - start

  def timed(fn):
    return time_calls(fn, devices.torch_sync, settings.reps, max(settings.warmup, 1),
                      settings.min_rep_s).median

  forward_s = timed(forward)
  backward_s = statistics.median([backward() for _ in range(max(settings.warmup, 1) +
                                                            settings.reps)][-settings.reps:])
  optimizer_s = timed(optimizer.step)
  ema_s = timed(lambda: ema.update(model))
  return dict(step_ms=1e3 * step_s, forward_ms=1e3 * forward_s, backward_ms=1e3 * backward_s,
              optimizer_ms=1e3 * optimizer_s, ema_ms=1e3 * ema_s)


def torch_compile_row(config: ml_collections.ConfigDict, batch: int, devices: Devices,
                      settings: Settings) -> dict:
  """The ``torch.compile`` row, or a row saying why it was skipped or failed."""
  row = dict(framework="torch", variant="compile", dtype="float32", batch=batch)
  if not settings.torch_compile:
    return dict(row, status="skipped (--quick)" if settings.quick else
                "skipped (--notorch_compile)")
  try:
    return torch_train(config, batch, devices, settings, compiled=True, breakdown=False)
  except Exception as e:  # pylint: disable=broad-except
    reason = " ".join(str(e).split()) or type(e).__name__
    return dict(row, status=f"failed: {type(e).__name__}: {reason[:300]}")


def torch_sample(config: ml_collections.ConfigDict, devices: Devices,
                 settings: Settings) -> dict:
  """The original's sampler, one image at a time; a few steps timed, scaled to all."""
  full = config.schedule.num_steps
  timed = min(full, settings.reference_timed_steps)
  model = reference_model(config, devices).eval()
  # A `timed`-step schedule runs `timed` model calls of the original's loop. As in the
  # original, z and the schedule stay on the CPU and each model call moves z to the
  # device and its output back.
  scheduler = R.DDPM_Scheduler(num_time_steps=timed)
  size, channels = config.data.image_size, config.data.channels
  z = torch.randn(1, channels, size, size)
  timing = time_calls(lambda: R.sample(model, scheduler, z)[0], devices.torch_sync,
                      settings.sample_reps, 1)
  image_s = timing.median * full / timed
  return dict(framework="torch", sampler=f"DDPM-{full} (original, one image at a time)",
              dtype="float32", batch=1, steps=full, timed_steps=timed, scaled=timed < full,
              img_per_s=1.0 / image_s, seconds_per_batch=image_s, timing=timing.to_json())
