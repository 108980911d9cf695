"""The reverse process: the original's ancestral (DDPM) sampler, DDIM and DPM-Solver++(2M),
each one jitted scan.

Each sampler runs every step of its reverse process inside a single ``jax.lax.scan`` under
``jax.jit``, for a whole batch at once, and collects the reverse-process strip inside the
scan: the frames are written into a carried ``[F, B, H, W, C]`` buffer at the steps of a
table fixed at trace time. Given a ``progress`` callback, the same scan runs as up to 20
equal chunks, one jitted call each, so that a long batch can report how far it is.

Randomness is per example. Sample ``i`` of a call with ``rng`` and ``first_index`` uses the
key ``fold_in(rng, first_index + i)``; that key is split into one for ``z_T`` and one for
the step noise, and the noise added after the update at step ``t`` is drawn from
``fold_in(noise_key, t)``. So a sample depends on ``(rng, its index)`` only, never on how the
samples are split into batches (up to the float rounding of batched convolutions), and
DDPM and DDIM with ``num_steps == T`` draw the same ``z_T`` and the same noise; every
sampler draws the same ``z_T``.

Every sampler takes the run's ``objective`` (``'eps'``, the original's, ``'x0'`` or ``'v'``)
and turns the model's output into the ``(x0, eps)`` its update needs with
:func:`ddpm_jax.diffusion.model_output_to_x0_eps`; with ``'eps'`` the output is used as it
was, so the original's sampler stays bit for bit.

A class-conditional model (``UNet(num_classes > 0)``) samples the classes ``labels`` (int
``[B]``) with classifier-free guidance (Ho & Salimans 2022): each update reads
``out_uncond + w (out_cond - out_uncond)``, ``w = guidance_scale``, from one forward pass of
the batch concatenated with its :data:`~ddpm_jax.model.NO_CLASS` copy (:func:`guided_output`).
The combination is taken on the model's output whatever its ``objective``: the conversion
to eps (or x0) is affine in the output with coefficients of ``(z, t)`` alone, the same for
both halves, so it is the same combination of the eps estimates. ``w = 1`` is the plain
conditional model and ``w = 0`` the unconditional one, each one forward of the batch and
exactly so; without ``labels`` nothing changes.

Any model, conditional or not, can be sampled with autoguidance (Karras et al. 2024,
"Guiding a diffusion model with a bad version of itself"): :class:`Autoguided` makes an
apply function of the pair ``(params, guide_params)`` whose output is
``out_guide + w (out - out_guide)``, the guide being a weaker version of the same network
(an earlier checkpoint of its run). Every sampler takes it in place of the model's own
apply function, with the pair in place of the params.

Nothing is clipped: images are in the data range of the training run, [0, 1] for the
original (``config.data.range == 'zero_one'``) or [-1, 1]; only ``ddpm_jax.images`` maps
them to pixels. Batches whose size the local device count divides are sharded over the
devices (``Mesh(local_devices, ('data',))``), with the params replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion, reverse_steps
# The update rules and time steps, for callers of this module's samplers.
from ddpm_jax.reverse_steps import (DEFAULT_SPACING, SPACINGS, StepFn,  # pylint: disable=unused-import
                                    ddim_sigmas, ddim_timesteps, dpmpp2m_timesteps)
from ddpm_jax.model import NO_CLASS
from ddpm_jax.schedule import Schedule

ApplyFn = Callable[..., jax.Array]
# NoiseFn(i, t) -> the noise added after the i-th update, which is at step t.
NoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
# (z, frames, state): the reverse process's z, the strip's buffer and the sampler's state,
# carried through the scan.
Carry = tuple[jax.Array, jax.Array, Any]
SAMPLERS = ("ddpm", "ddim", "dpmpp2m")

# The original's `times`: the strip shows z after the mean update at each of these t, from
# t = 999 down; the frame at t = 0 is the final image. 10 frames in all.
REVERSE_TIMES = (0, 15, 50, 100, 200, 300, 400, 550, 700, 999)


def frame_times(snapshot_times: Iterable[int]) -> tuple[int, ...]:
  """The strip's frame order: snapshot times from the largest down (the original's order)."""
  return tuple(sorted({int(t) for t in snapshot_times}, reverse=True))


def strip_times(num_train_steps: int) -> tuple[int, ...]:
  """The original's strip times for a T-step schedule: ``REVERSE_TIMES`` scaled by (T-1)/999."""
  scale = (num_train_steps - 1) / max(REVERSE_TIMES)
  return frame_times(round(t * scale) for t in REVERSE_TIMES)


