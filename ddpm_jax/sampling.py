"""The reverse process: the original's ancestral (DDPM) sampler and DDIM, each one jitted scan.

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
DDPM and DDIM with ``num_steps == T`` draw the same ``z_T`` and the same noise.

Nothing is clipped: images are in the data range of the training run, [0, 1] for the
original (``config.data.range == 'zero_one'``) or [-1, 1]; only ``ddpm_jax.images`` maps
them to pixels. Batches whose size the local device count divides are sharded over the
devices (``Mesh(local_devices, ('data',))``), with the params replicated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ddpm_jax import diffusion
from ddpm_jax.schedule import Schedule

ApplyFn = Callable[..., jax.Array]
# StepFn(i, t, z, eps, noise) -> (z_next, frame): one update of the reverse process.
StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                  tuple[jax.Array, jax.Array]]
# NoiseFn(i, t) -> the noise added after the i-th update, which is at step t.
NoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
# (z, frames): the reverse process's state and the strip's buffer, carried through the scan.
Carry = tuple[jax.Array, jax.Array]

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


def ddim_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
  """DDIM's subsequence: ``num_steps`` training steps evenly spaced from T-1 down to 0.

  ``round(linspace(T - 1, 0, K))``, so both ends are included: the first update sees the
  pure-noise step T-1, as DDPM's does, and the last lands on t = 0, DDPM's final step. With
  K = T it is every step. (DDIM's paper uses ``range(0, T, T // K)``, which never visits
  T-1; "trailing" spacing never visits 0.)
  """
  if not 1 <= num_steps <= num_train_steps:
    raise ValueError(f"num_steps must be in 1..{num_train_steps}, got {num_steps}")
  steps = np.round(np.linspace(num_train_steps - 1, 0, num_steps)).astype(np.int32)
  assert np.all(np.diff(steps) < 0), steps  # Spacing >= 1 keeps the rounded steps distinct.
  return steps


def _frame_slots(steps: np.ndarray, snapshot_times: Sequence[int],
                 num_train_steps: int) -> np.ndarray:
  """For each frame (in :func:`frame_times` order), the index into ``steps`` nearest its time."""
  times = np.asarray(frame_times(snapshot_times), np.int64)
  if times.size and (times.min() < 0 or times.max() >= num_train_steps):
    raise ValueError(f"snapshot times must be in 0..{num_train_steps - 1}, "
                     f"got {sorted(times.tolist())}")
  return np.abs(steps[None, :].astype(np.int64) - times[:, None]).argmin(axis=1).astype(np.int32)


def predict_eps(apply_fn: ApplyFn, params: Any, z: jax.Array, t: jax.Array) -> jax.Array:
  """The model's noise estimate at the scalar step ``t``, in eval mode, as float32."""
  t_batch = jnp.full((z.shape[0],), t, jnp.int32)
  return apply_fn({"params": params}, z, t_batch, train=False).astype(jnp.float32)


def _initial_carry(z_T: jax.Array, num_frames: int) -> Carry:
  return z_T.astype(jnp.float32), jnp.zeros((num_frames,) + z_T.shape, jnp.float32)


def _reverse_scan(apply_fn: ApplyFn, params: Any, carry: Carry, xs: tuple[jax.Array, jax.Array],
                  slots: np.ndarray, step_fn: StepFn, noise_fn: NoiseFn) -> Carry:
  """Runs ``step_fn`` over the updates ``xs = (i, t)`` in one scan from ``carry = (z, frames)``.

  Frame ``f`` is the frame ``step_fn`` returns at the update ``slots[f]``, written into the
  carried buffer with a select, so one update may fill several frames.
  """
  slots = jnp.asarray(slots)

  def body(carry, xs):
    z, frames = carry
    i, t = xs
    eps = predict_eps(apply_fn, params, z, t)
    z, frame = step_fn(i, t, z, eps, noise_fn(i, t))
    hit = (slots == i)[:, None, None, None, None]
    return (z, jnp.where(hit, frame[None], frames)), None

  carry, _ = jax.lax.scan(body, carry, xs)
  return carry


