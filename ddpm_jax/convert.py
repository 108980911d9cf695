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
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import checkpoint, files
from ddpm_jax.errors import ArgumentParser, UserError, run_cli
from ddpm_jax.model import UNet

_EMA_PREFIX = "module."
_TORCH_TO_FLAX_PERM = (2, 3, 1, 0)
_FLAX_TO_TORCH_PERM = (3, 2, 0, 1)


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor; avoid importing torch here.
    value = value.detach().cpu()
    value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
  return np.asarray(value)


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state_dict as numpy arrays, without the EMA's ``module.`` prefix."""
  arrays = {}
  for k, v in state_dict.items():
    value = _to_numpy(v) if isinstance(k, str) else None
    if value is None or value.ndim == 0 or value.dtype.kind != "f":
      raise UserError(f"not a state_dict of the original UNET: entry {k!r} is not a named "
                      "float tensor")
    arrays[k] = value
  if arrays and all(k.startswith(_EMA_PREFIX) for k in arrays):
    return {k[len(_EMA_PREFIX):]: v for k, v in arrays.items()}
  return arrays


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


# The order in which the original's modules register their parameters (``__init__``):
# ``model.parameters()``, and so the original's optimizer state, follow it.
_MODULE_RANK = {"shallow_conv": 0, "late_conv": 1, "output_conv": 2,  # UNET; then Layer1...
                "ResBlock1": 0, "ResBlock2": 1, "conv": 2, "attention_layer": 3,  # UnetLayer
                "gnorm1": 0, "gnorm2": 1, "conv1": 2, "conv2": 3,  # ResBlock
                "proj1": 0, "proj2": 1,  # Attention
                "weight": 0, "bias": 1}


def _original_rank(key: str) -> tuple[int, ...]:
  return tuple(3 + int(name[len("Layer"):]) if name.startswith("Layer") else _MODULE_RANK[name]
               for name in key.split("."))


def flax_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A ``state_dict`` (numpy arrays) that the original UNET's ``load_state_dict`` accepts,
  its keys in the original's order (that of ``model.parameters()``)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(p.key for p in path)
    array = np.asarray(leaf, dtype=np.float32)
    if names[-1] == "kernel":
      array = array.transpose(_FLAX_TO_TORCH_PERM if array.ndim == 4 else (1, 0))
    out[_torch_key(names)] = np.array(array, order="C")  # Owned and writable.
  return {key: out[key] for key in sorted(out, key=_original_rank)}


def _import_torch(purpose: str):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"{purpose} needs torch: pip install torch==2.13.0 (or 'ddpm-jax[torch]')"
                    ) from e
  return torch


