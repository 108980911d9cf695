"""Diffusion math as pure functions: the forward process, the loss, one reverse step.

``apply_fn`` is a Flax apply function, ``apply_fn({'params': p}, x, t, train=..., rngs=...)``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ddpm_jax.schedule import Schedule

ApplyFn = Callable[..., jax.Array]


def _per_example(values: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """``values[t]`` shaped to broadcast against NHWC ``x``."""
  return values[t].reshape((-1,) + (1,) * (x.ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """The diffusion kernel: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``, a = ``alphas_cumprod``."""
  a = _per_example(schedule.alphas_cumprod, t, x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def noise_loss(params: Any, apply_fn: ApplyFn, schedule: Schedule, x0: jax.Array,
               t: jax.Array, noise: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
  """The original's objective for given ``t`` and ``noise``: MSE between eps and its estimate.

  With ``dropout_rng`` the model runs in training mode (dropout on); without it, in eval mode.
  """
  x_t = q_sample(schedule, x0, t, noise)
  if dropout_rng is None:
    pred = apply_fn({"params": params}, x_t, t, train=False)
  else:
    pred = apply_fn({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng})
  return jnp.mean(jnp.square(pred - noise))


def loss(params: Any, apply_fn: ApplyFn, schedule: Schedule, x0: jax.Array,
         rng: jax.Array) -> jax.Array:
  """The training loss for a batch: t ~ U{0..T-1}, eps ~ N(0, I), dropout on."""
  t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  return noise_loss(params, apply_fn, schedule, x0, t, noise, dropout_rng)


def ddpm_mean(schedule: Schedule, z: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  """The original's mean update at step ``t`` (scalar or ``[B]``), given the model's ``eps``."""
  return (_per_example(schedule.ddpm_z_coef, t, z) * z
          - _per_example(schedule.ddpm_eps_coef, t, z) * eps)


def ddpm_step(schedule: Schedule, z: jax.Array, t: jax.Array, eps: jax.Array,
              noise: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One ancestral step exactly as the original: mean update, then ``sqrt(beta_t)`` noise.

  No noise is added at t = 0, and nothing is clipped. Returns ``(z_next, mean)``; the mean
  is what the original snapshots for its reverse-process strip.
  """
  mean = ddpm_mean(schedule, z, t, eps)
  sigma = jnp.where(t > 0, schedule.sqrt_betas[t], 0.0)
  return mean + sigma.reshape((-1,) + (1,) * (z.ndim - 1)) * noise, mean
