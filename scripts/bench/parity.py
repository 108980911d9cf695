"""Parity on the bench's device: JAX's output, loss and gradients against the original's,
from the same weights and inputs, at the timed precision, at full float32 and per JAX
compute dtype."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import convert, diffusion
from ddpm_jax.model import build_unet
from ddpm_jax.train_state import make_schedule

from .jax_rows import with_settings
from .optional import torch
from .settings import Settings
from .timing import Devices
from .torch_rows import reference_model

# Images in the parity check: the numbers, not the speed, so a small batch.
PARITY_BATCH = 8


@contextlib.contextmanager
def torch_full_float32(enabled: bool):
  """With ``enabled``, torch's float32 convolutions and matmuls at full precision (no TF32)."""
  saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
  if enabled:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
  try:
    yield
  finally:
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def parity_inputs(config: ml_collections.ConfigDict, batch: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(x_t, t, e)`` of a training step, NCHW float32: digits-like uniform images noised to
  timesteps spread over the schedule, and their noise."""
  rng = np.random.default_rng(config.seed)
  shape = (batch, config.data.channels, config.data.image_size, config.data.image_size)
  x0 = rng.random(shape, dtype=np.float32)
  e = rng.standard_normal(shape, dtype=np.float32)
  t = np.linspace(0, config.schedule.num_steps - 1, batch).round().astype(np.int64)
  x_t = diffusion.q_sample(make_schedule(config), jnp.asarray(x0), jnp.asarray(t),
                           jnp.asarray(e))
  return np.asarray(x_t), t, e


def torch_loss_and_grads(model, x_t: np.ndarray, t: np.ndarray, e: np.ndarray,
                         devices: Devices) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
  """The original's output (NCHW), MSE loss on the noise and gradients by parameter name."""
  model.zero_grad(set_to_none=True)
  out = model(torch.from_numpy(x_t).to(devices.torch_device), torch.from_numpy(t))
  loss = torch.mean((out - torch.from_numpy(e).to(devices.torch_device)) ** 2)
  loss.backward()
  grads = {name: p.grad.detach().cpu().numpy() for name, p in model.named_parameters()}
  return out.detach().cpu().numpy(), float(loss), grads


def jax_loss_and_grads(config: ml_collections.ConfigDict, dtype: str, params: Any,
                       x_t: np.ndarray, t: np.ndarray, e: np.ndarray
                       ) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
  """The same from ``ddpm_jax`` at compute ``dtype``: output as NCHW, gradients as the
  original's ``state_dict`` names and layouts (``convert.flax_to_torch``)."""
  apply_fn = build_unet(with_settings(config, dtype=dtype).model).apply
  x = jnp.asarray(x_t.transpose(0, 2, 3, 1))
  eps = jnp.asarray(e.transpose(0, 2, 3, 1))

  def loss_fn(p):
    out = apply_fn({"params": p}, x, jnp.asarray(t, jnp.int32)).astype(jnp.float32)
    return jnp.mean((out - eps) ** 2), out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return (np.asarray(out).transpose(0, 3, 1, 2), float(loss),
          convert.flax_to_torch(jax.device_get(grads)))


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def parity_rows(config: ml_collections.ConfigDict, devices: Devices,
                settings: Settings) -> Iterator[dict]:
  """JAX against the original on this device, from the same weights and inputs.

  The original UNET (dropout 0: the original applies attention dropout even in eval
  mode) is converted to Flax params; both compute the output, the MSE on the noise and
  every gradient for ``PARITY_BATCH`` noised images. Rows: float32 at the precision the
  bench times ('default': JAX's default, TF32 on a recent GPU; torch set to match), float32
  at full precision on both sides ('highest'), and each other JAX compute dtype against
  torch float32 at the timed precision.
  """
  model = reference_model(config, devices, dropout_prob=0.0).eval()
  state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
  params = jax.device_put(convert.torch_to_flax(state, build_unet(config.model)),
                          devices.jax_device)
  x_t, t, e = parity_inputs(config, PARITY_BATCH)
  cases = [("float32", "default"), ("float32", "highest")]
  cases += [(d, "default") for d in settings.dtypes if d != "float32"]
  references = {}
  for dtype, precision in cases:
    highest = precision == "highest"
    if precision not in references:
      with torch_full_float32(highest):
        references[precision] = torch_loss_and_grads(model, x_t, t, e, devices)
    ref_out, ref_loss, ref_grads = references[precision]
    with jax.default_matmul_precision("highest") if highest else contextlib.nullcontext():
      out, loss, grads = jax_loss_and_grads(config, dtype, params, x_t, t, e)
    names = list(ref_grads)

    def off(k: str) -> float:  # A parameter's largest gradient error over its largest entry.
      return float(np.abs(grads[k] - ref_grads[k]).max()
                   / max(float(np.abs(ref_grads[k]).max()), 1e-30))

    worst = max(names, key=off)
    flat = [np.concatenate([g[k].ravel() for k in names]) for g in (grads, ref_grads)]
    yield dict(
        dtype=dtype, precision=precision, batch=PARITY_BATCH,
        timesteps=[int(t.min()), int(t.max())], output_scale=float(np.abs(ref_out).max()),
        output_max_abs_diff=float(np.abs(out - ref_out).max()),
        output_rel_l2=_rel_l2(out, ref_out), loss_jax=loss, loss_torch=ref_loss,
        grads_rel_l2=_rel_l2(*flat), worst_param=worst,
        worst_param_max_abs_diff_over_max=off(worst))
