"""Diffusion math as pure functions: the forward process, the loss, one reverse step.

``apply_fn`` is a Flax apply function, ``apply_fn({'params': p}, x, t, train=..., rngs=...)``.

What the model's output means is the run's ``objective``: ``'eps'`` the noise (the
original's), ``'x0'`` the clean image, ``'v'`` the velocity ``sqrt(a) eps - sqrt(1 - a) x0``
(Salimans & Ho 2022), a = ``alphas_cumprod[t]``. :func:`model_output_to_x0_eps` turns any
of them into the pair ``(x0, eps)`` the samplers use, and :func:`objective_target` gives
the loss's target, with the same ``sqrt(a)`` and ``sqrt(1 - a)`` as :func:`q_sample`.

A class-conditional model (``UNet(num_classes > 0)``) takes ``labels`` int ``[B]``; for
classifier-free guidance the loss replaces a fraction ``label_dropout`` of them by
:data:`~ddpm_jax.model.NO_CLASS` (:func:`drop_labels`), from a key of its own, so that
an unconditional run's draws stay the original's.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ddpm_jax.model import NO_CLASS
from ddpm_jax.schedule import Schedule

ApplyFn = Callable[..., jax.Array]
# The label-dropout key of :func:`loss` is ``fold_in(rng, LABEL_DROPOUT_FOLD)``: the split
# of ``rng`` into the t, noise and dropout keys stays the original's.
LABEL_DROPOUT_FOLD = 3


def _per_example(values: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """``values[t]`` shaped to broadcast against NHWC ``x``."""
  return values[t].reshape((-1,) + (1,) * (x.ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """The diffusion kernel: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``, a = ``alphas_cumprod``."""
  a = _per_example(schedule.alphas_cumprod, t, x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


OBJECTIVES = ("eps", "x0", "v")
LOSS_WEIGHTINGS = ("none", "min_snr")


def _check_objective(objective: str) -> None:
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def _alpha_sigma(schedule: Schedule, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(sqrt(a_t), sqrt(1 - a_t))`` shaped to broadcast against ``x``, as :func:`q_sample`."""
  a = _per_example(schedule.alphas_cumprod, t, x)
  return jnp.sqrt(a), jnp.sqrt(1 - a)


def objective_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                     objective: str) -> jax.Array:
  """What the model learns to output at ``q_sample(schedule, x0, t, noise)``."""
  _check_objective(objective)
  if objective == "eps":
    return noise
  if objective == "x0":
    return x0
  alpha, sigma = _alpha_sigma(schedule, t, x0)
  return alpha * noise - sigma * x0


def model_output_to_x0_eps(schedule: Schedule, z: jax.Array, t: jax.Array, out: jax.Array,
                           objective: str) -> tuple[jax.Array, jax.Array]:
  """``(x0, eps)`` that the model's output ``out`` at ``z = sqrt(a) x0 + sqrt(1 - a) eps``
  stands for; ``t`` is a scalar or ``[B]``.

  eps: ``x0 = (z - sqrt(1 - a) eps) / sqrt(a)``; x0: ``eps = (z - sqrt(a) x0) / sqrt(1 - a)``;
  v: ``x0 = sqrt(a) z - sqrt(1 - a) v`` and ``eps = sqrt(1 - a) z + sqrt(a) v`` (the
  rotation that defines v, inverted; exact since ``a + (1 - a) = 1``). Each is the exact
  inverse of :func:`objective_target` given ``z``.
  """
  _check_objective(objective)
  alpha, sigma = _alpha_sigma(schedule, t, z)
  if objective == "eps":
    return (z - sigma * out) / alpha, out
  if objective == "x0":
    return out, (z - alpha * out) / sigma
  return alpha * z - sigma * out, sigma * z + alpha * out


def min_snr_weight(schedule: Schedule, t: jax.Array, objective: str,
                   gamma: float = 5.0) -> jax.Array:
  """Min-SNR-gamma's per-example loss weight (Hang et al. 2023), ``[B]`` for ``t`` ``[B]``.

  With ``snr = a / (1 - a)`` it weights each objective's MSE as the x0 MSE weighted by
  ``min(snr, gamma)``: eps ``min(snr, gamma) / snr``, x0 ``min(snr, gamma)``, v
  ``min(snr, gamma) / (snr + 1)`` (an eps error weighs ``snr`` times an x0 error, a v
  error ``snr + 1`` times).
  """
  _check_objective(objective)
  a = schedule.alphas_cumprod[t]
  snr = a / (1 - a)
  clipped = jnp.minimum(snr, gamma)
  if objective == "eps":
    return clipped / snr
  if objective == "x0":
    return clipped
  return clipped / (snr + 1)