def _frame_slots(steps: np.ndarray, snapshot_times: Sequence[int],
                 num_train_steps: int) -> np.ndarray:
  """For each frame (in :func:`frame_times` order), the index into ``steps`` nearest its time."""
  times = np.asarray(frame_times(snapshot_times), np.int64)
  if times.size and (times.min() < 0 or times.max() >= num_train_steps):
    raise ValueError(f"snapshot times must be in 0..{num_train_steps - 1}, "
                     f"got {sorted(times.tolist())}")
  return np.abs(steps[None, :].astype(np.int64) - times[:, None]).argmin(axis=1).astype(np.int32)


def model_output(apply_fn: ApplyFn, params: Any, z: jax.Array, t: jax.Array,
                 labels: jax.Array | None = None) -> jax.Array:
  """The model's output at the scalar step ``t``, in eval mode, as float32; ``labels``
  (int ``[B]``) go to a class-conditional model."""
  t_batch = jnp.full((z.shape[0],), t, jnp.int32)
  extra = {} if labels is None else {"labels": labels}
  return apply_fn({"params": params}, z, t_batch, train=False, **extra).astype(jnp.float32)


def guided_output(apply_fn: ApplyFn, params: Any, z: jax.Array, t: jax.Array,
                  labels: jax.Array | None = None, guidance_scale: float = 1.0) -> jax.Array:
  """Classifier-free guidance: ``out_uncond + w (out_cond - out_uncond)`` at the scalar
  step ``t``, ``w = guidance_scale`` (a Python number).

  Both outputs come from one forward pass of ``2B`` examples, ``z`` with ``labels`` and
  ``z`` with :data:`~ddpm_jax.model.NO_CLASS`. ``w = 1`` is the conditional output and
  ``w = 0`` the unconditional one, each from one forward pass of ``B``, exactly (the
  formula's float rounding would not give them bit for bit). ``labels`` None: the model's
  plain output.
  """
  if labels is None:
    return model_output(apply_fn, params, z, t)
  if guidance_scale == 1:
    return model_output(apply_fn, params, z, t, labels)
  no_class = jnp.full_like(labels, NO_CLASS)
  if guidance_scale == 0:
    return model_output(apply_fn, params, z, t, no_class)
  both = model_output(apply_fn, params, jnp.concatenate([z, z]), t,
                      jnp.concatenate([labels, no_class]))
  cond, uncond = jnp.split(both, 2)
  return uncond + jnp.float32(guidance_scale) * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class Autoguided:
  """Autoguidance: ``apply_fn`` as a function of ``{'params': (params, guide_params)}``
  whose output is ``out_guide + w (out - out_guide)``, ``w = scale``, in float32, at the
  examples whose step ``t >= min_t``, and the model's own output below; where no example
  is at ``t >= min_t`` (a sampler's later updates: one ``t`` for the batch), the guide's
  forward pass is skipped (``lax.cond``).

  The guide is the same architecture with weaker weights; where it errs more than the
  model does, the extrapolation pushes the samples away from its errors (Karras et al.
  2024). Like classifier-free guidance the combination is taken on the raw output, which
  each objective's conversion to eps and x0 maps affinely with coefficients of ``(z, t)``
  alone. ``min_t`` limits the guidance to the noisier steps, where the digit's shape is
  decided (Kynkäänniemi et al. 2024 limit classifier-free guidance so); guided to the end,
  strong weights also darken and thicken what the last steps draw. ``w = 1`` is the
  model's own output, from its one forward pass. Frozen and compared by value, so jitted
  samplers taking it as a static argument compile once.
  """
  apply_fn: ApplyFn
  scale: float
  min_t: int = 0

  def __call__(self, variables: dict, z: jax.Array, t: jax.Array, *args, **kwargs
               ) -> jax.Array:
    params, guide_params = variables["params"]
    out = self.apply_fn({"params": params}, z, t, *args, **kwargs).astype(jnp.float32)
    if self.scale == 1:
      return out

    def guided() -> jax.Array:
      guide = self.apply_fn({"params": guide_params}, z, t, *args, **kwargs)
      guide = guide.astype(jnp.float32)
      return guide + jnp.float32(self.scale) * (out - guide)
    if self.min_t <= 0:
      return guided()
    at = t >= self.min_t
    return jax.lax.cond(
        jnp.any(at),
        lambda: jnp.where(at.reshape((-1,) + (1,) * (out.ndim - 1)), guided(), out),
        lambda: out)


