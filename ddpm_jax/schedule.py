"""The linear beta schedule and every per-step coefficient sampling needs, computed once."""

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
