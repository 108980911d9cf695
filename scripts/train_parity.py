"""Outcome parity: a whole training run in ddpm_jax against the same run in the original.

  python scripts/train_parity.py --config configs/mnist_tiny.py --num_train_steps 2500 \
      --out results/train-parity-cpu --seeds 2
  python scripts/train_parity.py --config configs/mnist_tiny.py --out /tmp/p --quick

Single-step tests (``tests/test_parity.py``) show that one update agrees; this shows where
thousands of them lead. Per seed, both sides start from the same weights (the original
``UNET``'s PyTorch init, converted with ``convert.torch_to_flax``; the EMA a copy, Adam
fresh), see the same batches in the same order (``data.BatchIterator`` over the
preprocessed data) and the same ``t`` and noise at every step:

* JAX: the compiled train step ``python -m ddpm_jax.train`` runs
  (``train.compile_train_step``), which draws ``t`` and the noise inside
  ``diffusion.loss`` from ``fold_in(state.rng, state.step)``;
* torch: ``reference_torch.train_step`` (the original's Adam and ModelEmaV3 EMA), fed the
  same draws, reproduced outside the step from the same key, with the learning rate of
  ddpm_jax's schedule (``train_state.learning_rate_at``) set before each update.

Dropout masks cannot match between frameworks; with ``model.dropout_rate > 0`` each side
draws its own, and the output says so. Every step's loss is recorded on both sides, and
at a few steps the relative L2 distance between the two sides' raw and EMA weights. At
the end, both EMA models are sampled by ddpm_jax's DDIM sampler as ``make demo`` samples
(50 steps, eta 1, x0 clipped to the data range, batches of 64, the same seed and noise
for both) and scored by ``ddpm_jax.evaluate``. With ``--seeds 2`` a second pair of runs
(``config.seed + 1``: another init, other batches, other draws) gives the seed-to-seed
spread that the framework difference is held against.

Writes ``DIR/parity.json`` and ``DIR/loss_curves.png`` (the loss curves, their difference,
and both sides' samples), nothing before its checks pass, and replaces an existing
``DIR/parity.json`` only with ``--overwrite``. ``--quick`` runs a micro UNet for a few
steps and scores 16 samples of a few DDIM steps (for tests and CI).
"""

from __future__ import annotations

import os
import sys

# JAX must not take most of a GPU's memory up front: torch allocates in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Runnable from a plain checkout: reference_torch lives next to ddpm_jax.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,g-bad-import-order
import dataclasses
import datetime
import functools
import io
import json
import math
import platform
import shlex
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoint, cli, data, evaluate, files, images, sample, train, train_state
from ddpm_jax.config_checks import validate_config
from ddpm_jax.convert import flax_to_torch, to_torch_checkpoint, torch_to_flax
from ddpm_jax.errors import UserError, run_cli
from ddpm_jax.model import build_unet

try:
  import torch
  import reference_torch as R
except ImportError:  # Reported by main() as a one-line error.
  torch = R = None
# pylint: enable=g-import-not-at-top,g-bad-import-order

# The micro UNet of --quick: the original's wiring at an eighth of its widths.
QUICK_MODEL = dict(channels=(8, 16, 32, 64, 64, 48), num_groups=4, num_heads=2,
                   dropout_rate=0.0)
QUICK_BATCH_SIZE = 8
QUICK_STEPS = 8
QUICK_SAMPLES = 16
QUICK_DDIM_STEPS = 5
DEFAULT_SAMPLES = 256
DEFAULT_DDIM_STEPS = 50  # As `make demo` samples: DDIM-50, eta 1, x0 clipped.
DDIM_ETA = 1.0
SAMPLE_BATCH = 64  # sample.py's default batch for N >= 64.
GRID_IMAGES = 64
# Steps after which the two sides' weights are compared (those <= N, and N).
DISTANCE_STEPS = (1, 10, 100, 1000)
SMOOTH_STEPS = 50  # The running mean of the plotted curves.
FINAL_WINDOW = 100  # The final loss: the mean of the last so many steps.
DRAW_CHUNK = 50  # Steps whose t and noise are drawn in one call.
MEASURES = ("final_loss", "frechet_distance", "mean_confidence", "frac_confident", "class_kl")
# A first-step loss further apart than this means the two sides did not get the same
# weights, batch, t or noise: a broken comparison, not a framework difference.
FIRST_STEP_SANITY = 1e-3

