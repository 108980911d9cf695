"""FLOPs per image (an analytic count and XLA's), the devices' peak FLOP/s and MFU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ddpm_jax import train
from ddpm_jax.config_defaults import base_config
from ddpm_jax.train_state import abstract_train_state

from .timing import Devices

# Train FLOPs per 32x32 image of the original UNET quoted by the performance issue.
SEED_TRAIN_GFLOP = 21.8

# Dense (no sparsity) peak FLOP/s by device kind, from the vendors' datasheets. The
# float32 rows use the TF32 peak: JAX's default precision runs float32 convolutions and
# matmuls on the tensor cores as TF32 on these GPUs (the bench sets torch to match).
# The first key found in ``device_kind`` wins, so 'H100 PCIe' comes before 'H100'.
PEAK_FLOPS = {
    "H100 PCIe": {"bfloat16": 756e12, "tf32": 378e12, "float32": 51e12},
    "H100": {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},  # SXM
    "H200": {"bfloat16": 989e12, "tf32": 494e12, "float32": 67e12},  # H100 SXM's compute
    "A100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
}
# Which peak each compute dtype's MFU is taken against.
PEAK_KEY = {"float32": "tf32", "bfloat16": "bfloat16", "float16": "bfloat16"}


def analytic_forward_flops(model: ml_collections.ConfigDict, image_size: int,
                           in_channels: int) -> int:
  """FLOPs (2 per multiply-add) of one image's forward pass, convs and matmuls only.

  Follows ``ddpm_jax.model.UNet``: the shallow conv; per layer two ResBlocks of two 3x3
  convs, the optional attention (qkv and output projections, QK^T and AV), then a
  stride-2 3x3 conv down or the 4x4 stride-2 transposed conv up (its products: each input
  pixel times 4x4 taps; ``model.UpConv`` multiplies 2.25x as many, counting zero taps);
  the late and output convs. Norms, activations and the embedding add are left out.
  """
  def conv(size: int, c_in: int, c_out: int, kernel: int) -> int:
    return 2 * size * size * c_in * c_out * kernel * kernel

  n = len(model.channels)
  size, c = image_size, model.channels[0]
  flops = conv(size, in_channels, c, 3)
  skips = []
  for i in range(n):
    flops += 4 * conv(size, c, c, 3)
    if model.attentions[i]:
      tokens = size * size
      flops += 2 * tokens * c * 4 * c + 2 * 2 * tokens * tokens * c
    if i < n // 2:
      skips.append(c)
      flops += conv(size // 2, c, 2 * c, 3)
      size, c = size // 2, 2 * c
    else:
      flops += 2 * size * size * c * (c // 2) * 16
      size, c = 2 * size, c // 2 + skips[n - i - 1]
  late = (model.channels[-1] // 2 + model.channels[0]) // 2
  return flops + conv(size, c, late, 3) + conv(size, late, model.out_channels, 1)


def xla_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
  """The ``flops`` of XLA's cost analysis of a lowered or compiled computation."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def peak_flops(device_kind: str, dtype: str) -> tuple[str, float] | None:
  """``(table key / peak name, FLOP/s)`` for the device and compute dtype, if in the table."""
  for key, peaks in PEAK_FLOPS.items():
    if key.lower() in device_kind.lower():
      return f"{key} {PEAK_KEY[dtype]}", peaks[PEAK_KEY[dtype]]
  return None


def seed_unet_flops(devices: Devices) -> dict:
  """The original UNET's train FLOPs per 32x32 image: analytic and XLA (unoptimised HLO).

  Only lowered, never compiled or run, so it costs a trace even on a CPU.
  """
  config = base_config()
  batch = config.batch_size
  x = jax.ShapeDtypeStruct((batch, 32, 32, 1), jnp.float32)
  lowered = train.make_train_step(config, devices.mesh).lower(abstract_train_state(config), x)
  flops = xla_flops(lowered)
  return dict(analytic_train_flops_per_img=3 * analytic_forward_flops(config.model, 32, 1),
              xla_lowered_train_flops_per_img=flops / batch if flops else None,
              issue_train_flops_per_img=SEED_TRAIN_GFLOP * 1e9)


def add_mfu(rows: list[dict], train_flops_per_img: float, device_kind: str,
            is_gpu: bool) -> None:
  """MFU of each JAX row on a GPU: the model's train FLOPs/img x img/s / the dtype's peak.

  Model FLOPs (the analytic count), not XLA's: on a GPU, XLA's cost analysis of the
  compiled step leaves out the convolutions it hands to cuDNN as custom calls.
  """
  for row in rows:
    if row["framework"] != "jax":
      continue
    peak = peak_flops(device_kind, row["dtype"]) if is_gpu else None
    row["mfu"] = train_flops_per_img * row["img_per_s"] / peak[1] if peak else None
    row["mfu_peak"] = dict(name=peak[0], flops_per_s=peak[1]) if peak else None
