"""Recipe options beyond the original, against closed forms: the x0 and v objectives, Min-SNR
weighting, the cosine and sigmoid schedules, and DPM-Solver++(2M) on Gaussian toy data whose
exact denoiser and probability-flow solution are known."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddpm_jax import diffusion, sampling
from ddpm_jax.config_checks import check_resume_compatible, validate_config
from ddpm_jax.config_defaults import base_config
from ddpm_jax.errors import UserError
from ddpm_jax.schedule import (SCHEDULE_KINDS, build_schedule, cosine_alpha_bar,
                               linear_schedule, sigmoid_alpha_bar)

OBJECTIVES = ("eps", "x0", "v")
SCHEDULES = {kind: build_schedule(kind) for kind in SCHEDULE_KINDS}
TIMES = np.array([0, 1, 10, 100, 250, 500, 750, 900, 998, 999])


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


# --- Schedules ---------------------------------------------------------------------------


def test_linear_kind_is_the_original_schedule_bit_for_bit():
  for kwargs in ({}, dict(num_steps=50), dict(num_steps=200, beta_start=1e-3, beta_end=0.05)):
    ours, original = build_schedule("linear", **kwargs), linear_schedule(**kwargs)
    for field in ours.__dataclass_fields__:
      np.testing.assert_array_equal(getattr(ours, field), getattr(original, field), field)
  # A config's schedule section, with or without `kind` (a config saved before it existed).
  config = base_config()
  np.testing.assert_array_equal(build_schedule(**config.schedule).alphas_cumprod,
                                linear_schedule().alphas_cumprod)
  del config.schedule["kind"]
  np.testing.assert_array_equal(build_schedule(**config.schedule).betas, linear_schedule().betas)
  with pytest.raises(ValueError, match="schedule kind must be one of linear, cosine, sigmoid"):
    build_schedule("quadratic")


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_schedule_endpoints_monotonicity_and_coefficients(kind):
  s = SCHEDULES[kind]
  ac, betas = _f64(s.alphas_cumprod), _f64(s.betas)
  assert s.num_steps == 1000 and ac.dtype == np.float64
  assert np.all(np.diff(ac) < 0) and np.all(betas > 0) and np.all(betas <= 0.999 + 1e-7)
  assert 0.999 < ac[0] < 1 and 0 < ac[-1] < 1e-4
  # The coefficients are those of the float32 alphas_cumprod, as the loss sees it.
  ac_prev = np.append(1.0, ac[:-1])
  np.testing.assert_allclose(s.alphas, 1 - betas, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(ac), rtol=1e-6)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ac), rtol=2e-6)
  np.testing.assert_allclose(s.sqrt_betas, np.sqrt(betas), rtol=1e-6)
  alphas = _f64(s.alphas)  # 1 - beta, without float32 beta's rounding near beta = 0.999.
  np.testing.assert_allclose(s.ddpm_z_coef, 1 / np.sqrt(alphas), rtol=1e-6)
  np.testing.assert_allclose(s.ddpm_eps_coef, betas / np.sqrt((1 - ac) * alphas),
                             rtol=2e-5)  # float32 1 - ac near t = 0 (linear).
  np.testing.assert_allclose(s.posterior_variance, betas * (1 - ac_prev) / (1 - ac), rtol=1e-3,
                             atol=1e-12)
  # 1 - beta_t is the ratio of consecutive alphas_cumprod.
  np.testing.assert_allclose(ac[1:] / ac[:-1], alphas[1:], rtol=1e-6)


def test_cosine_and_sigmoid_follow_their_formulas():
  t = (TIMES + 1) / 1000
  f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # Nichol & Dhariwal, s = 0.008.
  np.testing.assert_allclose(cosine_alpha_bar(t), f(t) / f(0), rtol=1e-12)
  sig = lambda x: 1 / (1 + np.exp(-x))  # Chen (2023): start -3, end 3, tau 1.
  np.testing.assert_allclose(sigmoid_alpha_bar(t),
                             np.maximum((sig(3) - sig(6 * t - 3)) / (sig(3) - sig(-3)), 1e-9),
                             rtol=1e-12)
  assert sigmoid_alpha_bar(1.0) == 1e-9 and sigmoid_alpha_bar(0.0) == 1.0
  for kind, alpha_bar in (("cosine", f(t) / f(0)), ("sigmoid", sigmoid_alpha_bar(t))):
    ac = _f64(SCHEDULES[kind].alphas_cumprod)[TIMES]
    # Every step but the last, whose beta the clip at 0.999 changes.
    np.testing.assert_allclose(ac[:-1], alpha_bar[:-1], rtol=1e-6)
    np.testing.assert_allclose(ac[-1], alpha_bar[-2] * (1 - 0.999), rtol=1e-5)
    assert float(SCHEDULES[kind].betas[-1]) == np.float32(0.999)


# --- Objectives and their conversions ----------------------------------------------------


def _draws(shape=(len(TIMES), 4, 4, 1), seed=0):
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1, 1, shape).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_conversions_are_exact_inverses(kind, objective):
  """target -> (x0, eps) gives back x0 and eps; (x0, eps) of any output gives it back."""
  s, t = SCHEDULES[kind], jnp.asarray(TIMES)
  x0, eps = _draws()
  z = diffusion.q_sample(s, x0, t, eps)
  ac = _f64(s.alphas_cumprod)[TIMES][:, None, None, None]
  alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
  # Float32 rounding, amplified by the 1 / alpha or 1 / sigma a conversion divides by.
  amplification = {"eps": 1 / alpha, "x0": 1 / sigma, "v": np.ones_like(alpha)}[objective]
  atol = 4e-7 * (1 + amplification) * 4

  target = diffusion.objective_target(s, x0, eps, t, objective)
  want = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[objective]
  np.testing.assert_allclose(target, want, atol=1e-6)
  x0_back, eps_back = diffusion.model_output_to_x0_eps(s, z, t, target, objective)
  np.testing.assert_allclose(x0_back, x0, rtol=0, atol=np.broadcast_to(atol, x0.shape).max())
  np.testing.assert_allclose(eps_back, eps, rtol=0, atol=np.broadcast_to(atol, x0.shape).max())

  out = _draws(seed=1)[1]  # Any output: its (x0, eps) lie on z and map back to it.
  x0_hat, eps_hat = diffusion.model_output_to_x0_eps(s, z, t, out, objective)
  np.testing.assert_allclose(diffusion.q_sample(s, x0_hat, t, eps_hat), z, atol=2e-6)
  np.testing.assert_allclose(diffusion.objective_target(s, x0_hat, eps_hat, t, objective), out,
                             atol=np.broadcast_to(atol, x0.shape).max())


@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_follow_the_formula(gamma):
  s = SCHEDULES["cosine"]
  ac = _f64(s.alphas_cumprod)[TIMES]
  snr = ac / (1 - ac)
  want = {"eps": np.minimum(snr, gamma) / snr, "x0": np.minimum(snr, gamma),
          "v": np.minimum(snr, gamma) / (snr + 1)}
  for objective in OBJECTIVES:
    got = diffusion.min_snr_weight(s, jnp.asarray(TIMES), objective, gamma)
    np.testing.assert_allclose(got, want[objective], rtol=2e-6, err_msg=objective)
  # Linear at t = 0: a = 1 - 1e-4 in float32, snr = a / (1 - a) ~ 9998, and the eps
  # weight is gamma / snr.
  a = float(np.float32(1 - 1e-4))
  got = diffusion.min_snr_weight(SCHEDULES["linear"], jnp.array([0]), "eps", gamma)
  np.testing.assert_allclose(got, [gamma * (1 - a) / a], rtol=1e-6)


def _affine_model(variables, x, t, train=False, rngs=None):
  """A cheap model with parameters: ``w * x + b_t``."""
  del train, rngs
  p = variables["params"]
  return p["w"] * x + 0.1 * jnp.cos(t.astype(jnp.float32) / 50.0)[:, None, None, None]


def test_the_default_loss_is_the_original_bit_for_bit():
  """Same t, noise and dropout key from ``rng``, and the same float operations."""
  s, params = SCHEDULES["linear"], {"w": jnp.float32(0.8)}
  x0 = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
  rng = jax.random.key(2)

  def original(p, x, r):  # The loss as the original defines it.
    t_rng, noise_rng, dropout_rng = jax.random.split(r, 3)
    t = jax.random.randint(t_rng, (x.shape[0],), 0, s.num_steps)
    noise = jax.random.normal(noise_rng, x.shape, jnp.float32)
    return diffusion.noise_loss(p, _affine_model, s, x, t, noise, dropout_rng)

  grad = lambda f: jax.jit(jax.value_and_grad(f))(params, x0, rng)
  want = grad(original)
  got = grad(lambda p, x, r: diffusion.loss(p, _affine_model, s, x, r))
  explicit = grad(lambda p, x, r: diffusion.loss(p, _affine_model, s, x, r, objective="eps",
                                                 loss_weighting="none", min_snr_gamma=5.0))
  for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_loss_options_in_closed_form(objective, weighting):
  """The loss's t and noise are the original's draws; the rest follows the formulas."""
  s, params = SCHEDULES["sigmoid"], {"w": jnp.float32(0.3)}
  x0 = np.asarray(jax.random.uniform(jax.random.key(1), (8, 4, 4, 1)), np.float64)
  rng = jax.random.key(3)
  t_rng, noise_rng, _ = jax.random.split(rng, 3)
  t = np.asarray(jax.random.randint(t_rng, (8,), 0, 1000))
  noise = np.asarray(jax.random.normal(noise_rng, x0.shape, jnp.float32), np.float64)
  ac = _f64(s.alphas_cumprod)[t][:, None, None, None]
  z = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise
  pred = 0.3 * z + 0.1 * np.cos(t / 50.0)[:, None, None, None]
  target = {"eps": noise, "x0": x0, "v": np.sqrt(ac) * noise - np.sqrt(1 - ac) * x0}[objective]
  per_example = np.mean((pred - target) ** 2, axis=(1, 2, 3))
  snr = ac[:, 0, 0, 0] / (1 - ac[:, 0, 0, 0])
  weight = {"none": np.ones_like(snr), "min_snr": {
      "eps": np.minimum(snr, 2.0) / snr, "x0": np.minimum(snr, 2.0),
      "v": np.minimum(snr, 2.0) / (snr + 1)}[objective]}[weighting]
  loss_fn = functools.partial(diffusion.loss, objective=objective, loss_weighting=weighting,
                              min_snr_gamma=2.0)
  loss, grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(
      params, _affine_model, s, jnp.asarray(x0, jnp.float32), rng)
  want = np.mean(weight * per_example)
  np.testing.assert_allclose(loss, want, rtol=2e-5)
  dloss_dw = np.mean(weight * np.mean(2 * (pred - target) * z, axis=(1, 2, 3)))
  np.testing.assert_allclose(grads["w"], dloss_dw, rtol=2e-4)


def test_min_snr_weights_make_the_objectives_one_loss():
  """One estimate of x0, written as each objective's output: Min-SNR weights each
  objective's MSE so that the three losses are the same number (the x0 MSE times
  min(snr, gamma)), which is how the weights are derived."""
  s = SCHEDULES["linear"]
  t = jnp.asarray(TIMES[:-2])  # Where eps's 1 / alpha leaves float32 precision to spare.
  x0, noise = _draws((len(t), 4, 4, 1))
  z = diffusion.q_sample(s, x0, t, noise)
  x0_hat = x0 + 0.05 * _draws((len(t), 4, 4, 1), seed=2)[1]
  ac = s.alphas_cumprod[t][:, None, None, None]
  eps_hat = (z - jnp.sqrt(ac) * x0_hat) / jnp.sqrt(1 - ac)
  losses = []
  for objective in OBJECTIVES:
    out = diffusion.objective_target(s, x0_hat, eps_hat, t, objective)
    model = lambda variables, x, tt, train=False, out=out: out
    losses.append(diffusion.objective_loss({}, model, s, x0, t, noise, objective=objective,
                                           loss_weighting="min_snr", min_snr_gamma=5.0))
  np.testing.assert_allclose(losses, losses[1], rtol=1e-3)


# --- Configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("objective", "noise", "objective must be one of eps, x0, v; got 'noise'"),
    ("loss_weighting", "snr", "loss_weighting must be one of none, min_snr; got 'snr'"),
    ("min_snr_gamma", 0.0, "min_snr_gamma must be a finite number > 0, got 0.0"),
    ("min_snr_gamma", float("nan"), "min_snr_gamma must be a finite number > 0, got nan"),
    ("schedule.kind", "quadratic",
     "schedule.kind must be one of linear, cosine, sigmoid; got 'quadratic'"),
    ("ema_warmup", 1, "ema_warmup must be True or False, got 1"),
])
def test_bad_recipe_values_are_one_line_errors(key, value, message):
  d = base_config().to_dict()  # A dict: ConfigDict's type checks would refuse some values.
  *parents, leaf = key.split(".")
  node = d
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  config = ml_collections.ConfigDict(d)
  with pytest.raises(UserError) as info:
    validate_config(config)
  assert str(info.value) == message


def test_recipe_values_pass_and_betas_apply_to_linear_only():
  config = base_config()
  config.objective, config.loss_weighting, config.min_snr_gamma = "v", "min_snr", 1
  config.ema_warmup = True
  config.schedule.kind, config.schedule.beta_start = "cosine", 0.5  # Ignored by cosine.
  validate_config(config)


def _stored(config: ml_collections.ConfigDict, *missing: str) -> ml_collections.ConfigDict:
  """``config`` as a config.json written before the ``missing`` keys existed."""
  d = config.to_dict()
  for key in missing:
    *parents, leaf = key.split(".")
    node = d
    for parent in parents:
      node = node[parent]
    del node[leaf]
  return ml_collections.ConfigDict(d)


def test_resume_refuses_another_objective_or_schedule_and_allows_the_rest():
  old = _stored(base_config(), "objective", "loss_weighting", "min_snr_gamma", "schedule.kind",
                "ema_warmup")
  check_resume_compatible(old, base_config())  # Missing keys are the defaults.
  for key, value in (("loss_weighting", "min_snr"), ("min_snr_gamma", 2.0),
                     ("ema_warmup", True)):
    new = base_config()
    new[key] = value
    check_resume_compatible(old, new)
  for key, value, fix in (("objective", "v", "--config.objective=eps"),
                          ("schedule.kind", "cosine", "--config.schedule.kind=linear")):
    new = base_config()
    *parents, leaf = key.split(".")
    (new[parents[0]] if parents else new)[leaf] = value
    with pytest.raises(UserError, match=f"different {key};.*resume with {fix}"):
      check_resume_compatible(old, new)
    with pytest.raises(UserError, match=f"different {key};"):
      check_resume_compatible(new, base_config())


# --- Samplers ------------------------------------------------------------------------------

MU, STD = 0.3, 0.5  # Toy data: every pixel ~ N(MU, STD^2), independently.


def _exact_output(variables, z, t, objective):
  """The exact denoiser of the toy data: E[x0 | z_t] = MU + alpha STD^2 / (alpha^2 STD^2 +
  sigma^2) (z - alpha MU), written as the ``objective``'s output."""
  p = variables["params"]
  a = p["alphas_cumprod"][t][:, None, None, None]
  alpha, sigma = jnp.sqrt(a), jnp.sqrt(1 - a)
  x0 = MU + alpha * STD**2 / (a * STD**2 + (1 - a)) * (z - alpha * MU)
  eps = (z - alpha * x0) / sigma
  return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[objective]