def drop_labels(rng: jax.Array, labels: jax.Array, rate: float) -> jax.Array:
  """``labels`` with each replaced by :data:`~ddpm_jax.model.NO_CLASS` with probability
  ``rate``, independently: classifier-free guidance's label dropout, which trains the
  unconditional model in the same network. ``rate = 0`` draws nothing."""
  if isinstance(rate, (int, float)) and rate == 0:
    return labels
  drop = jax.random.bernoulli(rng, rate, jnp.shape(labels))
  return jnp.where(drop, jnp.asarray(NO_CLASS, labels.dtype), labels)


def _predict(params: Any, apply_fn: ApplyFn, x_t: jax.Array, t: jax.Array,
             dropout_rng: jax.Array | None, labels: jax.Array | None) -> jax.Array:
  """The model's output, in training mode with ``dropout_rng``, in eval mode without; the
  ``labels`` only to a conditional model (an unconditional call is the original's)."""
  extra = {} if labels is None else {"labels": labels}
  if dropout_rng is None:
    return apply_fn({"params": params}, x_t, t, train=False, **extra)
  return apply_fn({"params": params}, x_t, t, train=True, rngs={"dropout": dropout_rng},
                  **extra)


def objective_loss(params: Any, apply_fn: ApplyFn, schedule: Schedule, x0: jax.Array,
                   t: jax.Array, noise: jax.Array, dropout_rng: jax.Array | None = None, *,
                   objective: str = "eps", loss_weighting: str = "none",
                   min_snr_gamma: float = 5.0, labels: jax.Array | None = None) -> jax.Array:
  """The MSE between the model's output and ``objective``'s target for given ``t`` and ``noise``.

  ``loss_weighting='none'`` is the plain mean over every element; ``'min_snr'`` is the mean
  over the batch of :func:`min_snr_weight` times each example's MSE. With ``dropout_rng``
  the model runs in training mode; without it, in eval mode. ``labels`` (int ``[B]``, as
  given: no label dropout here) go to a class-conditional model.
  """
  if loss_weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, "
                     f"got {loss_weighting!r}")
  target = objective_target(schedule, x0, noise, t, objective)
  x_t = q_sample(schedule, x0, t, noise)
  pred = _predict(params, apply_fn, x_t, t, dropout_rng, labels)
  squared = jnp.square(pred - target)
  if loss_weighting == "none":
    return jnp.mean(squared)
  per_example = jnp.mean(squared.reshape(squared.shape[0], -1), axis=1)
  return jnp.mean(min_snr_weight(schedule, t, objective, min_snr_gamma) * per_example)


def noise_loss(params: Any, apply_fn: ApplyFn, schedule: Schedule, x0: jax.Array,
               t: jax.Array, noise: jax.Array, dropout_rng: jax.Array | None = None, *,
               labels: jax.Array | None = None) -> jax.Array:
  """The original's objective for given ``t`` and ``noise``: MSE between eps and its estimate.

  With ``dropout_rng`` the model runs in training mode (dropout on); without it, in eval mode.
  ``labels`` (int ``[B]``, as given) go to a class-conditional model.
  """
  x_t = q_sample(schedule, x0, t, noise)
  pred = _predict(params, apply_fn, x_t, t, dropout_rng, labels)
  return jnp.mean(jnp.square(pred - noise))


def loss(params: Any, apply_fn: ApplyFn, schedule: Schedule, x0: jax.Array,
         rng: jax.Array, *, objective: str = "eps", loss_weighting: str = "none",
         min_snr_gamma: float = 5.0, labels: jax.Array | None = None,
         label_dropout: float = 0.0) -> jax.Array:
  """The training loss for a batch: t ~ U{0..T-1}, eps ~ N(0, I), dropout on.

  With the defaults it is the original's :func:`noise_loss`, bit for bit; otherwise
  :func:`objective_loss`, from the same draws of ``rng``. ``labels`` (int ``[B]``, for a
  class-conditional model) lose a fraction ``label_dropout`` to
  :data:`~ddpm_jax.model.NO_CLASS` (:func:`drop_labels`), drawn from
  ``fold_in(rng, LABEL_DROPOUT_FOLD)``: t, the noise and the dropout are drawn as without
  labels.
  """
  t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  if labels is not None:
    labels = drop_labels(jax.random.fold_in(rng, LABEL_DROPOUT_FOLD), labels, label_dropout)
  if objective == "eps" and loss_weighting == "none":
    return noise_loss(params, apply_fn, schedule, x0, t, noise, dropout_rng, labels=labels)
  return objective_loss(params, apply_fn, schedule, x0, t, noise, dropout_rng,
                        objective=objective, loss_weighting=loss_weighting,
                        min_snr_gamma=min_snr_gamma, labels=labels)


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