def _adam_state(opt_state: Any) -> optax.ScaleByAdamState:
  found = [s for s in jax.tree.leaves(opt_state,
                                      is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  if len(found) != 1:
    raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
  return found[0]


def to_torch_checkpoint(params: Any, ema_params: Any, opt_state: Any,
                        learning_rate: float) -> dict:
  """The original's checkpoint, ``{'weights', 'optimizer', 'ema'}``, from a train state.

  ``weights`` and ``ema`` (keys prefixed ``module.``, as timm's EMA saves them) are the
  UNET's state_dicts; ``optimizer`` is the state_dict of ``torch.optim.Adam(
  model.parameters(), lr=learning_rate)`` holding Adam's moments and step count, so the
  original's ``train(checkpoint_path=...)`` resumes where this run stopped (optax's and
  torch's Adam are the same arithmetic). Warm-up and gradient clipping, which the original
  lacks, are not carried over. Needs torch.
  """
  torch = _import_torch("writing a PyTorch checkpoint")
  adam = _adam_state(opt_state)
  weights = flax_to_torch(params)
  moments = flax_to_torch(adam.mu), flax_to_torch(adam.nu)
  tensors = [torch.nn.Parameter(torch.from_numpy(w)) for w in weights.values()]
  optimizer = torch.optim.Adam(tensors, lr=learning_rate)
  for tensor, key in zip(tensors, weights):
    optimizer.state[tensor] = {"step": torch.tensor(float(adam.count)),
                               "exp_avg": torch.from_numpy(moments[0][key]),
                               "exp_avg_sq": torch.from_numpy(moments[1][key])}
  return {"weights": {k: torch.from_numpy(v) for k, v in weights.items()},
          "optimizer": optimizer.state_dict(),
          "ema": {_EMA_PREFIX + k: torch.from_numpy(v)
                  for k, v in flax_to_torch(ema_params).items()}}


def _read_torch_checkpoint(path: str) -> Mapping:
  """The dict a PyTorch checkpoint file holds; :class:`UserError` for anything else."""
  if not os.path.isfile(path):
    raise UserError(f"torch checkpoint {path!r} does not exist or is not a file")
  torch = _import_torch("reading a PyTorch checkpoint")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for a file that is not a checkpoint.
    raise UserError(f"{path!r} is not a readable PyTorch checkpoint "
                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
  if not isinstance(checkpoint, Mapping):
    raise UserError(f"{path!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
  return checkpoint


def load_torch_checkpoint(path: str | os.PathLike, use_ema: bool = True,
                          model: UNet | None = None) -> dict:
  """Flax ``params`` from a checkpoint in the original's ``{'weights', 'optimizer', 'ema'}``
  format (a bare ``state_dict`` file is accepted too). ``use_ema`` picks the EMA weights."""
  path = os.fspath(path)
  checkpoint = _read_torch_checkpoint(path)
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


def load_torch_training_state(path: str | os.PathLike, model: UNet
                              ) -> tuple[dict, dict, optax.ScaleByAdamState]:
  """``(params, ema_params, adam_state)`` from the original's checkpoint, for ``model``.

  The inverse of :func:`to_torch_checkpoint`: 'weights', 'ema' and the Adam moments and
  step count of 'optimizer', whose i-th parameter is the i-th of the original's
  ``model.parameters()``. Raises :class:`UserError` for a file that is not such a
  checkpoint or does not fit ``model``.
  """
  path = os.fspath(path)
  checkpoint = _read_torch_checkpoint(path)
  missing = [k for k in ("weights", "ema", "optimizer") if k not in checkpoint]
  if missing:
    raise UserError(f"{path} has no {', '.join(map(repr, missing))} entry (it has "
                    f"{sorted(checkpoint)}): training resumes from the original's full "
                    "checkpoint, {'weights', 'optimizer', 'ema'}")
  try:
    params = torch_to_flax(checkpoint["weights"], model)
    ema_params = torch_to_flax(checkpoint["ema"], model)
  except UserError as e:
    raise UserError(f"{path}: {e}") from e
  weights = _strip_prefix(checkpoint["weights"])
  order = sorted(weights, key=_original_rank)
  try:
    groups, state = checkpoint["optimizer"]["param_groups"], checkpoint["optimizer"]["state"]
    ids = [i for group in groups for i in group["params"]]
  except (KeyError, TypeError) as e:
    raise UserError(f"{path}: 'optimizer' is not a torch.optim.Adam state_dict ({e!r})") from e
  if len(ids) != len(order):
    raise UserError(f"{path}: 'optimizer' holds {len(ids)} parameters, the UNET has "
                    f"{len(order)}")
  moments: tuple[dict, dict] = ({}, {})
  steps = set()
  for i, key in zip(ids, order):
    entry = state.get(i)
    if entry is None:  # Never stepped: Adam's moments are still zero.
      moments[0][key] = moments[1][key] = np.zeros(weights[key].shape, np.float32)
      steps.add(0)
      continue
    if not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
      raise UserError(f"{path}: 'optimizer' is not a torch.optim.Adam state_dict (parameter "
                      f"{key} has {sorted(entry)})")
    moments[0][key], moments[1][key] = entry["exp_avg"], entry["exp_avg_sq"]
    steps.add(int(_to_numpy(entry["step"])))
  if len(steps) != 1:
    raise UserError(f"{path}: the parameters' Adam step counts differ ({sorted(steps)})")
  try:
    mu, nu = (torch_to_flax(m, model) for m in moments)
  except UserError as e:
    raise UserError(f"{path}: 'optimizer': {e}") from e
  return params, ema_params, optax.ScaleByAdamState(count=jnp.asarray(steps.pop(), jnp.int32),
                                                    mu=mu, nu=nu)


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m ddpm_jax.convert --workdir DIR --out FILE``: a run as the original's checkpoint."""
  parser = ArgumentParser(
      prog="python -m ddpm_jax.convert",
      description="Writes a training workdir's newest checkpoint (or --step's) as the "
      "original tutorial's PyTorch checkpoint ({'weights', 'optimizer', 'ema'}): its "
      "inference() samples from it and its train(checkpoint_path=...) resumes it.")
  parser.add_argument("--workdir", required=True, help="a ddpm_jax.train workdir")
  parser.add_argument("--out", required=True, help="the checkpoint file to write")
  parser.add_argument("--step", type=int, default=None,
                      help="the workdir's checkpoint of this step (default: the newest)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  args = parser.parse_args(argv)
  files.check_outputs([args.out], args.overwrite)
  torch = _import_torch("writing a PyTorch checkpoint")
  if os.path.isdir(args.workdir):  # Refused before the checkpoint is read.
    _refuse_conditional(checkpoint.read_config(args.workdir), args.workdir)
  config, step, state = checkpoint.load_run_state(args.workdir, step=args.step)
  _refuse_conditional(config, args.workdir)
  ckpt = to_torch_checkpoint(state.params, state.ema_params, state.opt_state,
                             config.learning_rate)
  files.write_atomic(args.out, lambda f: torch.save(ckpt, f))
  m = config.model
  print(f"wrote {args.out}: step {step} of {args.workdir} as the original's checkpoint "
        f"({len(ckpt['weights'])} tensors each in 'weights' and 'ema'; Adam lr "
        f"{config.learning_rate:g}). Load it into UNET(Channels={list(m.channels)}, "
        f"Attentions={list(m.attentions)}, Upscales={list(m.upscales)}, "
        f"num_groups={m.num_groups}, dropout_prob={m.dropout_rate}, num_heads={m.num_heads}, "
        f"input_channels={config.data.channels}, output_channels={m.out_channels}, "
        f"time_steps={m.time_steps})")
  differences = _differences_from_the_original(config)
  if differences:
    reader = (f"`python -m ddpm_jax.sample --torch_checkpoint {args.out} --data_range "
              f"{config.data.range}`" if differences == [_range_difference(config)] else
              f"`python -m ddpm_jax.sample --workdir {args.workdir}`")
    print(f"note: the original's code assumes other settings than this run's "
          f"({'; '.join(differences)}), so its samples of this file come out wrong; "
          f"{reader} samples it right", flush=True)
  return 0


def _refuse_conditional(config, workdir: str) -> None:
  """A class-conditional run has a class embedding the original's UNET has no input for."""
  num_classes = config.model.get("num_classes", 0)
  if num_classes > 0:
    raise UserError(f"{workdir} is a class-conditional run (model.num_classes = {num_classes}); "
                    "the original's UNET has no class input, so it cannot be converted "
                    "(python -m ddpm_jax.sample --workdir samples it)")


def _range_difference(config) -> str:
  return f"data in {config.data.range}, not zero_one"


def _differences_from_the_original(config) -> list[str]:
  """What of a run's data, schedule and model output the original's code (and
  ``--torch_checkpoint`` sampling) would take for something else.

  A stored config from before ``objective`` and ``schedule.kind`` existed means the
  original's eps and linear. ``loss_weighting`` (and ``min_snr_gamma``, ``ema_warmup``) are
  not differences: they change how the training weighs its examples (or averages its
  weights), not what the network's output means nor the process it reverses, so the
  original's sampler reads such a run's weights right.
  """
  original = dict(num_steps=1000, beta_start=1e-4, beta_end=0.02)
  differences = [_range_difference(config)] if config.data.range != "zero_one" else []
  kind = config.schedule.get("kind", "linear")
  if kind != "linear":
    differences.append(f"the {kind} schedule, not linear")
  if kind != "linear":  # Only the linear schedule reads the betas.
    original = dict(num_steps=1000)
  schedule = {k: config.schedule[k] for k in original}
  if schedule != original:
    differences.append(f"schedule {schedule}, not {original}")
  objective = config.get("objective", "eps")
  if objective != "eps":
    differences.append(f"the model predicts {objective}, not the noise (eps)")
  if config.data.image_size != 32:
    differences.append(f"{config.data.image_size}x{config.data.image_size} images, not 32x32")
  return differences


if __name__ == "__main__":
  run_cli(main)