# One module-level apply function per objective (hashable, so each compiles once).
EXACT = {o: functools.partial(lambda v, z, t, train=False, o=o: _exact_output(v, z, t, o))
         for o in OBJECTIVES}


def _toy_params(schedule):
  return {"alphas_cumprod": schedule.alphas_cumprod}


def _ode_solution(schedule, z_T) -> np.ndarray:
  """The probability-flow ODE's exact map from z at T-1 to z at 0, then the exact denoiser.

  For Gaussian data the ODE keeps ``(z_t - alpha_t MU) / sqrt(alpha_t^2 STD^2 + sigma_t^2)``
  constant (in y = z / alpha and rho = sigma / alpha, ``dy/drho = E[eps | z] = (y - MU) rho /
  (STD^2 + rho^2)``, so ``(y - MU) / sqrt(STD^2 + rho^2)`` is constant): the map is affine.
  Every sampler's last update, at t = 0, is that denoiser, so this is what they converge to.
  """
  ac = _f64(schedule.alphas_cumprod)
  scale = lambda a: np.sqrt(a * STD**2 + 1 - a)
  u = (_f64(z_T) - np.sqrt(ac[-1]) * MU) / scale(ac[-1])
  z_0 = np.sqrt(ac[0]) * MU + scale(ac[0]) * u
  return MU + np.sqrt(ac[0]) * STD**2 / scale(ac[0]) ** 2 * (z_0 - np.sqrt(ac[0]) * MU)