USAGE = """\
usage: python scripts/train_parity.py --config FILE --num_train_steps N --out DIR
           [--seeds S] [--quick] [--num_samples K] [--ddim_steps D] [--rounding_control]
           [--torch_threads T] [--overwrite]
           [--config.KEY=VALUE ...]

Trains FILE's config for N steps in ddpm_jax (its compiled train step) and in the
original PyTorch code (reference_torch) from the same initial weights, batches, t and
noise; samples both EMA models with the same DDIM noise and scores them with
ddpm_jax.evaluate. With --seeds 2 a second pair of runs from config.seed + 1 gives the
seed-to-seed spread. Writes DIR/parity.json and DIR/loss_curves.png.

  --config FILE         a config file, e.g. configs/mnist_tiny.py
  --num_train_steps N   steps per run (default: the config's num_train_steps); the
                        learning-rate schedule is that of an N-step run
  --out DIR             where parity.json and loss_curves.png go
  --seeds S             runs per framework, from config.seed, config.seed + 1, ... (1)
  --quick               a micro UNet (channels (8,16,32,64,64,48), 4 groups, 2 heads, no
                        dropout, batch 8), 8 steps, 16 samples of DDIM-5: for tests
  --num_samples K       samples per model for the evaluation (256; --quick 16)
  --ddim_steps D        DDIM steps of those samples (50; --quick 5)
  --torch_threads T     torch's CPU threads (0: half the cores, at least 1)
  --rounding_control    per seed, a third run: the original's from an init one float32 ulp
                        off in every weight, to show how far rounding alone carries a run
  --overwrite           replace an existing DIR/parity.json
  --config.KEY=VALUE    overrides a key of the config (--quick sets its keys after these)
  -h, --help            this message
"""