def predict_x0_eps(apply_fn: ApplyFn, params: Any, schedule: Schedule, z: jax.Array,
                   t: jax.Array, objective: str = "eps", *, labels: jax.Array | None = None,
                   guidance_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The model's ``(x0, eps)`` estimates at the scalar step ``t``, whatever it predicts;
  with ``labels``, those of :func:`guided_output`."""
  out = guided_output(apply_fn, params, z, t, labels, guidance_scale)
  return diffusion.model_output_to_x0_eps(schedule, z, t, out, objective)


def predict_eps(apply_fn: ApplyFn, params: Any, z: jax.Array, t: jax.Array,
                schedule: Schedule | None = None, objective: str = "eps", *,
                labels: jax.Array | None = None, guidance_scale: float = 1.0) -> jax.Array:
  """The model's noise estimate at the scalar step ``t``, in eval mode, as float32; with
  ``labels``, that of :func:`guided_output`.

  A model of another ``objective`` than ``'eps'`` needs the ``schedule`` to convert.
  """
  out = guided_output(apply_fn, params, z, t, labels, guidance_scale)
  if objective == "eps":
    return out
  if schedule is None:
    raise ValueError(f"predict_eps needs the schedule for objective {objective!r}")
  return diffusion.model_output_to_x0_eps(schedule, z, t, out, objective)[1]


def _initial_carry(z_T: jax.Array, num_frames: int, state: Any = ()) -> Carry:
  return (z_T.astype(jnp.float32), jnp.zeros((num_frames,) + z_T.shape, jnp.float32),
          state)


def _reverse_scan(apply_fn: ApplyFn, params: Any, carry: Carry, xs: tuple[jax.Array, jax.Array],
                  slots: np.ndarray, step_fn: StepFn, noise_fn: NoiseFn,
                  labels: jax.Array | None = None, guidance_scale: float = 1.0) -> Carry:
  """Runs ``step_fn`` over the updates ``xs = (i, t)`` in one scan from
  ``carry = (z, frames, state)``; with ``labels``, on :func:`guided_output`.

  Frame ``f`` is the frame ``step_fn`` returns at the update ``slots[f]``, written into the
  carried buffer with a select, so one update may fill several frames.
  """
  slots = jnp.asarray(slots)

  def body(carry, xs):
    z, frames, state = carry
    i, t = xs
    out = guided_output(apply_fn, params, z, t, labels, guidance_scale)
    z, frame, state = step_fn(i, t, z, out, noise_fn(i, t), state)
    hit = (slots == i)[:, None, None, None, None]
    return (z, jnp.where(hit, frame[None], frames), state), None

  carry, _ = jax.lax.scan(body, carry, xs)
  return carry


def _check_eta(eta: float) -> None:
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}")


def _check_objective(objective: str) -> None:
  if objective not in diffusion.OBJECTIVES:
    raise ValueError(f"objective must be one of {', '.join(diffusion.OBJECTIVES)}, "
                     f"got {objective!r}")


def _check_labels(labels: Any, batch: int, guidance_scale: float) -> jax.Array | None:
  """``labels`` as int32 ``[batch]`` (or None); ``guidance_scale`` a finite number."""
  if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
    raise ValueError(f"guidance_scale must be a finite Python number, got {guidance_scale!r}")
  if labels is None:
    return None
  labels = jnp.asarray(labels, jnp.int32)
  if labels.shape != (batch,):
    raise ValueError(f"labels must have shape [{batch}] (one per image), got {labels.shape}")
  return labels


def _plan(schedule: Schedule, sampler: str, num_steps: int, eta: jax.Array,
          snapshot_times: Sequence[int], clip_x0: tuple[float, float] | None,
          objective: str = "eps", timesteps: tuple[int, ...] | None = None
          ) -> tuple[np.ndarray, np.ndarray, StepFn]:
  """``(steps, slots, step_fn)`` of a sampler: its descending steps, frame slots and update.

  DPM-Solver++ takes its steps from ``timesteps`` (:func:`dpmpp2m_timesteps`, made outside
  jit since log-SNR spacing reads the schedule's values).
  """
  if sampler == "ddpm":
    steps = np.arange(schedule.num_steps - 1, -1, -1, dtype=np.int32)
    step_fn = reverse_steps.ddpm_step_fn(schedule, objective)
  elif sampler == "ddim":
    steps = ddim_timesteps(schedule.num_steps, num_steps)
    step_fn = reverse_steps.ddim_step_fn(schedule, steps, jnp.asarray(eta, jnp.float32),
                                         clip_x0, objective)
  elif sampler == "dpmpp2m":
    steps = np.asarray(timesteps, np.int32)
    step_fn = reverse_steps.dpmpp2m_step_fn(schedule, steps, clip_x0, objective)
  else:
    raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
  return steps, _frame_slots(steps, snapshot_times, schedule.num_steps), step_fn


def _initial_state(sampler: str, z_T: jax.Array) -> Any:
  """The sampler's own state before its first update: DPM-Solver++'s previous x0."""
  return jnp.zeros(z_T.shape, jnp.float32) if sampler == "dpmpp2m" else ()


def _run(apply_fn: ApplyFn, params: Any, schedule: Schedule, carry: Carry, noise_fn: NoiseFn,
         sampler: str, num_steps: int, eta: jax.Array, snapshot_times: Sequence[int],
         clip_x0: tuple[float, float] | None, start: int | jax.Array = 0,
         length: int | None = None, objective: str = "eps",
         timesteps: tuple[int, ...] | None = None, labels: jax.Array | None = None,
         guidance_scale: float = 1.0) -> Carry:
  """The sampler's updates ``start .. start + length - 1`` (all of them by default)."""
  steps, slots, step_fn = _plan(schedule, sampler, num_steps, eta, snapshot_times, clip_x0,
                                objective, timesteps)
  i = start + jnp.arange(len(steps) if length is None else length, dtype=jnp.int32)
  return _reverse_scan(apply_fn, params, carry, (i, jnp.asarray(steps)[i]), slots, step_fn,
                       noise_fn, labels, guidance_scale)


@functools.partial(jax.jit, static_argnames=("apply_fn", "snapshot_times", "objective",
                                             "guidance_scale"))
def ddpm_sample_from(apply_fn: ApplyFn, params: Any, schedule: Schedule, z_T: jax.Array,
                     noise: jax.Array, snapshot_times: Sequence[int] = REVERSE_TIMES, *,
                     objective: str = "eps", labels: jax.Array | None = None,
                     guidance_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The original's sampler from a given ``z_T`` with given noise: ``(x_0, frames)``.

  ``noise[t]`` (``[T, B, H, W, C]``) is added after the update at step t (``noise[0]`` is
  unused), as in ``reference_torch.sample``. ``frames`` is ``[F, B, H, W, C]``: z after the
  mean update at each snapshot time in :func:`frame_times` order. ``labels`` (int ``[B]``)
  and ``guidance_scale``: a class-conditional model's classes and guidance
  (:func:`guided_output`).
  """
  labels = _check_labels(labels, z_T.shape[0], guidance_scale)
  carry = _initial_carry(z_T, len(frame_times(snapshot_times)))
  z, frames, _ = _run(apply_fn, params, schedule, carry, lambda i, t: noise[t], "ddpm",
                      schedule.num_steps, jnp.float32(0), snapshot_times, None,
                      objective=objective, labels=labels, guidance_scale=guidance_scale)
  return z, frames


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_steps", "snapshot_times",
                                             "clip_x0", "objective", "guidance_scale"))
def ddim_sample_from(apply_fn: ApplyFn, params: Any, schedule: Schedule, z_T: jax.Array,
                     noise: jax.Array, num_steps: int, eta: float = 0.0,
                     snapshot_times: Sequence[int] = REVERSE_TIMES,
                     clip_x0: tuple[float, float] | None = None, *, objective: str = "eps",
                     labels: jax.Array | None = None, guidance_scale: float = 1.0
                     ) -> tuple[jax.Array, jax.Array]:
  """DDIM from a given ``z_T``; ``noise[i]`` (``[K, B, H, W, C]``) follows the i-th update.

  ``frames[f]`` is z before the noise after the update at the subsequence step nearest
  frame time f (two frame times may share a step when K is small). ``labels`` and
  ``guidance_scale`` as in :func:`ddpm_sample_from`.
  """
  labels = _check_labels(labels, z_T.shape[0], guidance_scale)
  carry = _initial_carry(z_T, len(frame_times(snapshot_times)))
  z, frames, _ = _run(apply_fn, params, schedule, carry, lambda i, t: noise[i], "ddim",
                      num_steps, eta, snapshot_times, clip_x0, objective=objective,
                      labels=labels, guidance_scale=guidance_scale)
  return z, frames


@functools.partial(jax.jit, static_argnames=("apply_fn", "timesteps", "snapshot_times",
                                             "clip_x0", "objective", "guidance_scale"))
def _dpmpp2m_from(apply_fn, params, schedule, z_T, timesteps, snapshot_times, clip_x0,
                  objective, labels, guidance_scale):
  carry = _initial_carry(z_T, len(frame_times(snapshot_times)),
                         _initial_state("dpmpp2m", z_T))
  z, frames, _ = _run(apply_fn, params, schedule, carry, lambda i, t: jnp.zeros_like(z_T),
                      "dpmpp2m", len(timesteps), jnp.float32(0), snapshot_times, clip_x0,
                      objective=objective, timesteps=timesteps, labels=labels,
                      guidance_scale=guidance_scale)
  return z, frames


def dpmpp2m_sample_from(apply_fn: ApplyFn, params: Any, schedule: Schedule, z_T: jax.Array,
                        num_steps: int, *, objective: str = "eps", spacing: str = DEFAULT_SPACING,
                        snapshot_times: Sequence[int] = REVERSE_TIMES,
                        clip_x0: tuple[float, float] | None = None,
                        labels: jax.Array | None = None, guidance_scale: float = 1.0
                        ) -> tuple[jax.Array, jax.Array]:
  """DPM-Solver++(2M) from a given ``z_T``: ``(x_0, frames)``, deterministic.

  ``num_steps`` model evaluations at :func:`dpmpp2m_timesteps` (``spacing``), as DDIM's
  ``num_steps``; ``frames[f]`` is z after the update at the step nearest frame time f.
  ``labels`` and ``guidance_scale`` as in :func:`ddpm_sample_from`.
  """
  reverse_steps.check_spacing(spacing)
  labels = _check_labels(labels, z_T.shape[0], guidance_scale)
  timesteps = tuple(int(t) for t in dpmpp2m_timesteps(schedule, num_steps, spacing))
  return _dpmpp2m_from(apply_fn, params, schedule, z_T, timesteps,
                       tuple(snapshot_times),
                       None if clip_x0 is None else tuple(map(float, clip_x0)), objective,
                       labels, float(guidance_scale))


def example_keys(rng: jax.Array, first_index: int, count: int) -> jax.Array:
  """Per-example keys ``fold_in(rng, first_index + i)`` for ``i < count``."""
  indices = jnp.arange(first_index, first_index + count, dtype=jnp.uint32)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(indices)


def _initial_and_noise(keys: jax.Array, image_shape: tuple[int, ...]
                       ) -> tuple[jax.Array, NoiseFn]:
  """``z_T`` from each example's first key; ``noise_fn(i, t)`` from ``fold_in(second, t)``."""
  split = jax.vmap(jax.random.split)(keys)
  normal = lambda k: jax.random.normal(k, image_shape, jnp.float32)
  z_T = jax.vmap(normal)(split[:, 0])

  def noise_fn(i, t):
    del i
    return jax.vmap(lambda k: normal(jax.random.fold_in(k, t)))(split[:, 1])
  return z_T, noise_fn


_STATIC = ("apply_fn", "image_shape", "sampler", "num_steps", "snapshot_times", "clip_x0",
           "objective", "timesteps", "guidance_scale")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _from_keys(apply_fn, params, schedule, keys, eta, image_shape, sampler, num_steps,
               snapshot_times, clip_x0, objective, timesteps, labels, guidance_scale):
  """A whole batch in one program: ``z_T`` and every update from the examples' keys."""
  z_T, noise_fn = _initial_and_noise(keys, image_shape)
  carry = _initial_carry(z_T, len(snapshot_times), _initial_state(sampler, z_T))
  return _run(apply_fn, params, schedule, carry, noise_fn, sampler, num_steps, eta,
              snapshot_times, clip_x0, objective=objective, timesteps=timesteps,
              labels=labels, guidance_scale=guidance_scale)


@functools.partial(jax.jit, static_argnames=("image_shape", "num_frames", "sampler"))
def _begin(keys, image_shape, num_frames, sampler):
  z_T = _initial_and_noise(keys, image_shape)[0]
  return _initial_carry(z_T, num_frames, _initial_state(sampler, z_T))


@functools.partial(jax.jit, static_argnames=_STATIC + ("length",))
def _advance(apply_fn, params, schedule, keys, eta, carry, start, image_shape, sampler,
             num_steps, snapshot_times, clip_x0, objective, timesteps, labels, guidance_scale,
             length):
  """``length`` updates from update ``start``: one chunk of :func:`_from_keys`'s scan."""
  noise_fn = _initial_and_noise(keys, image_shape)[1]
  return _run(apply_fn, params, schedule, carry, noise_fn, sampler, num_steps, eta,
              snapshot_times, clip_x0, start, length, objective, timesteps, labels,
              guidance_scale)


def chunk_length(num_updates: int, max_chunks: int = 20) -> int:
  """The smallest divisor of ``num_updates`` that cuts it into at most ``max_chunks`` chunks.

  Equal chunks compile once. A prime count over ``max_chunks`` is one chunk.
  """
  return next(d for d in range(-(-num_updates // max_chunks), num_updates + 1)
              if num_updates % d == 0)


def _place(keys: jax.Array, params: Any, labels: jax.Array | None = None
           ) -> tuple[jax.Array, Any, jax.Array | None]:
  """Shards the batch (its keys, and its labels if any) over the local devices and
  replicates the params.

  When the device count does not divide the batch, everything goes to the first device.
  """
  devices = jax.local_devices()
  if len(devices) == 1:
    return keys, params, labels
  if keys.shape[0] % len(devices):
    return jax.device_put((keys, params, labels), devices[0])
  mesh = Mesh(np.array(devices), ("data",))
  batch = NamedSharding(mesh, P("data"))
  return (jax.device_put(keys, batch), jax.device_put(params, NamedSharding(mesh, P())),
          None if labels is None else jax.device_put(labels, batch))


def _carry_sharding(keys: jax.Array, carry: Carry) -> Any:
  """Where each chunk leaves the carry: on the keys' device, or split over the batch axis
  of the keys' mesh (axis 1 of the frames). The first chunk's carry is put there too, as
  another placement (an uncommitted array, replicated frames) would compile it twice."""
  if not isinstance(keys.sharding, NamedSharding):
    return next(iter(keys.sharding.device_set))
  batch = NamedSharding(keys.sharding.mesh, P("data"))
  return (batch, NamedSharding(keys.sharding.mesh, P(None, "data")),
          jax.tree.map(lambda _: batch, carry[2]))


def _sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
            shape: Sequence[int], sampler: str, num_steps: int, eta: float,
            snapshot_times: Sequence[int], first_index: int,
            clip_x0: tuple[float, float] | None, progress: Callable[[int], Any] | None,
            objective: str = "eps", timesteps: tuple[int, ...] | None = None,
            labels: jax.Array | None = None, guidance_scale: float = 1.0
            ) -> tuple[jax.Array, jax.Array]:
  _check_objective(objective)
  labels = _check_labels(labels, shape[0], guidance_scale)
  keys, params, labels = _place(example_keys(rng, first_index, shape[0]), params, labels)
  static = dict(apply_fn=apply_fn, image_shape=tuple(shape[1:]), sampler=sampler,
                num_steps=num_steps, snapshot_times=frame_times(snapshot_times),
                clip_x0=None if clip_x0 is None else tuple(map(float, clip_x0)),
                objective=objective, timesteps=timesteps,
                guidance_scale=float(guidance_scale))
  eta = jnp.float32(eta)
  if progress is None:
    z, frames, _ = _from_keys(params=params, schedule=schedule, keys=keys, eta=eta,
                              labels=labels, **static)
    return z, frames
  length = chunk_length(num_steps)
  carry = _begin(keys, static["image_shape"], len(static["snapshot_times"]), sampler)
  carry = jax.device_put(carry, _carry_sharding(keys, carry))
  for start in range(0, num_steps, length):
    carry = jax.block_until_ready(_advance(params=params, schedule=schedule, keys=keys,
                                           eta=eta, carry=carry, start=jnp.int32(start),
                                           labels=labels, length=length, **static))
    progress(length)
  return carry[0], carry[1]


def ddpm_sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
                shape: Sequence[int], snapshot_times: Sequence[int] = REVERSE_TIMES,
                first_index: int = 0, progress: Callable[[int], Any] | None = None, *,
                objective: str = "eps", labels: jax.Array | None = None,
                guidance_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """The original's ancestral sampler for a batch ``shape = (B, H, W, C)``: ``(x_0, frames)``.

  Examples are numbered from ``first_index`` (see the module docstring for the keys).
  ``frames`` is ``[F, B, H, W, C]``, z after the mean update at each snapshot time from the
  largest down; with the default times, the original's 10-frame strip.

  ``progress``, when given, is called with the number of updates just done after each of up
  to 20 equal chunks of the scan (:func:`chunk_length`), each a jitted call waited for; the
  results are the same as in one call. Without it the batch is one jitted call.
  ``objective`` is what the model predicts (``'eps'``, ``'x0'`` or ``'v'``). ``labels``
  (int ``[B]``) are a class-conditional model's classes, sampled with classifier-free
  guidance of scale ``guidance_scale`` (:func:`guided_output`; 1 is the plain conditional
  model). They do not change the noise: image ``i`` starts from the same ``z_T`` whatever
  its label.
  """
  return _sample(apply_fn, params, schedule, rng, shape, "ddpm", schedule.num_steps, 0.0,
                 snapshot_times, first_index, None, progress, objective, labels=labels,
                 guidance_scale=guidance_scale)


def ddim_sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
                shape: Sequence[int], num_steps: int, eta: float = 0.0,
                snapshot_times: Sequence[int] = REVERSE_TIMES,
                first_index: int = 0, clip_x0: tuple[float, float] | None = None,
                progress: Callable[[int], Any] | None = None, *, objective: str = "eps",
                labels: jax.Array | None = None, guidance_scale: float = 1.0
                ) -> tuple[jax.Array, jax.Array]:
  """DDIM over :func:`ddim_timesteps` for a batch ``shape``: ``(x_0, frames)``.

  ``eta = 0`` is deterministic given ``z_T``; ``eta = 1`` adds DDPM's posterior-variance
  noise. Each frame is taken at the subsequence step nearest its snapshot time.
  ``clip_x0 = (lo, hi)`` clips each predicted x0 to the data range (off by default).
  ``progress``, ``objective``, ``labels`` and ``guidance_scale`` are as in
  :func:`ddpm_sample`.
  """
  _check_eta(eta)
  ddim_timesteps(schedule.num_steps, num_steps)
  return _sample(apply_fn, params, schedule, rng, shape, "ddim", num_steps, eta,
                 snapshot_times, first_index, clip_x0, progress, objective, labels=labels,
                 guidance_scale=guidance_scale)


def dpmpp2m_sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
                   shape: Sequence[int], num_steps: int, *, objective: str = "eps",
                   spacing: str = DEFAULT_SPACING, snapshot_times: Sequence[int] = REVERSE_TIMES,
                   first_index: int = 0, clip_x0: tuple[float, float] | None = None,
                   progress: Callable[[int], Any] | None = None,
                   labels: jax.Array | None = None, guidance_scale: float = 1.0
                   ) -> tuple[jax.Array, jax.Array]:
  """DPM-Solver++(2M) (Lu et al. 2022) for a batch ``shape``: ``(x_0, frames)``.

  The multistep second-order solver of the probability-flow ODE in data prediction, with
  ``num_steps`` model evaluations at :func:`dpmpp2m_timesteps` (``spacing``: ``'time'``,
  evenly in t, or ``'logsnr'``, evenly in log-SNR); its first and last updates are first
  order, and the last lands on the data prediction at t = 0. Deterministic given ``z_T``
  (the same ``z_T`` as the other samplers for the same ``rng`` and index). Frames,
  ``clip_x0``, ``progress``, ``objective``, ``labels`` and ``guidance_scale`` are as in
  :func:`ddim_sample`.
  """
  reverse_steps.check_spacing(spacing)
  timesteps = tuple(int(t) for t in dpmpp2m_timesteps(schedule, num_steps, spacing))
  return _sample(apply_fn, params, schedule, rng, shape, "dpmpp2m", num_steps, 0.0,
                 snapshot_times, first_index, clip_x0, progress, objective, timesteps,
                 labels=labels, guidance_scale=guidance_scale)