Z_T = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))


def _dpmpp2m(schedule, num_steps, objective="eps", spacing="logsnr", **kwargs):
  return sampling.dpmpp2m_sample_from(EXACT[objective], _toy_params(schedule), schedule, Z_T,
                                      num_steps, objective=objective, spacing=spacing,
                                      **kwargs)


def _ddim(schedule, num_steps, objective="eps"):
  return sampling.ddim_sample_from(EXACT[objective], _toy_params(schedule), schedule, Z_T,
                                   jnp.zeros((num_steps,) + Z_T.shape), num_steps,
                                   objective=objective)


def _error(x, ref) -> float:
  return float(np.abs(_f64(x) - ref).max())


def _dpmpp2m_numpy(schedule, steps, z) -> np.ndarray:
  """DPM-Solver++(2M) as Lu et al. write it (Algorithm 2, lambda, expm1 and r), in float64."""
  ac = _f64(schedule.alphas_cumprod)
  x0_of = lambda x, t: MU + np.sqrt(ac[t]) * STD**2 / (ac[t] * STD**2 + 1 - ac[t]) * (
      x - np.sqrt(ac[t]) * MU)
  alpha, sigma = np.sqrt(ac[steps]), np.sqrt(1 - ac[steps])
  lam = np.log(alpha) - np.log(sigma)
  x, previous, h_previous = _f64(z), None, None
  for i, t in enumerate(steps):
    x0 = x0_of(x, t)
    if i == len(steps) - 1:
      return x0  # Into sigma = 0: first order, the data prediction.
    h = lam[i + 1] - lam[i]
    if previous is None:
      d = x0
    else:
      r = h_previous / h
      d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous
    x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * d
    previous, h_previous = x0, h
  raise AssertionError("no steps")


