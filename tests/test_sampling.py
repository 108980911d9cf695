"""The samplers: DDPM step for step against the original's, DDIM in closed form, the strip
frames, reproducibility and sharding."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_torch as R
from ddpm_jax import sampling
from ddpm_jax.convert import torch_to_flax
from ddpm_jax.model import UNet, sinusoidal_embeddings
from ddpm_jax.schedule import linear_schedule
from tests.conftest import QUARTER, nchw_to_nhwc, randomize_norms, reference_kwargs

SHAPE = (2, 32, 32, 1)
SCHEDULE = linear_schedule()


@pytest.fixture
def one_torch_thread():
  """One torch thread: on 2 busy cores, 2 threads made a small forward pass 18x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _nhwc(x) -> np.ndarray:
  return nchw_to_nhwc(x.numpy() if isinstance(x, torch.Tensor) else x)


def _linear_eps(c: float):
  """A model whose noise estimate is ``c * z``, called like ``UNet.apply``."""
  def apply_fn(variables, z, t, train):
    del variables, t, train
    return c * z
  return apply_fn


def _point_mass_eps(value: float):
  """The exact noise estimate when every training image is the constant ``value``."""
  def apply_fn(variables, z, t, train):
    del variables, train
    a = SCHEDULE.alphas_cumprod[t][:, None, None, None]
    return (z - jnp.sqrt(a) * value) / jnp.sqrt(1 - a)
  return apply_fn


# A t-dependent toy model shared by both sides, so that an off-by-one step shows.
_WAVE = (0.5 * np.cos(np.arange(1000) / 37.0)).astype(np.float32)


def _wave_eps_jax(variables, z, t, train):
  del variables, train
  return jnp.asarray(_WAVE)[t][:, None, None, None] * z


def _wave_eps_torch(z, t):
  return torch.from_numpy(_WAVE)[t].view(-1, 1, 1, 1) * z


def _inputs(num_train_steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((SHAPE[0], 1, 32, 32)).astype(np.float32)
  noise = rng.standard_normal((num_train_steps, SHAPE[0], 1, 32, 32)).astype(np.float32)
  return z, noise


def _max_errors(x, frames, x_ref, frames_ref):
  assert frames.shape[0] == len(frames_ref)
  frame_errors = [float(np.abs(np.asarray(f) - _nhwc(fr)).max())
                  for f, fr in zip(frames, frames_ref)]
  return float(np.abs(np.asarray(x) - _nhwc(x_ref)).max()), frame_errors


def test_ddpm_matches_the_original_sampler_with_a_unet(one_torch_thread):
  """A QUARTER UNET with time_steps=50 and a 50-step schedule: same z_T, same noise."""
  T = 50
  times = (0, 3, 10, 20, 35, 49)
  torch.manual_seed(0)
  ref = randomize_norms(R.UNET(**reference_kwargs(QUARTER), time_steps=T)).eval()
  model = UNet(**QUARTER, time_steps=T)
  ref.embeddings.embeddings = torch.from_numpy(sinusoidal_embeddings(T, max(model.channels)))
  params = torch_to_flax(ref.state_dict(), model)
  z, noise = _inputs(T)
  x_ref, frames_ref = R.sample(ref, R.DDPM_Scheduler(T), torch.from_numpy(z),
                               torch.from_numpy(noise), times)
  x, frames = sampling.ddpm_sample_from(model.apply, params, linear_schedule(T),
                                        jnp.asarray(_nhwc(z)),
                                        jnp.asarray(noise.transpose(0, 1, 3, 4, 2)), times)
  err, frame_errors = _max_errors(x, frames, x_ref, frames_ref)
  scale = float(np.abs(x_ref.numpy()).max())
  # Measured: 4.3e-6 at output scale 6.7 (frames 2.4e-7 .. 4.3e-6).
  assert err <= 1e-5 * scale, (err, scale)
  assert max(frame_errors) <= 1e-5 * scale, frame_errors


def test_ddpm_matches_the_original_over_1000_steps_with_its_strip():
  """The real schedule and the original's 10 strip times, with a cheap t-dependent model."""
  z, noise = _inputs(1000, seed=1)
  x_ref, frames_ref = R.sample(_wave_eps_torch, R.DDPM_Scheduler(1000), torch.from_numpy(z),
                               torch.from_numpy(noise))
  x, frames = sampling.ddpm_sample_from(_wave_eps_jax, {}, SCHEDULE, jnp.asarray(_nhwc(z)),
                                        jnp.asarray(noise.transpose(0, 1, 3, 4, 2)))
  assert frames.shape == (10,) + SHAPE and len(frames_ref) == 10
  np.testing.assert_array_equal(frames[-1], x)  # The frame at t = 0 is the final image.
  err, frame_errors = _max_errors(x, frames, x_ref, frames_ref)
  scale = float(np.abs(x_ref.numpy()).max())
  # Measured: 5.3e-3 at output scale 627 (8.5e-6 relative: the schedules are bit-identical,
  # but this toy model makes z grow over 1000 steps of float32 arithmetic done in another
  # order). An off-by-one step would move the toy's factor by ~3% per step.
  assert err <= 3e-5 * scale, (err, scale)
  assert max(frame_errors) <= 3e-5 * scale, frame_errors


def test_frame_and_strip_times():
  assert sampling.frame_times(sampling.REVERSE_TIMES) == (999, 700, 550, 400, 300, 200, 100,
                                                          50, 15, 0)
  assert sampling.strip_times(1000) == sampling.frame_times(sampling.REVERSE_TIMES)
  assert sampling.strip_times(100) == (99, 69, 55, 40, 30, 20, 10, 5, 1, 0)
  with pytest.raises(ValueError, match="snapshot times"):
    sampling.ddpm_sample(_linear_eps(0.0), {}, linear_schedule(50), jax.random.key(0), SHAPE)


def test_ddim_timesteps():
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 1000), np.arange(999, -1, -1))
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 1), [999])
  np.testing.assert_array_equal(sampling.ddim_timesteps(1000, 2), [999, 0])
  steps = sampling.ddim_timesteps(1000, 50)
  assert steps[0] == 999 and steps[-1] == 0 and len(steps) == 50
  assert set(-np.diff(steps)) <= {20, 21}
  np.testing.assert_array_equal(steps[:4], [999, 979, 958, 938])
  for bad in (0, 1001):
    with pytest.raises(ValueError, match="num_steps"):
      sampling.ddim_timesteps(1000, bad)


