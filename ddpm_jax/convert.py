"""Weights between the original PyTorch UNET and ``ddpm_jax.model.UNet``.

A ``state_dict`` key names a parameter path one to one: ``Layer2.attention_layer.proj1.weight``
is ``params['Layer2']['attention_layer']['proj1']['kernel']``. Layouts differ: a torch
``Conv2d`` weight ``(out, in, kh, kw)`` and a ``ConvTranspose2d`` weight ``(in, out, kh, kw)``
both become ``(kh, kw, in_or_out, out_or_in)`` by the same permutation; a ``Linear``
weight is transposed; a ``GroupNorm`` weight is a ``scale``. torch is imported lazily, only
to read a checkpoint file.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax.errors import UserError
from ddpm_jax.model import UNet

_EMA_PREFIX = "module."
_TORCH_TO_FLAX_PERM = (2, 3, 1, 0)
_FLAX_TO_TORCH_PERM = (3, 2, 0, 1)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; avoid importing torch here.
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  keys = list(state_dict)
  if keys and all(k.startswith(_EMA_PREFIX) for k in keys):
    return {k[len(_EMA_PREFIX):]: _to_numpy(v) for k, v in state_dict.items()}
  return {k: _to_numpy(v) for k, v in state_dict.items()}


def infer_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The ``UNet`` fields a state_dict determines: channels, attentions, upscales, out_channels.

  Also returns ``in_channels``. (``num_groups`` and ``num_heads`` leave no trace in the
  weights; pass a ``UNet`` to :func:`torch_to_flax` when they differ from the defaults.)
  """
  sd = _strip_prefix(state_dict)
  channels, attentions, upscales = [], [], []
  i = 1
  while f"Layer{i}.ResBlock1.conv1.weight" in sd:
    channels.append(int(sd[f"Layer{i}.ResBlock1.conv1.weight"].shape[0]))
    attentions.append(f"Layer{i}.attention_layer.proj1.weight" in sd)
    conv = sd.get(f"Layer{i}.conv.weight")
    # Conv2d(C, 2C, 3) has a 3x3 kernel; ConvTranspose2d(C, C//2, 4) a 4x4 one.
    upscales.append(conv is not None and conv.ndim == 4 and conv.shape[-1] == 4)
    i += 1
  if not channels or "shallow_conv.weight" not in sd or "output_conv.weight" not in sd:
    raise UserError("not a state_dict of the original UNET: expected keys such as "
                    "'shallow_conv.weight', 'Layer1.ResBlock1.conv1.weight', 'output_conv.weight'")
  return dict(channels=tuple(channels), attentions=tuple(attentions), upscales=tuple(upscales),
              out_channels=int(sd["output_conv.weight"].shape[0]),
              in_channels=int(sd["shallow_conv.weight"].shape[1]))


def _flax_path(key: str, ndim: int) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
  """The params path of a torch key and the permutation its array needs (None: as is)."""
  *modules, leaf = key.split(".")
  if leaf == "bias":
    return (*modules, "bias"), None
  if leaf != "weight":  # Not a key of the original UNET: reported as unexpected.
    return (*modules, leaf), None
  if ndim == 4:
    return (*modules, "kernel"), _TORCH_TO_FLAX_PERM
  if ndim == 2:
    return (*modules, "kernel"), (1, 0)
  return (*modules, "scale"), None


def _expected_shapes(model: UNet, in_channels: int, image_size: int = 32) -> dict[str, tuple]:
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))["params"]
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _describe(keys, limit: int = 6) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def torch_to_flax(state_dict: Mapping[str, Any], model: UNet | None = None) -> dict:
  """Flax ``params`` for ``model`` (default: the architecture the weights imply).

  Accepts torch tensors or numpy arrays, with or without the EMA's ``module.`` prefix.
  Raises :class:`UserError` naming missing, unexpected or mis-shaped keys.
  """
  sd = _strip_prefix(state_dict)
  arch = infer_architecture(sd)
  in_channels = arch.pop("in_channels")
  if model is None:
    model = UNet(**arch)
  expected = _expected_shapes(model, in_channels)
  params: dict = {}
  unexpected, misshaped = [], []
  for key, value in sd.items():
    path, perm = _flax_path(key, value.ndim)
    if path not in expected:
      unexpected.append(key)
      continue
    # A copy: numpy views of torch tensors would change when the torch model trains on.
    array = np.array(value.transpose(perm) if perm else value, dtype=np.float32, order="C")
    if array.shape != expected[path]:
      misshaped.append(f"{key} {tuple(value.shape)}")
      continue
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = array
  found = {_flax_path(k, v.ndim)[0] for k, v in sd.items()}
  missing = [_torch_key(p) for p in expected if p not in found]
  problems = []
  if missing:
    problems.append(f"missing keys: {_describe(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_describe(unexpected)}")
  if misshaped:
    problems.append(f"wrong shapes for this UNet: {_describe(misshaped)}")
  if problems:
    raise UserError("state_dict does not match the UNet: " + "; ".join(problems))
  return params


def _torch_key(path: tuple[str, ...]) -> str:
  *modules, leaf = path
  return ".".join(modules + ["bias" if leaf == "bias" else "weight"])


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A ``state_dict`` (numpy arrays) that the original UNET's ``load_state_dict`` accepts."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(p.key for p in path)
    array = np.asarray(leaf, dtype=np.float32)
    if names[-1] == "kernel":
      array = array.transpose(_FLAX_TO_TORCH_PERM if array.ndim == 4 else (1, 0))
    out[_torch_key(names)] = np.ascontiguousarray(array)
  return out


def load_torch_checkpoint(path: str | os.PathLike, use_ema: bool = True,
                          model: UNet | None = None) -> dict:
  """Flax ``params`` from a checkpoint in the original's ``{'weights', 'optimizer', 'ema'}``
  format (a bare ``state_dict`` file is accepted too). ``use_ema`` picks the EMA weights."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(f"torch checkpoint {path!r} does not exist or is not a file")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("reading a PyTorch checkpoint needs torch: "
                    "pip install torch==2.13.0 (or 'ddpm-jax[torch]')") from e
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a file that is not a checkpoint.
    raise UserError(f"{path!r} is not a readable PyTorch checkpoint "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  if not isinstance(checkpoint, Mapping):
    raise UserError(f"{path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
  if "weights" in checkpoint or "ema" in checkpoint:
    key = "ema" if use_ema else "weights"
    if key not in checkpoint:
      other = "--no_use_ema" if use_ema else "--use_ema"
      raise UserError(f"checkpoint {path!r} has no {key!r} entry (it has {sorted(checkpoint)}); "
                      f"try {other}")
    state_dict = checkpoint[key]
  else:
    state_dict = checkpoint
  if not isinstance(state_dict, Mapping):
    raise UserError(f"checkpoint {path!r} entry is not a state_dict")
  try:
    return torch_to_flax(state_dict, model)
  except UserError as e:
    raise UserError(f"{path}: {e}") from e