@pytest.mark.parametrize("kind, spacing, num_steps", [("linear", "time", 3),
                                                      ("cosine", "logsnr", 8),
                                                      ("sigmoid", "logsnr", 15)])
def test_dpmpp2m_is_the_papers_update(kind, spacing, num_steps):
  s = SCHEDULES[kind]
  steps = sampling.dpmpp2m_timesteps(s, num_steps, spacing)
  x, frames = _dpmpp2m(s, num_steps, spacing=spacing)
  np.testing.assert_allclose(x, _dpmpp2m_numpy(s, steps, Z_T), rtol=0, atol=2e-5)
  np.testing.assert_array_equal(frames[-1], x)  # The frame at t = 0 is the final image.


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_dpmpp2m_converges_at_second_order_and_beats_ddim(kind):
  s = SCHEDULES[kind]
  ref = _ode_solution(s, Z_T)
  ks = (20, 40, 80)
  dpm = [_error(_dpmpp2m(s, k)[0], ref) for k in ks]
  ddim = [_error(_ddim(s, k)[0], ref) for k in ks]
  slope = np.polyfit(np.log(ks), np.log(dpm), 1)[0]
  ddim_slope = np.polyfit(np.log(ks), np.log(ddim), 1)[0]
  print(kind, "dpm++", dpm, slope, "ddim", ddim, ddim_slope)
  assert slope <= -1.7, (dpm, slope)
  assert -1.3 <= ddim_slope <= -0.7, (ddim, ddim_slope)  # DDIM is first order.
  assert all(d < 0.5 * e for d, e in zip(dpm, ddim)), (dpm, ddim)
  # Evenly spaced t leaves long last steps in log-SNR: a larger error at the same K.
  time = [_error(_dpmpp2m(s, k, spacing="time")[0], ref) for k in ks[:2]]
  assert all(d < e for d, e in zip(dpm, time)), (dpm, time)


