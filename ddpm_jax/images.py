"""PNG grids and reverse-process strips of NHWC images, written with PIL.

Samplers return raw images in the training data range ([0, 1] for ``'zero_one'``, the
original's, or [-1, 1] for ``'minus_one_one'``); only here are they mapped to pixels, and
clipped, for display.
"""

from __future__ import annotations

import math
import os
from typing import BinaryIO

import numpy as np
from PIL import Image

from ddpm_jax.data import to_unit_range
from ddpm_jax.errors import UserError

# Pixels between tiles, and their value.
PADDING = 2
PAD_VALUE = 128


def to_uint8(images: np.ndarray, data_range: str) -> np.ndarray:
  """Maps images in ``data_range`` to uint8 pixels, clipping what lies outside the range."""
  return np.round(np.clip(to_unit_range(images, data_range), 0.0, 1.0) * 255.0).astype(np.uint8)


def tile(images: np.ndarray, cols: int) -> np.ndarray:
  """Lays ``[N, H, W, C]`` images out row by row, ``cols`` to a row: ``[H', W', C]``."""
  n, h, w, c = images.shape
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + PADDING) + PADDING, cols * (w + PADDING) + PADDING, c),
                PAD_VALUE, images.dtype)
  for i, image in enumerate(images):
    y = PADDING + (i // cols) * (h + PADDING)
    x = PADDING + (i % cols) * (w + PADDING)
    out[y:y + h, x:x + w] = image
  return out


def _save_png(path: str | os.PathLike | BinaryIO, pixels: np.ndarray) -> None:
  channels = pixels.shape[-1]
  if channels not in (1, 3):
    raise UserError(f"can only write images with 1 or 3 channels as PNG, got {channels}")
  # uint8 [H, W] is mode 'L', uint8 [H, W, 3] mode 'RGB'.
  Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path, format="PNG")


def save_grid(path: str | os.PathLike | BinaryIO, images: np.ndarray, data_range: str) -> None:
  """Writes ``[N, H, W, C]`` images as a square-ish grid PNG: ``ceil(sqrt(N))`` columns."""
  _save_png(path, tile(to_uint8(images, data_range), math.ceil(math.sqrt(len(images)))))


def save_strip(path: str | os.PathLike | BinaryIO, frames: np.ndarray, data_range: str) -> None:
  """Writes a reverse-process strip PNG: ``frames [F, B, H, W, C]`` as B rows of F frames."""
  num_frames = frames.shape[0]
  rows = np.swapaxes(np.asarray(frames), 0, 1).reshape((-1,) + frames.shape[2:])
  _save_png(path, tile(to_uint8(rows, data_range), num_frames))
