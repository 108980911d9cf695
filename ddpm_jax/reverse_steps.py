"""The update rules of the reverse process: one step of the original's DDPM sampler, of
DDIM and of DPM-Solver++(2M), and the time steps DDIM and DPM-Solver++ visit.

Each ``*_step_fn`` returns a :data:`StepFn` that :mod:`ddpm_jax.sampling` runs in its
``lax.scan``; the model's output is read as its ``objective`` (``eps``, ``x0`` or ``v``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.schedule import Schedule

# StepFn(i, t, z, out, noise, state) -> (z_next, frame, state): one update of the reverse
# process from the model's output ``out`` at (z, t); ``state`` is what the sampler carries
# from one update to the next besides z (DPM-Solver++'s previous x0; () for the others).
StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, Any],
                  tuple[jax.Array, jax.Array, Any]]
# DPM-Solver++'s time steps: evenly spaced in t (as DDIM's) or in log-SNR (lambda).
SPACINGS = ("time", "logsnr")
# Log-SNR: on a Gaussian toy data set, whose exact probability-flow solution is known, its
# error falls at second order in K, where evenly spaced t leaves the last updates long
# steps in log-SNR (tests/test_recipe.py).
DEFAULT_SPACING = "logsnr"


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


def ddpm_step_fn(schedule: Schedule, objective: str = "eps") -> StepFn:
  def step(i, t, z, out, noise, state):
    del i
    eps = out if objective == "eps" else diffusion.model_output_to_x0_eps(
        schedule, z, t, out, objective)[1]
    return diffusion.ddpm_step(schedule, z, t, eps, noise) + (state,)
  return step


def ddim_coefficients(schedule: Schedule, steps: np.ndarray, eta: jax.Array):
  """``(a, a_prev, sigma, eps_coef)`` per update; ``a_prev`` is 1 after the last step."""
  a = schedule.alphas_cumprod[jnp.asarray(steps)]
  a_prev = jnp.concatenate([a[1:], jnp.ones((1,), a.dtype)])
  sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  # 1 - a_prev - sigma^2 >= 0 for eta <= 1; the floor only absorbs float32 rounding.
  eps_coef = jnp.sqrt(jnp.maximum(1 - a_prev - jnp.square(sigma), 0.0))
  return a, a_prev, sigma, eps_coef


def ddim_step_fn(schedule: Schedule, steps: np.ndarray, eta: jax.Array,
                  clip_x0: tuple[float, float] | None = None, objective: str = "eps"
                  ) -> StepFn:
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
  a, a_prev, sigma, eps_coef = ddim_coefficients(schedule, steps, eta)

  def step(i, t, z, out, noise, state):
    if objective == "eps":
      eps = out
      x0 = (z - jnp.sqrt(1 - a[i]) * eps) / jnp.sqrt(a[i])
    else:
      x0, eps = diffusion.model_output_to_x0_eps(schedule, z, t, out, objective)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, *clip_x0)
      eps = (z - jnp.sqrt(a[i]) * x0) / jnp.sqrt(1 - a[i])
    mean = jnp.sqrt(a_prev[i]) * x0 + eps_coef[i] * eps
    return mean + sigma[i] * noise, mean, state
  return step


def dpmpp2m_timesteps(schedule: Schedule, num_steps: int,
                      spacing: str = DEFAULT_SPACING) -> np.ndarray:
  """DPM-Solver++'s ``num_steps`` training steps, from T-1 down to 0 (both included).

  ``'time'``: :func:`ddim_timesteps`, evenly spaced in t. ``'logsnr'``: evenly spaced in
  ``lambda = log(sqrt(a) / sqrt(1 - a))`` from ``lambda(T-1)`` to ``lambda(0)``, in whole
  steps (the model knows whole steps only): from each step the next is the whole step whose
  lambda is nearest an even share of the lambda left, ``lambda(s) + (lambda(0) - lambda(s))
  / (updates left)``, among those that leave a distinct step for each update after it.
  Where one whole step moves lambda by more than a share (the clipped last beta of the
  cosine and sigmoid schedules, and the linear schedule's first steps once K is large)
  the steps are consecutive there and the rest is spread evenly over what is left. With
  ``num_steps == T`` both spacings are every step. ``'logsnr'`` reads the schedule's
  values: call it outside jit.
  """
  check_spacing(spacing)
  num_train_steps = schedule.num_steps
  steps = ddim_timesteps(num_train_steps, num_steps)
  if spacing == "time" or num_steps < 2:
    return steps
  try:
    a = np.asarray(schedule.alphas_cumprod, np.float64)
  except jax.errors.TracerArrayConversionError as e:
    raise ValueError("spacing='logsnr' reads the schedule's values: call it outside jit") from e
  lam = 0.5 * (np.log(a) - np.log1p(-a))  # Increasing as t decreases.
  steps[0] = num_train_steps - 1
  for i in range(1, num_steps):
    s, left = int(steps[i - 1]), num_steps - i
    target = lam[s] + (lam[0] - lam[s]) / left
    lowest = left - 1  # Steps left - 1 .. 0 remain for the updates after this one.
    candidates = np.arange(lowest, s)
    steps[i] = candidates[np.argmin(np.abs(lam[lowest:s] - target))]
  return steps


def dpmpp2m_coefficients(schedule: Schedule, steps: np.ndarray
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(z_coef, x0_coef, c)`` per update of DPM-Solver++(2M) from ``steps[i]`` to ``steps[i+1]``
  (to alpha = 1, sigma = 0 after the last).

  With ``alpha = sqrt(a)``, ``sigma = sqrt(1 - a)`` and ``h = lambda_next - lambda``,
  ``z_coef = sigma_next / sigma`` and ``x0_coef = alpha_next (1 - exp(-h))``, written as
  ``alpha_next - alpha sigma_next / sigma`` (the same value; no logarithms, and it is 1
  into sigma = 0). ``c = h / (2 h_prev)`` weighs the previous update's x0 in the
  second-order estimate ``x0 + c (x0 - x0_prev)``; it is 0 at the first and the last update,
  which are first order (DDIM's).
  """
  a = schedule.alphas_cumprod[jnp.asarray(steps)]
  alpha, sigma = jnp.sqrt(a), jnp.sqrt(1 - a)
  alpha_next = jnp.concatenate([alpha[1:], jnp.ones((1,), alpha.dtype)])
  sigma_next = jnp.concatenate([sigma[1:], jnp.zeros((1,), sigma.dtype)])
  z_coef = sigma_next / sigma
  x0_coef = alpha_next - alpha * z_coef
  # h of the updates into a step with sigma > 0, from ratios near 1 (accurate in float32).
  h = jnp.log(alpha_next[:-1] / alpha[:-1]) + jnp.log(sigma[:-1] / sigma_next[:-1])
  second_order = np.zeros(len(steps), bool)
  second_order[1:-1] = True  # Updates 1 .. K-2: the last one's h is infinite.
  ratio = jnp.concatenate([jnp.zeros((1,), h.dtype), h[1:] / (2 * h[:-1]),
                           jnp.zeros((1,), h.dtype)])[:len(steps)]
  c = jnp.where(jnp.asarray(second_order), ratio, 0.0)
  return z_coef, x0_coef, c


def dpmpp2m_step_fn(schedule: Schedule, steps: np.ndarray,
                     clip_x0: tuple[float, float] | None = None, objective: str = "eps"
                     ) -> StepFn:
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data prediction, multistep.

  ``z_next = (sigma_next / sigma) z + alpha_next (1 - exp(-h)) D`` with
  ``D = x0 + h / (2 h_prev) (x0 - x0_prev)``, or ``D = x0`` at the first update and the
  last (first order: DDIM's update, "lower_order_final"); the last lands on sigma = 0, where
  ``z_next = x0``, the data prediction at t = 0. ``state`` is the previous update's x0.
  The frame is ``z_next``. ``clip_x0 = (lo, hi)`` clips each x0 estimate to the data range.
  """
  z_coef, x0_coef, c = dpmpp2m_coefficients(schedule, steps)

  def step(i, t, z, out, noise, x0_prev):
    del noise
    x0 = diffusion.model_output_to_x0_eps(schedule, z, t, out, objective)[0]
    if clip_x0 is not None:
      x0 = jnp.clip(x0, *clip_x0)
    d = x0 + c[i] * (x0 - x0_prev)
    z_next = z_coef[i] * z + x0_coef[i] * d
    return z_next, z_next, x0
  return step


def ddim_sigmas(schedule: Schedule, num_steps: int, eta: float) -> jax.Array:
  """The ``[num_steps]`` noise scales DDIM adds after each of its updates."""
  steps = ddim_timesteps(schedule.num_steps, num_steps)
  return ddim_coefficients(schedule, steps, jnp.asarray(eta, jnp.float32))[2]


def check_spacing(spacing: str) -> None:
  if spacing not in SPACINGS:
    raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