def _ddpm_step_fn(schedule: Schedule) -> StepFn:
  def step(i, t, z, eps, noise):
    del i
    return diffusion.ddpm_step(schedule, z, t, eps, noise)
  return step


def _ddim_coefficients(schedule: Schedule, steps: np.ndarray, eta: jax.Array):
  """``(a, a_prev, sigma, eps_coef)`` per update; ``a_prev`` is 1 after the last step."""
  a = schedule.alphas_cumprod[jnp.asarray(steps)]
  a_prev = jnp.concatenate([a[1:], jnp.ones((1,), a.dtype)])
  sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  # 1 - a_prev - sigma^2 >= 0 for eta <= 1; the floor only absorbs float32 rounding.
  eps_coef = jnp.sqrt(jnp.maximum(1 - a_prev - jnp.square(sigma), 0.0))
  return a, a_prev, sigma, eps_coef


def _ddim_step_fn(schedule: Schedule, steps: np.ndarray, eta: jax.Array,
                  clip_x0: tuple[float, float] | None = None) -> StepFn:
  """Song et al.'s eq. 12 from ``steps[i]`` to ``steps[i + 1]`` (to alpha = 1 after the last).

  ``x0 = (z - sqrt(1 - a) eps) / sqrt(a)``;
  ``sigma = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev)``;
  ``z_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise``.
  With every step and eta = 1, sigma^2 is the DDPM posterior variance. The frame is
  ``z_prev`` before the noise; after the last step it is ``x0``.

  ``clip_x0 = (lo, hi)`` clips the predicted ``x0`` to the data range and re-derives
  ``eps`` from it (the DDPM reference code's ``clip_denoised``); it keeps an undertrained
  model's samples from drifting out of range. Off by default, as in the original.
  """
  a, a_prev, sigma, eps_coef = _ddim_coefficients(schedule, steps, eta)

  def step(i, t, z, eps, noise):
    del t
    x0 = (z - jnp.sqrt(1 - a[i]) * eps) / jnp.sqrt(a[i])
    if clip_x0 is not None:
      x0 = jnp.clip(x0, *clip_x0)
      eps = (z - jnp.sqrt(a[i]) * x0) / jnp.sqrt(1 - a[i])
    mean = jnp.sqrt(a_prev[i]) * x0 + eps_coef[i] * eps
    return mean + sigma[i] * noise, mean
  return step


def ddim_sigmas(schedule: Schedule, num_steps: int, eta: float) -> jax.Array:
  """The ``[num_steps]`` noise scales DDIM adds after each of its updates."""
  steps = ddim_timesteps(schedule.num_steps, num_steps)
  return _ddim_coefficients(schedule, steps, jnp.asarray(eta, jnp.float32))[2]


def _check_eta(eta: float) -> None:
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}")


def _plan(schedule: Schedule, sampler: str, num_steps: int, eta: jax.Array,
          snapshot_times: Sequence[int], clip_x0: tuple[float, float] | None
          ) -> tuple[np.ndarray, np.ndarray, StepFn]:
  """``(steps, slots, step_fn)`` of a sampler: its descending steps, frame slots and update."""
  if sampler == "ddpm":
    steps = np.arange(schedule.num_steps - 1, -1, -1, dtype=np.int32)
    step_fn = _ddpm_step_fn(schedule)
  else:
    steps = ddim_timesteps(schedule.num_steps, num_steps)
    step_fn = _ddim_step_fn(schedule, steps, jnp.asarray(eta, jnp.float32), clip_x0)
  return steps, _frame_slots(steps, snapshot_times, schedule.num_steps), step_fn


