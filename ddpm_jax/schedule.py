"""The noise schedules (the original's linear one, cosine, sigmoid) and every per-step
coefficient sampling needs, computed once."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """Per-timestep float32 arrays, each ``[num_steps]``; a pytree, so it passes into jit.

  ``alphas_cumprod`` is what the original calls ``alpha``. The ``ddpm_*`` coefficients are
  the original sampler's update ``z = ddpm_z_coef * z - ddpm_eps_coef * eps`` followed by
  ``z += sqrt(beta) * noise``, written with its own operation order.
  """
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  ddpm_z_coef: jax.Array
  ddpm_eps_coef: jax.Array
  sqrt_betas: jax.Array
  posterior_variance: jax.Array

  @property
  def num_steps(self) -> int:
    return self.betas.shape[0]


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
  """The original's ``DDPM_Scheduler``: float32 linspace betas and their cumulative product,
  bit for bit as PyTorch computes them on the CPU.

  ``torch.linspace`` steps by the float32 ``(end - start) / (n - 1)`` from ``start`` for the
  first half and back from ``end`` for the second, rounding each entry once;
  ``torch.cumprod`` of float32 accumulates in float64 on the CPU and rounds each product to
  float32. (A float32 running product would be off by up to 8.5e-5 relative in
  ``1 - alphas_cumprod`` near t = 0.)
  """
  if num_steps < 2:
    raise ValueError(f"num_steps must be at least 2, got {num_steps}")
  start, end = np.float32(beta_start), np.float32(beta_end)
  step = np.float64((end - start) / np.float32(num_steps - 1))
  i = np.arange(num_steps)
  # step * i is exact in float64 (a 24-bit float32 times i < 2**29); the sum is rounded to
  # float32, as torch's fused multiply-add rounds it once.
  betas = np.where(i < num_steps // 2, np.float64(start) + step * i,
                   np.float64(end) - step * (num_steps - 1 - i)).astype(np.float32)
  alphas = np.float32(1.0) - betas
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  sqrt_betas = np.sqrt(betas)
  sqrt_one_minus_beta = np.sqrt(np.float32(1.0) - betas)
  sqrt_one_minus_ac = np.sqrt(np.float32(1.0) - alphas_cumprod)
  ac_prev = np.concatenate([np.ones(1, np.float32), alphas_cumprod[:-1]])
  arrays = dict(
      betas=betas,
      alphas=alphas,
      alphas_cumprod=alphas_cumprod,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=sqrt_one_minus_ac,
      ddpm_z_coef=np.float32(1.0) / sqrt_one_minus_beta,
      ddpm_eps_coef=betas / (sqrt_one_minus_ac * sqrt_one_minus_beta),
      sqrt_betas=sqrt_betas,
      posterior_variance=(betas * (np.float32(1.0) - ac_prev) /
                          (np.float32(1.0) - alphas_cumprod)).astype(np.float32),
  )
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


SCHEDULE_KINDS = ("linear", "cosine", "sigmoid")
# Betas of the cosine and sigmoid schedules are clipped here, as Nichol & Dhariwal do, so
# that the last step keeps some signal instead of a singular beta of 1.
MAX_BETA = 0.999
COSINE_S = 0.008
SIGMOID_START, SIGMOID_END, SIGMOID_TAU, SIGMOID_CLIP_MIN = -3.0, 3.0, 1.0, 1e-9


def cosine_alpha_bar(t: np.ndarray, s: float = COSINE_S) -> np.ndarray:
  """Nichol & Dhariwal's continuous ``alpha_bar(t) = f(t) / f(0)``, ``t`` in [0, 1], float64:
  ``f(t) = cos((t + s) / (1 + s) * pi / 2)^2``."""
  f = lambda u: np.cos((np.asarray(u, np.float64) + s) / (1 + s) * np.pi / 2) ** 2
  return f(t) / f(0.0)


def sigmoid_alpha_bar(t: np.ndarray, start: float = SIGMOID_START, end: float = SIGMOID_END,
                      tau: float = SIGMOID_TAU, clip_min: float = SIGMOID_CLIP_MIN
                      ) -> np.ndarray:
  """Chen (2023)'s sigmoid schedule (after Jabri et al.), ``t`` in [0, 1], float64:
  ``(v_end - sigmoid((t (end - start) + start) / tau)) / (v_end - v_start)``, with
  ``v = sigmoid(end / tau), sigmoid(start / tau)``, clipped to ``[clip_min, 1]``."""
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))
  v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
  out = sigmoid((np.asarray(t, np.float64) * (end - start) + start) / tau)
  return np.clip((v_end - out) / (v_end - v_start), clip_min, 1.0)


def _betas_from_alpha_bar(alpha_bar: np.ndarray) -> np.ndarray:
  """Betas whose cumulative product of ``1 - beta`` is ``alpha_bar[i]`` (the continuous
  function at ``t = (i + 1) / T``, with ``alpha_bar = 1`` before step 0), clipped at
  :data:`MAX_BETA`; float64."""
  previous = np.concatenate([np.ones(1), alpha_bar[:-1]])
  return np.minimum(1.0 - alpha_bar / previous, MAX_BETA)


def _schedule_from_betas64(betas: np.ndarray) -> Schedule:
  """Every coefficient of :class:`Schedule` from float64 betas, computed in float64 and
  rounded to float32 once.

  ``alphas_cumprod`` is rounded first and the coefficients derived from the rounded values,
  so the sampler's tables describe the same process as the float32 ``alphas_cumprod`` that
  the loss's forward process reads.
  """
  betas = np.asarray(betas, np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32).astype(np.float64)
  ac_prev = np.concatenate([np.ones(1), alphas_cumprod[:-1]])
  sqrt_one_minus_beta = np.sqrt(1.0 - betas)
  sqrt_one_minus_ac = np.sqrt(1.0 - alphas_cumprod)
  arrays = dict(
      betas=betas,
      alphas=1.0 - betas,
      alphas_cumprod=alphas_cumprod,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=sqrt_one_minus_ac,
      ddpm_z_coef=1.0 / sqrt_one_minus_beta,
      ddpm_eps_coef=betas / (sqrt_one_minus_ac * sqrt_one_minus_beta),
      sqrt_betas=np.sqrt(betas),
      posterior_variance=betas * (1.0 - ac_prev) / (1.0 - alphas_cumprod),
  )
  return Schedule(**{k: jnp.asarray(v.astype(np.float32)) for k, v in arrays.items()})


def cosine_schedule(num_steps: int = 1000) -> Schedule:
  """Nichol & Dhariwal (2021)'s cosine schedule (s = 0.008, betas clipped at 0.999)."""
  if num_steps < 2:
    raise ValueError(f"num_steps must be at least 2, got {num_steps}")
  t = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
  return _schedule_from_betas64(_betas_from_alpha_bar(cosine_alpha_bar(t)))


def sigmoid_schedule(num_steps: int = 1000) -> Schedule:
  """Chen (2023)'s sigmoid schedule (start -3, end 3, tau 1, clip_min 1e-9): alphas_cumprod
  from :func:`sigmoid_alpha_bar` at ``t = (i + 1) / T``, betas from their ratios, clipped
  at 0.999."""
  if num_steps < 2:
    raise ValueError(f"num_steps must be at least 2, got {num_steps}")
  t = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
  return _schedule_from_betas64(_betas_from_alpha_bar(sigmoid_alpha_bar(t)))


def build_schedule(kind: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> Schedule:
  """The schedule a config's ``schedule`` section names: ``build_schedule(**config.schedule)``.

  ``kind='linear'`` is :func:`linear_schedule`, bit for bit (the original's); ``beta_start``
  and ``beta_end`` apply to it only. A stored config without ``kind`` means linear.
  """
  if kind == "linear":
    return linear_schedule(num_steps, beta_start, beta_end)
  if kind == "cosine":
    return cosine_schedule(num_steps)
  if kind == "sigmoid":
    return sigmoid_schedule(num_steps)
  raise ValueError(f"schedule kind must be one of {', '.join(SCHEDULE_KINDS)}, got {kind!r}")