def define_flags(flag_values) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer("num_train_steps", None, "Steps per run.", flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output directory.", flag_values=flag_values)
  flags.DEFINE_integer("seeds", 1, "Runs per framework.", flag_values=flag_values)
  flags.DEFINE_boolean("quick", False, "Micro UNet, few steps.", flag_values=flag_values)
  flags.DEFINE_integer("num_samples", None, "Samples per model.", flag_values=flag_values)
  flags.DEFINE_integer("ddim_steps", None, "DDIM steps.", flag_values=flag_values)
  flags.DEFINE_integer("torch_threads", 0, "torch CPU threads.", flag_values=flag_values)
  flags.DEFINE_boolean("rounding_control", False, "Also the original from an init 1 ulp off.",
                       flag_values=flag_values)
  flags.DEFINE_boolean("overwrite", False, "Replace parity.json.", flag_values=flag_values)


@dataclasses.dataclass(frozen=True)
class Settings:
  num_train_steps: int
  seeds: int
  num_samples: int
  ddim_steps: int
  control: bool = False


def apply_quick(config: ml_collections.ConfigDict, num_train_steps: int) -> None:
  """The micro UNet and batch of ``--quick``; a warm-up that fits the short run."""
  for key, value in QUICK_MODEL.items():
    config.model[key] = value
  config.batch_size = QUICK_BATCH_SIZE
  config.warmup_steps = min(config.warmup_steps, num_train_steps // 2)


def check_original_can_train(config: ml_collections.ConfigDict) -> None:
  """:class:`UserError` for a config whose training the original code has no counterpart
  for (keys read with defaults: a config may predate them)."""
  unsupported = []
  if config.get("objective", "eps") != "eps":
    unsupported.append(f"objective={config.get('objective')} (the original predicts eps)")
  if config.schedule.get("kind", "linear") != "linear":
    unsupported.append(f"schedule.kind={config.schedule.get('kind')} (the original's is linear)")
  if config.get("loss_weighting", "none") != "none":
    unsupported.append(f"loss_weighting={config.get('loss_weighting')} (the original's MSE is "
                       "unweighted)")
  if config.get("ema_warmup", False):
    unsupported.append("ema_warmup=True (the original's EMA decay is constant)")
  if config.get("grad_clip_norm", 0.0) > 0:
    unsupported.append(f"grad_clip_norm={config.get('grad_clip_norm')} (the original does not "
                       "clip)")
  if config.get("init_torch_checkpoint", ""):
    unsupported.append("init_torch_checkpoint (both sides start from the original's init)")
  if unsupported:
    raise UserError("the original code cannot train this config: " + "; ".join(unsupported))
  if (config.data.image_size, config.data.channels) != evaluate.IMAGE_SHAPE[1:]:
    raise UserError(f"the evaluation classifier reads 32x32 images of 1 channel; the config's "
                    f"are {config.data.image_size}x{config.data.image_size} of "
                    f"{config.data.channels}")


@dataclasses.dataclass(frozen=True)
class Devices:
  """The one JAX device and the one torch device both runs use."""
  jax_device: Any
  torch_device: Any
  note: str

  @property
  def mesh(self) -> Mesh:
    return Mesh(np.asarray([self.jax_device]), ("data",))

  @property
  def is_gpu(self) -> bool:
    return self.torch_device.type == "cuda"


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


def reference_unet(config: ml_collections.ConfigDict, devices: Devices):
  """The original ``UNET`` with ``config``'s architecture, initialised by PyTorch from
  ``config.seed`` (the original's ``set_seed``)."""
  R.set_seed(config.seed)
  m = config.model
  return R.UNET(Channels=list(m.channels), Attentions=list(m.attentions),
                Upscales=list(m.upscales), num_groups=m.num_groups,
                dropout_prob=m.dropout_rate, num_heads=m.num_heads,
                input_channels=config.data.channels, output_channels=m.out_channels,
                time_steps=m.time_steps).to(devices.torch_device)


def reference_scheduler(config: ml_collections.ConfigDict, device):
  """The original's ``DDPM_Scheduler`` with ``config.schedule``'s betas."""
  s = config.schedule
  scheduler = R.DDPM_Scheduler(s.num_steps)
  scheduler.beta = torch.linspace(s.beta_start, s.beta_end, s.num_steps)
  scheduler.alpha = torch.cumprod(1 - scheduler.beta, dim=0)
  scheduler.beta, scheduler.alpha = scheduler.beta.to(device), scheduler.alpha.to(device)
  return scheduler


@functools.partial(jax.jit, static_argnums=(2, 3))
def step_draws(rng: jax.Array, steps: jax.Array, batch_shape: tuple[int, ...],
               num_time_steps: int) -> tuple[jax.Array, jax.Array]:
  """The ``t`` ``[K, B]`` and noise ``[K, *batch_shape]`` that ddpm_jax's train step draws
  at each of ``steps``: ``diffusion.loss``'s draws from ``fold_in(rng, step)``."""
  def one(step):
    t_rng, noise_rng, _ = jax.random.split(jax.random.fold_in(rng, step), 3)
    t = jax.random.randint(t_rng, (batch_shape[0],), 0, num_time_steps)
    return t, jax.random.normal(noise_rng, batch_shape, jnp.float32)
  return jax.vmap(one)(steps)


def _flat(weights: dict[str, np.ndarray]) -> np.ndarray:
  return np.concatenate([np.asarray(weights[k], np.float64).ravel() for k in sorted(weights)])


def _torch_weights(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _jax_weights(params: Any) -> dict[str, np.ndarray]:
  return flax_to_torch(jax.device_get(params))


def relative_distance(ours: np.ndarray, theirs: np.ndarray, start: np.ndarray
                      ) -> dict[str, float | None]:
  """``relative``: ||ours - theirs|| / ||theirs||; ``over_update``: ||ours - theirs|| over
  how far ``theirs`` moved from ``start`` (None where it did not move)."""
  diff = float(np.linalg.norm(ours - theirs))
  moved = float(np.linalg.norm(theirs - start))
  return {"relative": diff / float(np.linalg.norm(theirs)),
          "over_update": diff / moved if moved > 0 else None}


def one_ulp_off(module, seed: int) -> None:
  """Moves every parameter of ``module`` by one float32 ulp, up or down at random: a
  perturbation of the size of one rounding."""
  rng = np.random.default_rng([seed, 1])
  with torch.no_grad():
    for p in module.parameters():
      value = p.detach().cpu().numpy()
      direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
      p.copy_(torch.from_numpy(np.nextafter(value, direction)))


class TorchSide:
  """The original's model, Adam, EMA and step, fed given batches, draws and rates."""

  def __init__(self, config: ml_collections.ConfigDict, devices: Devices, model):
    self.model, self.devices = model, devices
    self.optimizer, self.ema, self.criterion = R.make_training(
        model, lr=config.learning_rate, ema_decay=config.ema_decay)
    self.scheduler = reference_scheduler(config, devices.torch_device)

  @classmethod
  def from_jax_state(cls, config: ml_collections.ConfigDict, devices: Devices,
                     state: Any) -> TorchSide:
    """The original's training at a ddpm_jax train state (host copy): its weights, Adam
    moments and count, and EMA, through ``convert.to_torch_checkpoint``. torch's global
    random state is left as it was (it drives the runs' dropout)."""
    ckpt = to_torch_checkpoint(state.params, state.ema_params, state.opt_state,
                               config.learning_rate)
    devices_to_fork = [devices.torch_device.index or 0] if devices.is_gpu else []
    with torch.random.fork_rng(devices=devices_to_fork):
      m = config.model
      model = R.UNET(Channels=list(m.channels), Attentions=list(m.attentions),
                     Upscales=list(m.upscales), num_groups=m.num_groups,
                     dropout_prob=m.dropout_rate, num_heads=m.num_heads,
                     input_channels=config.data.channels, output_channels=m.out_channels,
                     time_steps=m.time_steps).to(devices.torch_device)
    model.load_state_dict(ckpt["weights"])
    side = cls(config, devices, model)
    side.optimizer.load_state_dict(ckpt["optimizer"])
    side.ema.load_state_dict(ckpt["ema"])
    return side

  def step(self, batch: np.ndarray, t: np.ndarray, noise: np.ndarray, lr: float) -> float:
    """One update on an NHWC ``batch`` with NHWC ``noise``, at rate ``lr``; its loss."""
    for group in self.optimizer.param_groups:
      group["lr"] = lr
    to_torch = functools.partial(torch.tensor, device=self.devices.torch_device)  # Copies.
    return R.train_step(self.model, self.optimizer, self.ema, self.criterion, self.scheduler,
                        to_torch(batch.transpose(0, 3, 1, 2)), to_torch(t.astype(np.int64)),
                        to_torch(noise.transpose(0, 3, 1, 2)))

  def weights(self) -> np.ndarray:
    return _flat(_torch_weights(self.model))

  def ema_weights(self) -> np.ndarray:
    return _flat(_torch_weights(self.ema.module))


def one_step_check(config: ml_collections.ConfigDict, devices: Devices, before: Any,
                   after: Any, jax_loss: float, batch: np.ndarray, t: np.ndarray,
                   noise: np.ndarray, lr: float) -> dict:
  """The original's step from ddpm_jax's state ``before`` against ddpm_jax's own step
  to ``after`` (host copies): the single-step parity of ``tests/test_parity.py``, at a
  point of the JAX run. Stays at rounding level all along unless the training path
  differs somewhere (a late rate, Adam's bias correction at large counts, the EMA)."""
  side = TorchSide.from_jax_state(config, devices, before)
  loss = side.step(batch, t, noise, lr)
  start, start_ema = _flat(_jax_weights(before.params)), _flat(_jax_weights(before.ema_params))
  # Each side's gradient, read back from its Adam first moment (mu = b1 mu + (1 - b1) g):
  # unlike the update, it does not shrink with the rate.
  mu_before = _flat(_jax_weights(train_state.adam_states(before.opt_state)[0].mu))
  mu_jax = _flat(_jax_weights(train_state.adam_states(after.opt_state)[0].mu))
  mu_torch = _flat({name: side.optimizer.state[p]["exp_avg"].detach().cpu().numpy()
                    for name, p in side.model.named_parameters()})
  grad_jax, grad_torch = ((mu - train_state.ADAM_B1 * mu_before) / (1 - train_state.ADAM_B1)
                          for mu in (mu_jax, mu_torch))
  return {"learning_rate": lr,
          "loss_relative": abs(jax_loss - loss) / abs(loss),
          "gradient": float(np.linalg.norm(grad_jax - grad_torch) / np.linalg.norm(grad_torch)),
          "update": relative_distance(_flat(_jax_weights(after.params)), side.weights(),
                                      start)["over_update"],
          "ema_update": relative_distance(_flat(_jax_weights(after.ema_params)),
                                          side.ema_weights(), start_ema)["over_update"]}


@dataclasses.dataclass
class Run:
  """One seed's runs."""
  seed: int
  losses: dict[str, list[float]]  # "jax", "torch" and, with the control, "control".
  weight_distance: dict[str, dict]
  one_step: dict[str, dict]
  control_distance: dict[str, dict]
  ema_params: dict[str, Any]  # Flax trees of the final EMA models, by side.
  seconds: dict[str, float]


def train_pair(config: ml_collections.ConfigDict, devices: Devices, compiled_step: Callable,
               formats: Any, images_: np.ndarray, log: Callable[[str], None],
               control: bool = False) -> Run:
  """Trains ``config`` for ``config.num_train_steps`` steps on both sides, step by step.

  The JAX step is dispatched first and runs asynchronously while the torch step runs;
  its losses are read back at checkpoints and progress lines. At the checkpoints, the two
  sides' weights are compared, and the original's step is taken once from the JAX state
  (:func:`one_step_check`). With ``control``, a third run, the original's from an init one
  ulp off (:func:`one_ulp_off`), shows how far rounding alone carries the original.
  """
  seed, total, batch_size = config.seed, config.num_train_steps, config.batch_size
  torch_side = TorchSide(config, devices, reference_unet(config, devices))
  init_state_dict = _torch_weights(torch_side.model)
  init = _flat(init_state_dict)
  control_side = None
  if control:
    control_side = TorchSide(config, devices, reference_unet(config, devices))
    one_ulp_off(control_side.model, seed)
    control_side.ema.module.load_state_dict(control_side.model.state_dict())
  params = torch_to_flax(init_state_dict, build_unet(config.model))
  rng = jax.random.PRNGKey(seed)
  state = train_state.initial_state(jax.tree.map(jnp.asarray, params),
                                    train_state.make_tx(config), rng)
  state = jax.device_put(state, formats)
  batch_sharding = NamedSharding(devices.mesh, P("data"))
  decay_steps = train_state.lr_decay_steps(config)
  order = data.BatchIterator(images_, batch_size, seed, prefetch=0)
  batch_shape = (batch_size,) + images_.shape[1:]
  checkpoints = sorted({s for s in DISTANCE_STEPS if s <= total} | {total})

  losses = {"jax": [], "torch": []}
  if control:
    losses["control"] = []
  distances, one_step, control_distance = {}, {}, {}
  pending: list[jax.Array] = []
  seconds = {"steps": 0.0, "checks": 0.0}
  start_time = time.perf_counter()
  report_every = max(1, total // 20)

  def read_jax_losses():
    losses["jax"].extend(float(x) for x in jax.device_get(pending))
    pending.clear()

  for chunk_start in range(0, total, DRAW_CHUNK):
    steps = np.arange(chunk_start, min(chunk_start + DRAW_CHUNK, total))
    ts, noises = jax.device_get(step_draws(rng, jnp.asarray(steps, jnp.int32), batch_shape,
                                           config.schedule.num_steps))
    for i, step in enumerate(steps):
      done = int(step) + 1
      batch = order.batch_at(int(step))
      before = jax.device_get(state) if done in checkpoints else None
      state, metrics = compiled_step(state, jax.device_put(batch, batch_sharding))
      pending.append(metrics["loss"])
      lr = train_state.learning_rate_at(int(step), config.learning_rate, config.warmup_steps,
                                        decay_steps)
      losses["torch"].append(torch_side.step(batch, ts[i], noises[i], lr))
      if control_side is not None:
        losses["control"].append(control_side.step(batch, ts[i], noises[i], lr))
      if done in checkpoints:
        read_jax_losses()
        clock = time.perf_counter()
        key = str(done)
        raw, ema = _flat(_jax_weights(state.params)), _flat(_jax_weights(state.ema_params))
        distances[key] = {"raw": relative_distance(raw, torch_side.weights(), init),
                          "ema": relative_distance(ema, torch_side.ema_weights(), init)}
        one_step[key] = one_step_check(config, devices, before, jax.device_get(state),
                                       losses["jax"][-1], batch, ts[i], noises[i], lr)
        if control_side is not None:
          control_distance[key] = {
              "raw": relative_distance(control_side.weights(), torch_side.weights(), init),
              "ema": relative_distance(control_side.ema_weights(), torch_side.ema_weights(),
                                       init)}
        seconds["checks"] += time.perf_counter() - clock
      if done == 1 and config.model.dropout_rate == 0:
        gap = abs(losses["jax"][0] - losses["torch"][0]) / abs(losses["torch"][0])
        if gap > FIRST_STEP_SANITY:
          raise RuntimeError(f"the first step's losses differ by {gap:.2e} relative (JAX "
                             f"{losses['jax'][0]}, torch {losses['torch'][0]}): the two sides "
                             "did not get the same weights, batch, t or noise")
      if done % report_every == 0 or done == total:
        read_jax_losses()
        window = slice(max(0, done - report_every), done)
        log(f"seed {seed} step {done}/{total}: loss " + " ".join(
            f"{side} {np.mean(values[window]):.5f}" for side, values in losses.items())
            + f" ({time.perf_counter() - start_time:.0f} s)")
  read_jax_losses()
  seconds["steps"] = time.perf_counter() - start_time - seconds["checks"]
  model = build_unet(config.model)
  ema_params = {"jax": jax.device_get(state.ema_params),
                "torch": torch_to_flax(_torch_weights(torch_side.ema.module), model)}
  if control_side is not None:
    ema_params["control"] = torch_to_flax(_torch_weights(control_side.ema.module), model)
  return Run(seed=seed, losses=losses, weight_distance=distances, one_step=one_step,
             control_distance=control_distance, ema_params=ema_params, seconds=seconds)


class Evaluator:
  """``ddpm_jax.evaluate``'s measures against the bundled training digits, with the
  reference statistics and the held-out floor computed once."""

  def __init__(self):
    train_images, _ = data.load_bundled("train")
    test_images, _ = data.load_bundled("test")
    train_features, _ = evaluate.features_and_probs(data.preprocess(train_images))
    self._stats = evaluate.feature_stats(train_features)
    self.floor = evaluate.measures_from_outputs(
        *evaluate.features_and_probs(data.preprocess(test_images)), *self._stats)

  def __call__(self, samples: np.ndarray, data_range: str, name: str) -> dict:
    """The evaluate CLI's JSON for ``samples`` in ``data_range``."""
    unit = data.to_unit_range(samples, data_range)
    measures = evaluate.measures_from_outputs(*evaluate.features_and_probs(unit), *self._stats)
    return {**measures, "data_range": data_range, "samples": name,
            "reference": {**self.floor, "name": "bundled"}}


def sample_model(config: ml_collections.ConfigDict, params: Any, seed: int,
                 settings: Settings) -> np.ndarray:
  """``settings.num_samples`` images from ``params`` as ``make demo`` samples them: DDIM,
  eta 1, x0 clipped to the data range, batches of up to 64, noise from ``seed``."""
  size, channels = config.data.image_size, config.data.channels
  run = sample.Sampleable(model=build_unet(config.model), params=params,
                          schedule=train_state.make_schedule(config),
                          data_range=config.data.range, image_shape=(size, size, channels))
  samples, _, _ = sample.generate(run, "ddim", settings.ddim_steps, DDIM_ETA, seed,
                                  settings.num_samples, min(settings.num_samples, SAMPLE_BATCH),
                                  clip_denoised=True)
  return samples


def final_loss(losses: Sequence[float]) -> float:
  return float(np.mean(losses[-FINAL_WINDOW:]))


def spread_summary(runs: Sequence[dict]) -> dict:
  """For each measure: both sides' value per seed, the framework difference per seed
  (|jax - torch|) and, with several seeds, the seed-to-seed spread per side (max - min
  over seeds). The goal holds for a measure when the largest framework difference is below
  the smaller side's seed spread (or is 0). With the control run, also its value and its
  difference from the original's run of the same seed (``rounding_difference``)."""
  summary = {}
  for measure in MEASURES:
    values = [{side: (run["final_loss"][side] if measure == "final_loss"
                      else run["evaluation"][side][measure]) for side in ("jax", "torch")}
              for run in runs]
    framework = [abs(v["jax"] - v["torch"]) for v in values]
    entry = {"per_seed": values, "framework_difference": framework,
             "framework_difference_max": max(framework)}
    if all("control" in run["final_loss"] for run in runs):
      entry["control"] = [run["final_loss"]["control"] if measure == "final_loss"
                          else run["evaluation"]["control"][measure] for run in runs]
      entry["rounding_difference"] = [abs(c - v["torch"])
                                      for c, v in zip(entry["control"], values)]
    if len(runs) > 1:
      spread = {side: max(v[side] for v in values) - min(v[side] for v in values)
                for side in ("jax", "torch")}
      entry["seed_spread"] = spread
      entry["seed_spread_min"] = min(spread.values())
      # A measure both frameworks and all seeds give the same value of holds trivially.
      entry["within_seed_spread"] = bool(max(framework) < min(spread.values())
                                         or max(framework) == 0)
    summary[measure] = entry
  return summary


def running_mean(values: Sequence[float], width: int) -> np.ndarray:
  """The mean of each value and the up to ``width - 1`` before it."""
  values = np.asarray(values, np.float64)
  cumulative = np.concatenate([[0.0], np.cumsum(values)])
  index = np.arange(1, len(values) + 1)
  start = np.maximum(index - width, 0)
  return (cumulative[index] - cumulative[start]) / (index - start)


def plot(runs: Sequence[Run], grids: dict[str, np.ndarray], data_range: str,
         title: str) -> bytes:
  """The PNG: the first seed's loss curves (raw, light; running mean, dark) on a log axis,
  other seeds' running means for scale; below, the JAX / torch ratio of the running means
  less 1 (and, for scale, the rounding control's and the torch seed-to-seed ratio); then
  both sides' sample grids."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  colors = {"jax": "tab:blue", "torch": "tab:orange"}
  fig = plt.figure(figsize=(9, 10), dpi=80)
  grid_spec = fig.add_gridspec(3, 2, height_ratios=(1.3, 0.8, 1.4), hspace=0.35)
  ax_loss = fig.add_subplot(grid_spec[0, :])
  ax_diff = fig.add_subplot(grid_spec[1, :], sharex=ax_loss)
  first = runs[0]
  steps = np.arange(1, len(first.losses["jax"]) + 1)
  for side in ("jax", "torch"):
    ax_loss.plot(steps, first.losses[side], color=colors[side], alpha=0.25, linewidth=0.5)
    ax_loss.plot(steps, running_mean(first.losses[side], SMOOTH_STEPS), color=colors[side],
                 linewidth=1.5, label=f"{side}, seed {first.seed}")
    for other in runs[1:]:
      ax_loss.plot(steps, running_mean(other.losses[side], SMOOTH_STEPS), color=colors[side],
                   linewidth=1.0, linestyle="--", label=f"{side}, seed {other.seed}")
  ax_loss.set_yscale("log")
  ax_loss.set_ylabel("loss")
  ax_loss.set_title(f"{title}: running mean of {SMOOTH_STEPS} steps (raw light)", fontsize=10)
  ax_loss.legend(fontsize=8)
  smooth = {side: running_mean(first.losses[side], SMOOTH_STEPS) for side in ("jax", "torch")}
  ax_diff.plot(steps, np.asarray(first.losses["jax"]) / np.asarray(first.losses["torch"]) - 1,
               color="gray", alpha=0.3, linewidth=0.5, label="jax / torch - 1, per step")
  ax_diff.plot(steps, smooth["jax"] / smooth["torch"] - 1, color="black", linewidth=1.2,
               label=f"jax / torch - 1, seed {first.seed}, running means")
  if "control" in first.losses:
    ax_diff.plot(steps, running_mean(first.losses["control"], SMOOTH_STEPS) / smooth["torch"] - 1,
                 color="tab:green", linewidth=1.0,
                 label=f"torch from an init 1 ulp off / torch - 1, seed {first.seed}")
  if len(runs) > 1:
    ax_diff.plot(steps, running_mean(runs[1].losses["torch"], SMOOTH_STEPS) / smooth["torch"] - 1,
                 color="tab:red", linewidth=1.0, linestyle="--",
                 label=f"torch seed {runs[1].seed} / seed {first.seed} - 1")
  ax_diff.axhline(0.0, color="black", linewidth=0.5)
  ax_diff.set_ylim(-0.3, 0.3)
  ax_diff.set_xlabel("step")
  ax_diff.set_ylabel("relative loss difference")
  ax_diff.legend(fontsize=8)
  for column, side in enumerate(("jax", "torch")):
    ax = fig.add_subplot(grid_spec[2, column])
    pixels = images.tile(images.to_uint8(grids[side][:GRID_IMAGES], data_range),
                         math.ceil(math.sqrt(min(len(grids[side]), GRID_IMAGES))))
    ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(f"{side} EMA, seed {first.seed}", fontsize=10)
    ax.axis("off")
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
  plt.close(fig)
  return buffer.getvalue()


def versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return dict(python=platform.python_version(), jax=jax.__version__, flax=flax.__version__,
              optax=optax.__version__, torch=torch.__version__, numpy=np.__version__)


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
              jax_device=str(devices.jax_device), torch_device=str(devices.torch_device),
              cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
              load_average_start=list(os.getloadavg()))
  if devices.is_gpu:
    info["gpu"] = torch.cuda.get_device_name(devices.torch_device)
  return info


def _round(values: Sequence[float]) -> list[float]:
  """float32 values to the 9 digits that give them back exactly."""
  return [float(f"{v:.9g}") for v in values]


def run_parity(config: ml_collections.ConfigDict, settings: Settings, devices: Devices,
               log: Callable[[str], None]) -> tuple[dict, bytes]:
  """Both frameworks' runs for each seed, their samples and measures: the JSON document
  (without command and date) and the PNG."""
  images_, _ = data.load_dataset(config.data, "train")
  images_ = data.preprocess(images_, config.data.image_size, config.data.range)
  if len(images_) < config.batch_size:
    raise UserError(f"the data set has {len(images_)} images, fewer than one batch of "
                    f"{config.batch_size}; lower batch_size")
  clock = time.perf_counter()
  abstract_params = jax.eval_shape(
      lambda: build_unet(config.model).init(
          jax.random.key(0), jnp.zeros((1,) + images_.shape[1:], jnp.float32),
          jnp.zeros((1,), jnp.int32))["params"])
  abstract_state = jax.eval_shape(lambda p: train_state.initial_state(
      p, train_state.make_tx(config), jax.random.PRNGKey(0)), abstract_params)
  sharding = NamedSharding(devices.mesh, P())
  abstract_state = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract_state)
  batch = jax.ShapeDtypeStruct((config.batch_size,) + images_.shape[1:], jnp.float32,
                               sharding=NamedSharding(devices.mesh, P("data")))
  # One program for every seed: the seed lives in the state's key.
  compiled_step, formats = train.compile_train_step(config, devices.mesh, abstract_state, batch)
  log(f"compiled the JAX train step in {time.perf_counter() - clock:.1f} s")
  evaluator = Evaluator()

  runs, results = [], []
  for k in range(settings.seeds):
    seed_config = ml_collections.ConfigDict(config.to_dict())
    seed_config.seed = config.seed + k
    run = train_pair(seed_config, devices, compiled_step, formats, images_, log,
                     settings.control)
    samples, evaluation = {}, {}
    clock = time.perf_counter()
    for side in run.ema_params:
      samples[side] = sample_model(seed_config, run.ema_params[side], seed_config.seed, settings)
      evaluation[side] = evaluator(samples[side], config.data.range,
                                   f"{side} EMA, seed {seed_config.seed}")
    run.seconds["sampling_and_evaluation"] = time.perf_counter() - clock
    log(f"seed {seed_config.seed}: " + "; ".join(
        f"{side} FD {evaluation[side]['frechet_distance']:.2f}, confident "
        f"{evaluation[side]['frac_confident']:.3f}" for side in evaluation))
    runs.append((run, samples))
    results.append({
        "seed": run.seed,
        "losses": {side: _round(values) for side, values in run.losses.items()},
        "final_loss": {side: final_loss(values) for side, values in run.losses.items()},
        "weight_distance": run.weight_distance,
        "one_step": run.one_step,
        **({"control_distance": run.control_distance} if settings.control else {}),
        "evaluation": evaluation,
        "sample_seed": seed_config.seed,
        "seconds": run.seconds})

  dropout = config.model.dropout_rate
  doc = {
      "what": ("ddpm_jax's compiled train step against the original PyTorch training step "
               "(reference_torch), from the same initial weights (the original's init), "
               "batches, t and noise; both EMA models sampled with the same DDIM noise and "
               "scored by ddpm_jax.evaluate"),
      "num_train_steps": settings.num_train_steps,
      "seeds": [r["seed"] for r in results],
      "losses": {side: results[0]["losses"][side] for side in ("jax", "torch")},
      "final_loss": results[0]["final_loss"],
      "final_loss_window": FINAL_WINDOW,
      "weight_distance": results[0]["weight_distance"],
      "weight_distance_note": ("per step: raw and EMA weights, relative = ||w_jax - w_torch|| "
                               "/ ||w_torch|| over all parameters, over_update = ||w_jax - "
                               "w_torch|| / ||w_torch - w_init||"),
      "one_step": results[0]["one_step"],
      "one_step_note": ("per checkpoint step s: the original's step s taken from ddpm_jax's "
                        "state before it (convert.to_torch_checkpoint) against ddpm_jax's own "
                        "step s: loss_relative = |loss_jax - loss_torch| / loss_torch; "
                        "gradient = ||g_jax - g_torch|| / ||g_torch||, each read back from "
                        "its Adam first moment; update / ema_update = ||d_jax - d_torch|| / "
                        "||d_torch|| of the weights' / EMA's change (None where the rate is "
                        "0; where rate x 1 falls below the weights' float32 spacing, as near "
                        "the end of a cosine decay, the update is mostly rounding and this "
                        "ratio says so, not the arithmetic)"),
      "evaluation": {side: results[0]["evaluation"][side] for side in ("jax", "torch")},
      "runs": results,
      "spread": spread_summary(results),
      "spread_note": ("framework_difference: |jax - torch| per seed; seed_spread: max - min "
                      "over seeds per side; within_seed_spread: the largest framework "
                      "difference is below the smaller seed spread; control and "
                      "rounding_difference (with --rounding_control): the original's run "
                      "from an init one float32 ulp off, and |control - torch| per seed"),
      "sampling": {"sampler": "ddim", "num_steps": settings.ddim_steps, "eta": DDIM_ETA,
                   "clip_denoised": True, "num_samples": settings.num_samples,
                   "batch_size": min(settings.num_samples, SAMPLE_BATCH),
                   "seed": "the run's config seed", "weights": "EMA"},
      "dropout": {
          "rate": dropout,
          "masks_match": dropout == 0,
          "note": ("no dropout: both sides compute the same function" if dropout == 0 else
                   "dropout masks cannot match between frameworks: each side draws its own, "
                   "so the losses differ from the first step by more than rounding")},
      "embedding_tables": "each side its own sinusoidal table (they differ in the last bits)",
      "jax_compute_dtype": config.model.dtype,
      "config": json.loads(checkpoint.config_to_json(config)),
      "versions": versions(),
      "device": device_info(devices),
  }
  if len(results) > 1:
    doc["goal"] = {
        "rule": "every measure's framework difference is below its seed-to-seed spread",
        "holds": all(v["within_seed_spread"] for v in doc["spread"].values())}
  title = (f"{settings.num_train_steps} steps, UNet {tuple(config.model.channels)}, "
           f"batch {config.batch_size}")
  png = plot([run for run, _ in runs], runs[0][1], config.data.range, title)
  return doc, png


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if cli.wants_help(argv):
    print(USAGE, end="")
    return 0
  config, flag_values = cli.parse_flags(argv, define_flags, "configs/mnist_tiny.py")
  if torch is None:
    raise UserError("train_parity needs torch: pip install torch==2.13.0")
  if not flag_values.out:
    raise UserError("--out is required, e.g. --out results/train-parity-cpu")
  quick = flag_values.quick
  num_train_steps = flag_values.num_train_steps
  if num_train_steps is None:
    num_train_steps = QUICK_STEPS if quick else config.num_train_steps
  if num_train_steps <= 0:
    raise UserError(f"--num_train_steps must be positive, got {num_train_steps}")
  if flag_values.seeds < 1:
    raise UserError(f"--seeds must be at least 1, got {flag_values.seeds}")
  num_samples = flag_values.num_samples or (QUICK_SAMPLES if quick else DEFAULT_SAMPLES)
  ddim_steps = flag_values.ddim_steps or (QUICK_DDIM_STEPS if quick else DEFAULT_DDIM_STEPS)
  if num_samples < 2:
    raise UserError(f"--num_samples must be at least 2 (a covariance), got {num_samples}")
  config.unlock()
  config.num_train_steps = num_train_steps
  if quick:
    apply_quick(config, num_train_steps)
  validate_config(config, num_devices=1)
  check_original_can_train(config)
  if not 1 <= ddim_steps <= config.schedule.num_steps:
    raise UserError(f"--ddim_steps must be in 1..{config.schedule.num_steps}, got {ddim_steps}")
  if config.seed + flag_values.seeds > 2**32:
    raise UserError(f"seeds {config.seed}..{config.seed + flag_values.seeds - 1} do not fit in "
                    "32 bits")
  out = flag_values.out
  json_path, png_path = os.path.join(out, "parity.json"), os.path.join(out, "loss_curves.png")
  files.check_outputs([json_path], flag_values.overwrite)
  files.check_outputs([png_path], True)  # It belongs to the parity.json it replaces.
  settings = Settings(num_train_steps=num_train_steps, seeds=flag_values.seeds,
                      num_samples=num_samples, ddim_steps=ddim_steps,
                      control=flag_values.rounding_control)

  threads = flag_values.torch_threads or max(1, cli.available_cores() // 2)
  torch.set_num_threads(threads)
  devices = pick_devices()
  command = "python " + shlex.join(argv)
  date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

  start = time.perf_counter()

  def log(message: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

  log(f"train parity on {devices.note}: {settings.seeds} seed(s) x {num_train_steps} steps"
      f"{' (with the rounding control)' if settings.control else ''}, "
      f"UNet {tuple(config.model.channels)}, batch {config.batch_size}, torch threads {threads}")
  clock = time.perf_counter()
  doc, png = run_parity(config, settings, devices, log)
  doc = {"command": command, "date": date, **doc,
         "seconds_total": time.perf_counter() - clock}
  files.write_atomic(png_path, lambda f: f.write(png))
  files.write_text_atomic(json_path, json.dumps(doc, indent=1) + "\n")
  for measure, entry in doc["spread"].items():
    line = f"{measure:17s} framework difference {entry['framework_difference_max']:.4g}"
    if "rounding_difference" in entry:
      line += f", rounding control {max(entry['rounding_difference']):.4g}"
    if "seed_spread_min" in entry:
      line += (f", seed spread {entry['seed_spread_min']:.4g}"
               f" ({'within' if entry['within_seed_spread'] else 'NOT within'})")
    log(line)
  log(f"wrote {json_path} and {png_path}")
  return 0


if __name__ == "__main__":
  run_cli(main)