def _run(apply_fn: ApplyFn, params: Any, schedule: Schedule, carry: Carry, noise_fn: NoiseFn,
         sampler: str, num_steps: int, eta: jax.Array, snapshot_times: Sequence[int],
         clip_x0: tuple[float, float] | None, start: int | jax.Array = 0,
         length: int | None = None) -> Carry:
  """The sampler's updates ``start .. start + length - 1`` (all of them by default)."""
  steps, slots, step_fn = _plan(schedule, sampler, num_steps, eta, snapshot_times, clip_x0)
  i = start + jnp.arange(len(steps) if length is None else length, dtype=jnp.int32)
  return _reverse_scan(apply_fn, params, carry, (i, jnp.asarray(steps)[i]), slots, step_fn,
                       noise_fn)


@functools.partial(jax.jit, static_argnames=("apply_fn", "snapshot_times"))
def ddpm_sample_from(apply_fn: ApplyFn, params: Any, schedule: Schedule, z_T: jax.Array,
                     noise: jax.Array, snapshot_times: Sequence[int] = REVERSE_TIMES
                     ) -> tuple[jax.Array, jax.Array]:
  """The original's sampler from a given ``z_T`` with given noise: ``(x_0, frames)``.

  ``noise[t]`` (``[T, B, H, W, C]``) is added after the update at step t (``noise[0]`` is
  unused), as in ``reference_torch.sample``. ``frames`` is ``[F, B, H, W, C]``: z after the
  mean update at each snapshot time in :func:`frame_times` order.
  """
  carry = _initial_carry(z_T, len(frame_times(snapshot_times)))
  return _run(apply_fn, params, schedule, carry, lambda i, t: noise[t], "ddpm",
              schedule.num_steps, jnp.float32(0), snapshot_times, None)


@functools.partial(jax.jit,
                   static_argnames=("apply_fn", "num_steps", "snapshot_times", "clip_x0"))