@pytest.mark.parametrize("objective", ["x0", "v"])
def test_every_objective_gives_the_same_samples(objective):
  """The exact predictor written as each objective: every sampler returns the same images."""
  s = SCHEDULES["linear"]
  params = _toy_params(s)
  for kind_of_run in ("dpmpp2m", "ddim", "ddpm"):
    if kind_of_run == "dpmpp2m":
      run = lambda o: _dpmpp2m(s, 20, o)
    elif kind_of_run == "ddim":
      noise = jax.random.normal(jax.random.key(1), (10,) + Z_T.shape)
      run = lambda o: sampling.ddim_sample_from(EXACT[o], params, s, Z_T, noise, 10, 0.5,
                                                clip_x0=(-1.0, 2.0), objective=o)
    else:
      noise = jax.random.normal(jax.random.key(1), (1000,) + Z_T.shape)
      run = lambda o: sampling.ddpm_sample_from(EXACT[o], params, s, Z_T, noise, objective=o)
    (x_eps, frames_eps), (x, frames) = run("eps"), run(objective)
    np.testing.assert_allclose(x, x_eps, rtol=0, atol=1e-4, err_msg=kind_of_run)
    np.testing.assert_allclose(frames, frames_eps, rtol=0, atol=2e-4, err_msg=kind_of_run)
    if kind_of_run != "ddim":  # DDIM-10 with eta = 0.5 is not an exact sampler.
      assert abs(float(jnp.mean(x)) - MU) < 0.1 and abs(float(jnp.std(x)) - STD) < 0.1
  z, t = Z_T, jnp.int32(500)
  eps = sampling.predict_eps(EXACT["eps"], params, z, t)
  np.testing.assert_allclose(sampling.predict_eps(EXACT[objective], params, z, t, s, objective),
                             eps, atol=1e-5)
  x0_hat, eps_hat = sampling.predict_x0_eps(EXACT[objective], params, s, z, t, objective)
  np.testing.assert_allclose(eps_hat, eps, atol=1e-5)
  np.testing.assert_allclose(diffusion.q_sample(s, x0_hat, jnp.full((2,), 500), eps_hat), z,
                             atol=1e-5)
  with pytest.raises(ValueError, match="needs the schedule"):
    sampling.predict_eps(EXACT[objective], params, z, t, objective=objective)


