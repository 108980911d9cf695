"""Autoguidance (``sampling.Autoguided``): the output is ``out_guide + w (out - out_guide)``
at the steps ``t >= min_t`` and the model's own below; ``w = 1`` gives the unguided samples
bit for bit and a guide equal to the model within rounding; one DDIM update applies the
guided output."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import sampling
from ddpm_jax.schedule import linear_schedule


def _toy_apply(variables, z, t, train=False):
  """A "model" cheap to compile whose output depends on its params, z and t."""
  del train
  p = variables["params"]
  return p["a"] * z + p["b"] * (t[:, None, None, None] / 1000.0)


PARAMS = {"a": jnp.float32(0.3), "b": jnp.float32(0.7)}
GUIDE = {"a": jnp.float32(0.1), "b": jnp.float32(-0.4)}


def test_the_output_is_the_guide_plus_w_times_the_difference():
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([10, 900], jnp.int32)
  out = _toy_apply({"params": PARAMS}, z, t)
  guide = _toy_apply({"params": GUIDE}, z, t)
  guided = sampling.Autoguided(_toy_apply, 2.5)({"params": (PARAMS, GUIDE)}, z, t)
  np.testing.assert_allclose(guided, guide + 2.5 * (out - guide), rtol=1e-6, atol=1e-6)
  assert guided.dtype == jnp.float32
  np.testing.assert_array_equal(
      sampling.Autoguided(_toy_apply, 1.0)({"params": (PARAMS, GUIDE)}, z, t), out)
  np.testing.assert_array_equal(
      sampling.Autoguided(_toy_apply, 0.0)({"params": (PARAMS, GUIDE)}, z, t), guide)
  # Guided from t = 500 on: the first example (t = 10) is the model's own output.
  limited = sampling.Autoguided(_toy_apply, 2.5, 500)({"params": (PARAMS, GUIDE)}, z, t)
  np.testing.assert_array_equal(limited[0], out[0])
  # Compiled inside lax.cond, the combination may round as XLA fuses it.
  np.testing.assert_allclose(limited[1], guided[1], rtol=1e-6, atol=1e-6)
  # Equal by value, so a jitted sampler compiles once for every batch.
  assert sampling.Autoguided(_toy_apply, 2.5) == sampling.Autoguided(_toy_apply, 2.5)
  assert hash(sampling.Autoguided(_toy_apply, 2.5)) == hash(
      sampling.Autoguided(_toy_apply, 2.5))


def test_the_guide_runs_only_where_some_example_is_guided():
  """With ``min_t``, a batch all below it costs the model's forward pass alone: the
  guide's is skipped, not computed and discarded. Counted by a callback in the model."""
  calls = []

  def counted(variables, z, t, train=False):
    jax.debug.callback(lambda: calls.append(1))
    return _toy_apply(variables, z, t, train)

  apply = jax.jit(sampling.Autoguided(counted, 2.5, 500))
  z = jnp.ones((2, 4, 4, 1))
  for t, forward_passes in (([10, 20], 1), ([10, 900], 2), ([600, 900], 2)):
    calls.clear()
    jax.block_until_ready(apply({"params": (PARAMS, GUIDE)}, z, jnp.array(t, jnp.int32)))
    assert len(calls) == forward_passes, (t, calls)


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_each_sampler_unguided_at_w_one_or_with_the_model_as_its_own_guide(sampler):
  """A whole run of each sampler: ``w = 1`` is the unguided run bit for bit, a guide equal
  to the model at ``w = 3`` is it within rounding; another guide at ``w = 3`` moves the
  samples."""
  schedule = linear_schedule()
  rng, shape = jax.random.key(4), (2, 8, 8, 1)
  run = {"ddpm": functools.partial(sampling.ddpm_sample, snapshot_times=()),
         "ddim": functools.partial(sampling.ddim_sample, num_steps=5, eta=1.0),
         "dpmpp2m": functools.partial(sampling.dpmpp2m_sample, num_steps=5)}[sampler]
  plain = run(_toy_apply, PARAMS, schedule, rng, shape)[0]
  np.testing.assert_array_equal(
      run(sampling.Autoguided(_toy_apply, 1.0), (PARAMS, GUIDE), schedule, rng, shape)[0],
      plain)
  # XLA may reassociate the combination, so equal outputs meet within float rounding.
  np.testing.assert_allclose(
      run(sampling.Autoguided(_toy_apply, 3.0), (PARAMS, PARAMS), schedule, rng, shape)[0],
      plain, rtol=1e-5, atol=1e-5)
  guided = run(sampling.Autoguided(_toy_apply, 3.0), (PARAMS, GUIDE), schedule, rng, shape)[0]
  assert np.isfinite(np.asarray(guided)).all()
  assert np.abs(np.asarray(guided - plain)).max() > 1e-3


def test_one_ddim_step_applies_the_autoguided_output():
  """One DDIM update from z_T to x0 reads ``eps_guide + w (eps - eps_guide)``."""
  schedule = linear_schedule()
  z = jax.random.normal(jax.random.key(5), (2, 8, 8, 1))
  noise = jnp.zeros((1,) + z.shape)
  x, _ = sampling.ddim_sample_from(sampling.Autoguided(_toy_apply, 2.5), (PARAMS, GUIDE),
                                   schedule, z, noise, 1, snapshot_times=())
  t = jnp.full((2,), 999, jnp.int32)
  out = _toy_apply({"params": PARAMS}, z, t)
  guide = _toy_apply({"params": GUIDE}, z, t)
  eps = guide + 2.5 * (out - guide)
  a = schedule.alphas_cumprod[999]
  np.testing.assert_allclose(x, (z - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a), rtol=1e-5,
                             atol=1e-5)