def ddim_sample_from(apply_fn: ApplyFn, params: Any, schedule: Schedule, z_T: jax.Array,
                     noise: jax.Array, num_steps: int, eta: float = 0.0,
                     snapshot_times: Sequence[int] = REVERSE_TIMES,
                     clip_x0: tuple[float, float] | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """DDIM from a given ``z_T``; ``noise[i]`` (``[K, B, H, W, C]``) follows the i-th update.

  ``frames[f]`` is z before the noise after the update at the subsequence step nearest
  frame time f (two frame times may share a step when K is small).
  """
  carry = _initial_carry(z_T, len(frame_times(snapshot_times)))
  return _run(apply_fn, params, schedule, carry, lambda i, t: noise[i], "ddim", num_steps,
              eta, snapshot_times, clip_x0)


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


_STATIC = ("apply_fn", "image_shape", "sampler", "num_steps", "snapshot_times", "clip_x0")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _from_keys(apply_fn, params, schedule, keys, eta, image_shape, sampler, num_steps,
               snapshot_times, clip_x0):
  """A whole batch in one program: ``z_T`` and every update from the examples' keys."""
  z_T, noise_fn = _initial_and_noise(keys, image_shape)
  return _run(apply_fn, params, schedule, _initial_carry(z_T, len(snapshot_times)), noise_fn,
              sampler, num_steps, eta, snapshot_times, clip_x0)


@functools.partial(jax.jit, static_argnames=("image_shape", "num_frames"))
def _begin(keys, image_shape, num_frames):
  return _initial_carry(_initial_and_noise(keys, image_shape)[0], num_frames)


@functools.partial(jax.jit, static_argnames=_STATIC + ("length",))
def _advance(apply_fn, params, schedule, keys, eta, carry, start, image_shape, sampler,
             num_steps, snapshot_times, clip_x0, length):
  """``length`` updates from update ``start``: one chunk of :func:`_from_keys`'s scan."""
  noise_fn = _initial_and_noise(keys, image_shape)[1]
  return _run(apply_fn, params, schedule, carry, noise_fn, sampler, num_steps, eta,
              snapshot_times, clip_x0, start, length)


def chunk_length(num_updates: int, max_chunks: int = 20) -> int:
  """The smallest divisor of ``num_updates`` that cuts it into at most ``max_chunks`` chunks.

  Equal chunks compile once. A prime count over ``max_chunks`` is one chunk.
  """
  return next(d for d in range(-(-num_updates // max_chunks), num_updates + 1)
              if num_updates % d == 0)


def _place(keys: jax.Array, params: Any) -> tuple[jax.Array, Any]:
  """Shards the batch (its keys) over the local devices and replicates the params.

  When the device count does not divide the batch, everything goes to the first device.
  """
  devices = jax.local_devices()
  if len(devices) == 1:
    return keys, params
  if keys.shape[0] % len(devices):
    return jax.device_put((keys, params), devices[0])
  mesh = Mesh(np.array(devices), ("data",))
  return (jax.device_put(keys, NamedSharding(mesh, P("data"))),
          jax.device_put(params, NamedSharding(mesh, P())))


def _sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
            shape: Sequence[int], sampler: str, num_steps: int, eta: float,
            snapshot_times: Sequence[int], first_index: int,
            clip_x0: tuple[float, float] | None, progress: Callable[[int], Any] | None
            ) -> tuple[jax.Array, jax.Array]:
  keys, params = _place(example_keys(rng, first_index, shape[0]), params)
  static = dict(apply_fn=apply_fn, image_shape=tuple(shape[1:]), sampler=sampler,
                num_steps=num_steps, snapshot_times=frame_times(snapshot_times),
                clip_x0=None if clip_x0 is None else tuple(map(float, clip_x0)))
  eta = jnp.float32(eta)
  if progress is None:
    return _from_keys(params=params, schedule=schedule, keys=keys, eta=eta, **static)
  length = chunk_length(num_steps)
  carry = _begin(keys, static["image_shape"], len(static["snapshot_times"]))
  for start in range(0, num_steps, length):
    carry = jax.block_until_ready(_advance(params=params, schedule=schedule, keys=keys,
                                           eta=eta, carry=carry, start=jnp.int32(start),
                                           length=length, **static))
    progress(length)
  return carry


def ddpm_sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
                shape: Sequence[int], snapshot_times: Sequence[int] = REVERSE_TIMES,
                first_index: int = 0, progress: Callable[[int], Any] | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """The original's ancestral sampler for a batch ``shape = (B, H, W, C)``: ``(x_0, frames)``.

  Examples are numbered from ``first_index`` (see the module docstring for the keys).
  ``frames`` is ``[F, B, H, W, C]``, z after the mean update at each snapshot time from the
  largest down; with the default times, the original's 10-frame strip.

  ``progress``, when given, is called with the number of updates just done after each of up
  to 20 equal chunks of the scan (:func:`chunk_length`), each a jitted call waited for; the
  results are the same as in one call. Without it the batch is one jitted call.
  """
  return _sample(apply_fn, params, schedule, rng, shape, "ddpm", schedule.num_steps, 0.0,
                 snapshot_times, first_index, None, progress)


def ddim_sample(apply_fn: ApplyFn, params: Any, schedule: Schedule, rng: jax.Array,
                shape: Sequence[int], num_steps: int, eta: float = 0.0,
                snapshot_times: Sequence[int] = REVERSE_TIMES,
                first_index: int = 0, clip_x0: tuple[float, float] | None = None,
                progress: Callable[[int], Any] | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """DDIM over :func:`ddim_timesteps` for a batch ``shape``: ``(x_0, frames)``.

  ``eta = 0`` is deterministic given ``z_T``; ``eta = 1`` adds DDPM's posterior-variance
  noise. Each frame is taken at the subsequence step nearest its snapshot time.
  ``clip_x0 = (lo, hi)`` clips each predicted x0 to the data range (off by default).
  ``progress`` is as in :func:`ddpm_sample`.
  """
  _check_eta(eta)
  ddim_timesteps(schedule.num_steps, num_steps)
  return _sample(apply_fn, params, schedule, rng, shape, "ddim", num_steps, eta,
                 snapshot_times, first_index, clip_x0, progress)