def test_dpmpp2m_with_every_step_is_close_to_ddim_and_first_order_at_the_ends():
  s = SCHEDULES["linear"]
  ref = _ode_solution(s, Z_T)
  x_dpm, frames_dpm = _dpmpp2m(s, 1000)
  x_ddim, frames_ddim = _ddim(s, 1000)
  assert _error(x_dpm, ref) < _error(x_ddim, ref)
  # Both follow the same ODE through the same steps: measured 3.9e-3 apart, DDIM's own
  # first-order error (3.7e-3, against DPM-Solver++'s 1.7e-4) from the last steps, long in
  # log-SNR, on data of standard deviation 0.5.
  np.testing.assert_allclose(x_dpm, x_ddim, rtol=0, atol=6e-3)
  np.testing.assert_allclose(frames_dpm, frames_ddim, rtol=0, atol=6e-3)
  # With two steps both updates are first order: DPM-Solver++(1) is DDIM.
  np.testing.assert_allclose(_dpmpp2m(s, 2, spacing="time")[0], _ddim(s, 2)[0], atol=1e-5)
  np.testing.assert_allclose(_dpmpp2m(s, 1)[0], _ddim(s, 1)[0], atol=1e-5)


def test_dpmpp2m_timesteps():
  for kind, s in SCHEDULES.items():
    for k in (1, 2, 7, 20, 50, 999, 1000):
      for spacing in sampling.SPACINGS:
        steps = sampling.dpmpp2m_timesteps(s, k, spacing)
        assert len(steps) == k and steps[0] == 999 and (k == 1 or steps[-1] == 0), (kind, k)
        assert np.all(np.diff(steps) < 0), (kind, k, spacing)
    np.testing.assert_array_equal(sampling.dpmpp2m_timesteps(s, 50, "time"),
                                  sampling.ddim_timesteps(1000, 50))
    np.testing.assert_array_equal(sampling.dpmpp2m_timesteps(s, 1000, "logsnr"),
                                  np.arange(999, -1, -1))
  # Log-SNR spacing: even steps in lambda, as far as whole steps allow (the last steps,
  # 19 -> 10 -> 4 -> 1 -> 0, are a few whole steps each).
  s = SCHEDULES["linear"]
  ac = _f64(s.alphas_cumprod)
  lam = 0.5 * np.log(ac / (1 - ac))
  h = np.diff(lam[sampling.dpmpp2m_timesteps(s, 20, "logsnr")])
  even = (lam[0] - lam[-1]) / 19
  assert np.all(np.abs(h[:-4] - even) < 0.02 * even), h
  assert np.all(np.abs(h - even) < 0.25 * even), h
  with pytest.raises(ValueError, match="spacing must be one of time, logsnr"):
    sampling.dpmpp2m_timesteps(s, 20, "karras")
  with pytest.raises(ValueError, match="num_steps"):
    sampling.dpmpp2m_timesteps(s, 1001)
  with pytest.raises(ValueError, match="outside jit"):
    jax.jit(lambda sch: sampling.dpmpp2m_timesteps(sch, 20, "logsnr"))(s)