@pytest.mark.parametrize("num_steps", [1, 7, 50])
def test_ddim_eta0_in_closed_form(num_steps):
  """With eps = c z, each DDIM step multiplies z by a known factor (float64 here)."""
  c = 0.7
  steps = sampling.ddim_timesteps(1000, num_steps)
  a = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[steps]
  a_prev = np.append(a[1:], 1.0)
  factors = np.sqrt(a_prev / a) * (1 - np.sqrt(1 - a) * c) + np.sqrt(1 - a_prev) * c
  cumulative = np.cumprod(factors)
  z, _ = _inputs(1)
  z = _nhwc(z)
  noise = np.random.default_rng(2).standard_normal((num_steps,) + SHAPE).astype(np.float32)
  x, frames = sampling.ddim_sample_from(_linear_eps(c), {}, SCHEDULE, jnp.asarray(z),
                                        jnp.asarray(noise), num_steps, 0.0)
  np.testing.assert_allclose(x, cumulative[-1] * z, rtol=1e-5, atol=1e-6)
  for frame, time in zip(frames, sampling.frame_times(sampling.REVERSE_TIMES)):
    nearest = np.abs(steps - time).argmin()
    np.testing.assert_allclose(frame, cumulative[nearest] * z, rtol=1e-5, atol=1e-6)


def test_ddim_eta0_ignores_the_noise_and_eta1_does_not():
  z = jnp.asarray(_nhwc(_inputs(1)[0]))
  noises = [jax.random.normal(jax.random.key(i), (10,) + SHAPE) for i in range(2)]
  run = lambda noise, eta: sampling.ddim_sample_from(_wave_eps_jax, {}, SCHEDULE, z, noise,
                                                     10, eta)[0]
  np.testing.assert_array_equal(run(noises[0], 0.0), run(noises[1], 0.0))
  assert not np.allclose(run(noises[0], 1.0), run(noises[1], 1.0))