def test_dpmpp2m_sample_draws_z_T_like_the_others_and_runs_in_chunks():
  s = SCHEDULES["cosine"]
  params, shape, rng = _toy_params(s), (3, 8, 8, 1), jax.random.key(7)
  times = (0, 100, 500, 999)
  x, frames = sampling.dpmpp2m_sample(EXACT["v"], params, s, rng, shape, 12, objective="v",
                                      snapshot_times=times)
  reports = []
  x_chunked, frames_chunked = sampling.dpmpp2m_sample(
      EXACT["v"], params, s, rng, shape, 12, objective="v", snapshot_times=times,
      progress=reports.append)
  assert reports == [1] * 12
  np.testing.assert_array_equal(x_chunked, x)
  np.testing.assert_array_equal(frames_chunked, frames)
  assert frames.shape == (4,) + shape
  np.testing.assert_array_equal(frames[-1], x)
  # Its z_T is DDIM's and DDPM's for the same key and index.
  keys = sampling.example_keys(rng, 0, 3)
  z_T = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[0], shape[1:]))(keys)
  from_z, _ = sampling.dpmpp2m_sample_from(EXACT["v"], params, s, z_T, 12, objective="v")
  np.testing.assert_allclose(x, from_z, rtol=1e-6, atol=1e-6)
  # Clipping x0 keeps toy data of mean 0.3 inside [0.25, 0.35].
  clipped, _ = sampling.dpmpp2m_sample(EXACT["v"], params, s, rng, shape, 12, objective="v",
                                       clip_x0=(0.25, 0.35))
  assert float(clipped.min()) >= 0.25 - 1e-6 and float(clipped.max()) <= 0.35 + 1e-6
  with pytest.raises(ValueError, match="objective must be one of eps, x0, v"):
    sampling.dpmpp2m_sample(EXACT["v"], params, s, rng, shape, 12, objective="score")
  assert math.isfinite(float(jnp.sum(x)))