def test_ddim_with_every_step_and_eta1_is_ddpm_with_the_posterior_variance():
  b = np.asarray(SCHEDULE.betas, np.float64)
  ac = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
  posterior = np.append(0.0, b[1:] * (1 - ac[:-1]) / (1 - ac[1:]))  # In step order 0..T-1.
  sigma = np.asarray(sampling.ddim_sigmas(SCHEDULE, 1000, 1.0))[::-1]
  # Float32 1 - ac cancels near t = 0 (5e-4 at t = 4): measured 4.9e-4 relative there.
  np.testing.assert_allclose(sigma ** 2, posterior, rtol=1e-3, atol=1e-12)
  np.testing.assert_array_equal(sampling.ddim_sigmas(SCHEDULE, 1000, 0.0), 0.0)
  # Its mean is the original's DDPM mean: with the noise off, the two agree step for step.
  z = jnp.asarray(_nhwc(_inputs(1, seed=3)[0]))
  zeros = jnp.zeros((1000,) + SHAPE)
  x_ddim, frames_ddim = sampling.ddim_sample_from(_wave_eps_jax, {}, SCHEDULE, z, zeros,
                                                  1000, 1.0)
  x_ddpm, frames_ddpm = sampling.ddpm_sample_from(_wave_eps_jax, {}, SCHEDULE, z, zeros)
  np.testing.assert_allclose(frames_ddim, frames_ddpm, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x_ddim, x_ddpm, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler,num_steps,eta", [("ddpm", 1000, 0.0), ("ddim", 10, 0.0),
                                                   ("ddim", 10, 1.0)])
def test_samplers_recover_a_point_mass(sampler, num_steps, eta):
  """With the exact noise estimate for data that is always 0.5, every sampler returns 0.5."""
  rng = jax.random.key(3)
  if sampler == "ddpm":
    x, frames = sampling.ddpm_sample(_point_mass_eps(0.5), {}, SCHEDULE, rng, SHAPE)
  else:
    x, frames = sampling.ddim_sample(_point_mass_eps(0.5), {}, SCHEDULE, rng, SHAPE,
                                     num_steps, eta)
  assert x.dtype == jnp.float32 and frames.shape == (10,) + SHAPE
  assert np.abs(np.asarray(x) - 0.5).max() <= 1e-3
  assert np.abs(np.asarray(frames[0])).max() > 1.0  # Still mostly noise at t = 999.


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_clip_x0_keeps_predictions_in_the_data_range(eta):
  """Data that is always 2.0 lies outside [0, 1]: clipping each predicted x0 gives 1.0."""
  rng = jax.random.key(4)
  free, _ = sampling.ddim_sample(_point_mass_eps(2.0), {}, SCHEDULE, rng, SHAPE, 10, eta)
  clipped, _ = sampling.ddim_sample(_point_mass_eps(2.0), {}, SCHEDULE, rng, SHAPE, 10, eta,
                                    clip_x0=(0.0, 1.0))
  assert np.abs(np.asarray(free) - 2.0).max() <= 1e-3
  np.testing.assert_allclose(clipped, 1.0, atol=1e-5)


def test_same_seed_same_images_and_batches_do_not_matter():
  f = _wave_eps_jax
  x0, frames0 = sampling.ddpm_sample(f, {}, SCHEDULE, jax.random.key(0), (4, 32, 32, 1))
  x1, frames1 = sampling.ddpm_sample(f, {}, SCHEDULE, jax.random.key(0), (4, 32, 32, 1))
  np.testing.assert_array_equal(x0, x1)
  np.testing.assert_array_equal(frames0, frames1)
  x2, _ = sampling.ddpm_sample(f, {}, SCHEDULE, jax.random.key(1), (4, 32, 32, 1))
  assert not np.allclose(x0, x2)
  # Sample i depends on (seed, i) only: two batches of 2 give the batch of 4.
  halves = [sampling.ddpm_sample(f, {}, SCHEDULE, jax.random.key(0), SHAPE, first_index=i)[0]
            for i in (0, 2)]
  np.testing.assert_allclose(np.concatenate(halves), x0, rtol=1e-6, atol=1e-6)


def test_chunk_length():
  assert [sampling.chunk_length(n) for n in (1000, 250, 50, 21, 20, 10, 1)] == \
      [50, 25, 5, 3, 1, 1, 1]
  assert sampling.chunk_length(997) == 997  # A prime: one chunk.
  assert sampling.chunk_length(120, max_chunks=7) == 20


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_progress_runs_the_same_scan_in_chunks(sampler):
  """With ``progress`` the batch runs as equal chunks, reports each, and gives the same bits."""
  schedule = linear_schedule(100)
  if sampler == "ddpm":
    run = lambda **kw: sampling.ddpm_sample(_wave_eps_jax, {}, schedule, jax.random.key(3),
                                            (3, 32, 32, 1), (0, 7, 50, 99), **kw)
  else:
    run = lambda **kw: sampling.ddim_sample(_wave_eps_jax, {}, schedule, jax.random.key(3),
                                            (3, 32, 32, 1), 30, 0.5, (0, 7, 50, 99),
                                            clip_x0=(0.0, 1.0), **kw)
  x, frames = run()
  reports = []
  x_chunked, frames_chunked = run(progress=reports.append)
  assert reports == ([5] * 20 if sampler == "ddpm" else [2] * 15)
  np.testing.assert_array_equal(x_chunked, x)
  np.testing.assert_array_equal(frames_chunked, frames)
  assert frames.shape == (4, 3, 32, 32, 1)
  assert np.abs(frames).reshape(4, -1).max(axis=1).min() > 0  # Every frame was written.


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_chunks_compile_once_with_committed_params(sampler):
  """Params restored from a checkpoint are committed to a device, so every chunk's output
  is: the first chunk's carry is put there too, or the chunk would compile twice."""
  params = jax.device_put({"w": jnp.float32(0.5)}, jax.local_devices()[0])
  f = lambda variables, z, t, train: variables["params"]["w"] * z
  run = {"ddim": lambda: sampling.ddim_sample(f, params, SCHEDULE, jax.random.key(0),
                                              (2, 8, 8, 1), 6, progress=lambda n: None),
         "dpmpp2m": lambda: sampling.dpmpp2m_sample(f, params, SCHEDULE, jax.random.key(0),
                                                    (2, 8, 8, 1), 6, progress=lambda n: None)}
  before = sampling._advance._cache_size()  # pylint: disable=protected-access
  run[sampler]()
  assert sampling._advance._cache_size() == before + 1  # pylint: disable=protected-access


_SHARDED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from ddpm_jax import sampling
from ddpm_jax.schedule import linear_schedule
wave = jnp.asarray(0.5 * np.cos(np.arange(1000) / 37.0), jnp.float32)
_wave_eps_jax = lambda variables, z, t, train: wave[t][:, None, None, None] * z
out = {"devices": jax.local_device_count()}
for batch in (4, 3):
  x, frames = sampling.ddim_sample(_wave_eps_jax, {}, linear_schedule(), jax.random.key(5),
                                   (batch, 32, 32, 1), 20, 1.0)
  chunked, _ = sampling.ddim_sample(_wave_eps_jax, {}, linear_schedule(), jax.random.key(5),
                                    (batch, 32, 32, 1), 20, 1.0, progress=lambda n: None)
  out[batch] = {"devices": len(x.sharding.device_set), "x": np.asarray(x).tolist(),
                "chunked_devices": len(chunked.sharding.device_set),
                "chunked_equal": bool(np.array_equal(x, chunked))}
json.dump(out, sys.stdout)
"""


def test_batch_is_sharded_over_local_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
                        check=False)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  assert out["devices"] == 2
  assert out["4"]["devices"] == 2  # Sharded over both.
  assert out["3"]["devices"] == 1  # 2 does not divide 3: one device.
  for batch in ("4", "3"):  # Run in chunks, the same placement and the same bits.
    assert out[batch]["chunked_devices"] == out[batch]["devices"]
    assert out[batch]["chunked_equal"]
  x, _ = sampling.ddim_sample(_wave_eps_jax, {}, SCHEDULE, jax.random.key(5), (4, 32, 32, 1),
                              20, 1.0)
  np.testing.assert_allclose(out["4"]["x"], x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["3"]["x"], x[:3], rtol=1e-6, atol=1e-6)


def test_invalid_arguments():
  with pytest.raises(ValueError, match="eta"):
    sampling.ddim_sample(_linear_eps(0.0), {}, SCHEDULE, jax.random.key(0), SHAPE, 10, 1.5)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.ddim_sample(_linear_eps(0.0), {}, SCHEDULE, jax.random.key(0), SHAPE, 1001)
