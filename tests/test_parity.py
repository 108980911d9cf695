"""ddpm_jax against reference_torch: embeddings, schedule, shapes, forward passes, gradients,
the diffusion kernel, one sampling step and one full training step."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import reference_torch as R
from ddpm_jax import diffusion
from ddpm_jax.convert import flax_to_torch, to_torch_checkpoint, torch_to_flax
from ddpm_jax.model import UNet, sinusoidal_embeddings
from ddpm_jax.schedule import linear_schedule
from ddpm_jax.train_state import apply_gradients, initial_state, make_optimizer
from tests.conftest import (HALF, QUARTER, nchw_to_nhwc, nhwc_to_nchw, randomize_norms,
                            reference_kwargs)

DEFAULT = {}
ARCHS = {"default": DEFAULT, "half": HALF, "quarter": QUARTER}


def make_pair(arch: dict, seed: int = 0, same_table: bool = True):
  """A reference model with random weights and the Flax params converted from it."""
  torch.manual_seed(seed)
  ref = randomize_norms(R.UNET(**reference_kwargs(arch)), seed).eval()
  model = UNet(**arch)
  if same_table:
    ref.embeddings.embeddings = torch.from_numpy(sinusoidal_embeddings(1000, max(model.channels)))
  return ref, model, torch_to_flax(ref.state_dict(), model)


def test_embedding_table_matches_reference():
  ref = R.SinusoidalEmbeddings(1000, 512).embeddings.numpy()
  ours = sinusoidal_embeddings(1000, 512)
  assert ours.shape == ref.shape == (1000, 512) and ours.dtype == np.float32
  # Two float32 libraries' exp/sin differ by an ulp in a frequency; times t up to 999 that
  # is up to ~6.1e-5 (measured), so the table agrees to 1e-4, not to float32 epsilon.
  assert np.abs(ours - ref).max() <= 1e-4
  # Row 0 is exact: sin(0) = 0 and cos(0) = 1.
  np.testing.assert_array_equal(ours[0, 0::2], 0.0)
  np.testing.assert_array_equal(ours[0, 1::2], 1.0)


@pytest.mark.parametrize("num_steps,beta_start,beta_end", [(1000, 1e-4, 0.02), (50, 1e-4, 0.02),
                                                            (7, 1e-3, 0.05), (2, 1e-4, 0.02)])
def test_schedule_matches_reference_bit_for_bit(num_steps, beta_start, beta_end):
  """torch's CPU linspace and float64-accumulated cumprod, reproduced to the last bit."""
  ref = R.DDPM_Scheduler(num_steps)
  ref_beta = torch.linspace(beta_start, beta_end, num_steps)
  ref_alpha = torch.cumprod(1 - ref_beta, dim=0)
  if (beta_start, beta_end) == (1e-4, 0.02):
    np.testing.assert_array_equal(ref.beta.numpy(), ref_beta.numpy())
    np.testing.assert_array_equal(ref.alpha.numpy(), ref_alpha.numpy())
  s = linear_schedule(num_steps, beta_start, beta_end)
  assert s.betas.dtype == jnp.float32 and s.betas.shape == (num_steps,)
  np.testing.assert_array_equal(s.betas, ref_beta.numpy())
  np.testing.assert_array_equal(s.alphas_cumprod, ref_alpha.numpy())


def test_schedule_coefficients_in_closed_form():
  s = linear_schedule()
  # Closed forms of the derived coefficients, in float64 from the float32 tables.
  b = np.asarray(s.betas, np.float64)
  ac = np.asarray(s.alphas_cumprod, np.float64)
  np.testing.assert_allclose(s.ddpm_eps_coef, b / (np.sqrt(1 - ac) * np.sqrt(1 - b)), rtol=1e-5)
  np.testing.assert_allclose(s.posterior_variance[1:], b[1:] * (1 - ac[:-1]) / (1 - ac[1:]),
                             rtol=1e-4)
  assert float(s.posterior_variance[0]) == 0.0


def test_initial_parameters_follow_pytorchs_defaults():
  """Every weight and bias of a fresh UNet() is uniform in +-1/sqrt(fan_in) with PyTorch's
  fan_in (a ConvTranspose2d's from its output channels), as the original's layers start;
  GroupNorm starts at scale 1, offset 0. Checked on all 35.2M parameters: the bound exactly,
  the mean and standard deviation to 6 standard errors of a uniform sample."""
  ref = R.UNET()
  params = UNet().init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,), jnp.int32))
  ours = flax_to_torch(params["params"])
  reference = ref.state_dict()
  assert set(ours) == set(reference)
  for key, ref_value in reference.items():
    value = ours[key]
    assert value.shape == tuple(ref_value.shape), key
    weight = reference[key.rsplit(".", 1)[0] + ".weight"]
    if weight.ndim == 1:  # GroupNorm.
      np.testing.assert_array_equal(value, 1.0 if key.endswith("weight") else 0.0)
      continue
    # PyTorch's own fan_in rule (a ConvTranspose2d's from its output channels).
    fan_in = torch.nn.init._calculate_fan_in_and_fan_out(weight)[0]  # pylint: disable=W0212
    bound = 1 / np.sqrt(fan_in)
    limit = bound * (1 + 1e-6)  # The float32 bound may round up.
    assert np.abs(value).max() <= limit and ref_value.abs().max() <= limit, key
    n, std = value.size, bound / np.sqrt(3)
    assert abs(value.mean()) <= 6 * std / np.sqrt(n), key
    # A uniform sample's standard deviation has a relative standard error of ~0.45/sqrt(n).
    assert abs(value.std() / std - 1) <= 6 * 0.45 / np.sqrt(n), key


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_layer_shapes_and_parameter_count(name):
  arch = ARCHS[name]
  ref, model, params = make_pair(arch)
  n_ref = sum(p.numel() for p in ref.parameters())
  n_ours = sum(v.size for v in jax.tree.leaves(params))
  assert n_ours == n_ref
  if name == "default":
    assert n_ours == 35_178_689

  captured = {}
  hooks = [getattr(ref, f"Layer{i}").register_forward_hook(
      lambda m, inp, out, i=i: captured.__setitem__(i, [tuple(o.shape) for o in out]))
      for i in range(1, 7)]
  x = torch.randn(2, 1, 32, 32)
  t = torch.tensor([3, 700])
  with torch.no_grad():
    y_ref = ref(x, t)
  for h in hooks:
    h.remove()
  y, state = model.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t),
                         capture_intermediates=True, mutable=["intermediates"])
  inter = state["intermediates"]
  for i in range(1, 7):
    ours = [tuple(np.asarray(o).shape) for o in inter[f"Layer{i}"]["__call__"][0]]
    theirs = [(s[0], s[2], s[3], s[1]) for s in captured[i]]
    assert ours == theirs, f"Layer{i}"
  assert y.shape == nchw_to_nhwc(y_ref).shape == (2, 32, 32, 1)


@pytest.mark.parametrize("same_table", [False, True])
def test_forward_parity_default_model(same_table):
  ref, model, params = make_pair(DEFAULT, seed=1, same_table=same_table)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 1, 32, 32)).astype(np.float32)
  t = np.array([0, 500, 999])
  with torch.no_grad():
    y_ref = ref(torch.from_numpy(x), torch.from_numpy(t)).numpy()
  y = nhwc_to_nchw(model.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t)))
  err = np.abs(y - y_ref).max()
  # Measured: 1.6e-5 with each side's own table (output scale ~0.7), 4.8e-7 with one table.
  assert err <= (1e-6 if same_table else 1e-4), err


@pytest.mark.parametrize("name", ["half", "quarter"])
def test_forward_parity_small_models(name):
  ref, model, params = make_pair(ARCHS[name], seed=2)
  x = np.random.default_rng(1).random((2, 1, 32, 32)).astype(np.float32)
  t = np.array([17, 999])
  with torch.no_grad():
    y_ref = ref(torch.from_numpy(x), torch.from_numpy(t)).numpy()
  y = nhwc_to_nchw(model.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t)))
  assert np.abs(y - y_ref).max() <= 1e-6


def _batch(seed=0, n=4):
  rng = np.random.default_rng(seed)
  x0 = rng.random((n, 1, 32, 32)).astype(np.float32)
  t = rng.integers(0, 1000, n)
  e = rng.standard_normal((n, 1, 32, 32)).astype(np.float32)
  return x0, t, e


def _loss_and_grads(ref, model, params, x0, t, e, dropout_rng=None):
  """The original's loss and gradients (``ref``, evaluated in float64) and ours (``model``,
  float32), gradients keyed by state_dict names.

  float64, because the original's own float32 gradients on a CPU carry its kernels'
  rounding, which depends on the machine: on an AVX-512 Xeon up to 5.8e-3 of a
  parameter's largest gradient (default UNET) and 1.2e-3 relative L2 in an attention
  weight, against ~1e-6 for ours. Against float64, what is left is JAX's error alone.
  """
  ref = copy.deepcopy(ref).double()
  ref.embeddings.embeddings = ref.embeddings.embeddings.double()
  sched = R.DDPM_Scheduler(1000)
  a = sched.alpha[torch.from_numpy(t)].view(-1, 1, 1, 1).double()
  x_t = (torch.sqrt(a) * torch.from_numpy(x0).double()
         + torch.sqrt(1 - a) * torch.from_numpy(e).double())
  loss_ref = torch.nn.functional.mse_loss(ref(x_t, torch.from_numpy(t)),
                                          torch.from_numpy(e).double())
  loss_ref.backward()
  g_ref = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  loss, grads = jax.value_and_grad(diffusion.noise_loss)(
      params, model.apply, linear_schedule(), jnp.asarray(nchw_to_nhwc(x0)), jnp.asarray(t),
      jnp.asarray(nchw_to_nhwc(e)), dropout_rng)
  return loss_ref.item(), g_ref, float(loss), flax_to_torch(grads)


def test_gradient_parity_default_model():
  """Measured: relative L2 7.4e-7 and 7.8e-7 on two hosts; worst parameter 2.4e-6 of its
  largest entry on one and 5.9e-4 on an AVX-512 AMD EPYC.

  The per-parameter figure depends on the CPU's float32 summation order where a
  parameter's gradient is a near-cancelling sum: the EPYC's worst,
  ``Layer5.ResBlock2.conv1.weight``, has gradients 1/1,900 of the largest anywhere and is
  off by 5e-8 in absolute terms. The original's own float32 gradients are 5.8e-3 off on
  the same host. A wrong gradient would be off by the order of 1.
  """
  ref, model, params = make_pair(DEFAULT, seed=3)
  loss_ref, g_ref, loss, g = _loss_and_grads(ref, model, params, *_batch(0))
  assert abs(loss - loss_ref) <= 1e-6 * max(1.0, loss_ref)
  assert set(g) == set(g_ref)
  diff = np.sqrt(sum(np.sum((g[k] - g_ref[k]) ** 2) for k in g))
  norm = np.sqrt(sum(np.sum(g_ref[k] ** 2) for k in g))
  rel_l2 = diff / norm
  worst = max(np.abs(g[k] - g_ref[k]).max() / max(np.abs(g_ref[k]).max(), 1e-30) for k in g)
  assert rel_l2 <= 1e-5, rel_l2
  assert worst <= 1e-3, worst


def test_training_mode_path_matches_reference():
  """``train=True`` with a dropout rate applies dropout to every ResBlock and to the
  attention's weights; at a rate of 1e-9 it drops nothing, so its loss and gradients must
  equal the original's without dropout (measured: 5.8e-7 relative L2 in the attention's
  weight, 5.0e-7 over all)."""
  ref, _, params = make_pair(QUARTER, seed=7)
  loss_ref, g_ref, loss, g = _loss_and_grads(ref, UNet(**QUARTER, dropout_rate=1e-9), params,
                                             *_batch(4), dropout_rng=jax.random.key(1))
  assert abs(loss - loss_ref) <= 1e-6 * max(1.0, loss_ref)
  for key in ("Layer2.attention_layer.proj1.weight", None):  # The attention, then all.
    keys = [key] if key else list(g)
    diff = np.sqrt(sum(np.sum((g[k] - g_ref[k]) ** 2) for k in keys))
    assert diff <= 1e-5 * np.sqrt(sum(np.sum(g_ref[k] ** 2) for k in keys)), key


def test_q_sample_matches_reference():
  x0, t, e = _batch(1)
  sched = R.DDPM_Scheduler(1000)
  a = sched.alpha[torch.from_numpy(t)].view(-1, 1, 1, 1)
  ref = (torch.sqrt(a) * torch.from_numpy(x0) + torch.sqrt(1 - a) * torch.from_numpy(e)).numpy()
  ours = diffusion.q_sample(linear_schedule(), jnp.asarray(nchw_to_nhwc(x0)), jnp.asarray(t),
                            jnp.asarray(nchw_to_nhwc(e)))
  assert np.abs(nhwc_to_nchw(ours) - ref).max() <= 1e-6


@pytest.mark.parametrize("step", [999, 500, 1, 0])
def test_one_ancestral_step_matches_reference(step):
  """The reference's sampler run over a 'schedule' that starts at `step`: its first update."""
  ref, model, params = make_pair(QUARTER, seed=4)
  sched = R.DDPM_Scheduler(1000)
  rng = np.random.default_rng(step)
  z = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
  noise = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
  # The original's update written out with its own tensors and operation order.
  with torch.no_grad():
    tt = [step]
    temp = sched.beta[tt] / (torch.sqrt(1 - sched.alpha[tt]) * torch.sqrt(1 - sched.beta[tt]))
    zr = ((1 / torch.sqrt(1 - sched.beta[tt])) * torch.from_numpy(z)
          - temp * ref(torch.from_numpy(z), tt))
    if step > 0:
      zr = zr + torch.from_numpy(noise) * torch.sqrt(sched.beta[tt])
  s = linear_schedule()
  zj = jnp.asarray(nchw_to_nhwc(z))
  t = jnp.full((2,), step, jnp.int32)
  eps = model.apply({"params": params}, zj, t)
  z_next, _ = diffusion.ddpm_step(s, zj, t, eps, jnp.asarray(nchw_to_nhwc(noise)))
  assert np.abs(nhwc_to_nchw(z_next) - zr.numpy()).max() <= 2e-6


def _jax_training(model, params, t, e):
  """A fresh train state (Adam 2e-5, EMA 0.9999) and a jitted step with fixed ``t`` and noise
  ``e`` (NCHW): ``step(state, x0) -> (state, loss)``, the original's step in JAX."""
  tx = make_optimizer(2e-5)
  s = linear_schedule()

  @jax.jit
  def step(state, x0):
    loss, grads = jax.value_and_grad(diffusion.noise_loss)(
        state.params, model.apply, s, x0, jnp.asarray(t), jnp.asarray(nchw_to_nhwc(e)))
    return apply_gradients(state, grads, tx, 0.9999), loss

  return initial_state(params, tx, jax.random.key(0)), step


def test_full_training_step_matches_reference():
  ref, model, params = make_pair(QUARTER, seed=5)
  optimizer, ema, criterion = R.make_training(ref, lr=2e-5, ema_decay=0.9999)
  x0, t, e = _batch(2, n=8)
  losses_ref = []
  for i in range(3):  # Three steps so Adam's moments and the EMA are exercised past step 1.
    losses_ref.append(R.train_step(ref, optimizer, ema, criterion, R.DDPM_Scheduler(1000),
                                   torch.from_numpy(x0 + i), torch.from_numpy(t),
                                   torch.from_numpy(e)))

  state, step = _jax_training(model, params, t, e)

  losses = []
  for i in range(3):
    state, loss = step(state, jnp.asarray(nchw_to_nhwc(x0 + i)))
    losses.append(float(loss))
  np.testing.assert_allclose(losses, losses_ref, rtol=1e-5)
  ours, ours_ema = flax_to_torch(state.params), flax_to_torch(state.ema_params)
  theirs = ref.state_dict()
  theirs_ema = {k[len("module."):]: v for k, v in ema.state_dict().items()}
  before = flax_to_torch(params)
  for name, a, b, bound in (("params", ours, theirs, 5e-3), ("ema", ours_ema, theirs_ema, 1e-2)):
    d_ours = np.concatenate([(a[k] - before[k]).ravel() for k in before])
    d_ref = np.concatenate([(b[k].numpy() - before[k]).ravel() for k in before])
    # Adam divides each gradient by its own magnitude, so entries whose gradient is near 0
    # (measured: 0.2 % of them) amplify float32 summation-order noise into step-sized
    # differences; the update as a whole agrees to ~1e-3 (measured 1.2e-3 params, 3.5e-3 EMA).
    assert np.linalg.norm(d_ours - d_ref) / np.linalg.norm(d_ref) <= bound, name
    assert np.mean(np.abs(d_ours - d_ref) > 2.5e-7) <= 0.01, name
  moved = max(np.abs(ours[k] - before[k]).max() for k in ours)
  assert 3e-5 < moved < 1e-4  # The steps really changed the weights (about 3 x lr).


def test_a_run_exported_to_the_original_format_resumes_in_the_original_code(tmp_path):
  """Three JAX steps, ``to_torch_checkpoint``, then the original's resume (load 'weights',
  'ema', 'optimizer') and one more step on each side: the same update."""
  ref, model, params = make_pair(QUARTER, seed=6)
  x0, t, e = _batch(3, n=8)
  state, step = _jax_training(model, params, t, e)

  for i in range(3):
    state, _ = step(state, jnp.asarray(nchw_to_nhwc(x0 + i)))
  torch.save(to_torch_checkpoint(state.params, state.ema_params, state.opt_state, 2e-5),
             tmp_path / "ckpt")
  checkpoint = torch.load(tmp_path / "ckpt", weights_only=True)  # As the original loads it.

  resumed = R.UNET(**reference_kwargs(QUARTER))
  resumed.embeddings.embeddings = ref.embeddings.embeddings  # The Flax table (make_pair).
  optimizer, ema, criterion = R.make_training(resumed, lr=2e-5, ema_decay=0.9999)
  resumed.load_state_dict(checkpoint["weights"])
  ema.load_state_dict(checkpoint["ema"])
  optimizer.load_state_dict(checkpoint["optimizer"])
  # Each parameter got its own Adam moments, bit for bit, and the step count.
  adam = state.opt_state[0]
  mu, nu = flax_to_torch(adam.mu), flax_to_torch(adam.nu)
  for name, p in resumed.named_parameters():
    st = optimizer.state[p]
    assert float(st["step"]) == 3.0
    np.testing.assert_array_equal(st["exp_avg"].numpy(), mu[name], err_msg=name)
    np.testing.assert_array_equal(st["exp_avg_sq"].numpy(), nu[name], err_msg=name)
  before = flax_to_torch(state.params)
  loss_ref = R.train_step(resumed, optimizer, ema, criterion, R.DDPM_Scheduler(1000),
                          torch.from_numpy(x0 + 3), torch.from_numpy(t), torch.from_numpy(e))
  state, loss = step(state, jnp.asarray(nchw_to_nhwc(x0 + 3)))
  np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
  ours, ours_ema = flax_to_torch(state.params), flax_to_torch(state.ema_params)
  theirs = resumed.state_dict()
  theirs_ema = {k[len("module."):]: v for k, v in ema.state_dict().items()}
  ema_before = {k[len("module."):]: v.numpy() for k, v in checkpoint["ema"].items()}
  for name, a, b, start in (("params", ours, theirs, before), ("ema", ours_ema, theirs_ema,
                                                                ema_before)):
    d_ours = np.concatenate([(a[k] - start[k]).ravel() for k in start])
    d_ref = np.concatenate([(b[k].numpy() - start[k]).ravel() for k in start])
    # The bounds of the training-step test above: float32 gradient noise through Adam.
    assert np.linalg.norm(d_ours - d_ref) / np.linalg.norm(d_ref) <= 5e-3, name
    assert np.mean(np.abs(d_ours - d_ref) > 2.5e-7) <= 0.01, name


@pytest.mark.parametrize("decay", [0.9999, 0.9])
def test_adam_and_ema_arithmetic_match_torch_given_the_same_gradients(decay):
  """With identical gradients (tiny ones included), optax Adam + our EMA equal torch Adam +
  ModelEmaV3 to float32 rounding: the training-step differences above come from gradients.
  At the original's 0.9999 the EMA moves by less than an ulp in 5 steps; at 0.9 it moves
  ~1,000x that, so a wrong EMA formula cannot pass."""
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((64, 32)).astype(np.float32)
  grads = [(rng.standard_normal((64, 32)) * 10.0 ** rng.integers(-9, 1, (64, 32)))
           .astype(np.float32) for _ in range(5)]
  p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
  module = torch.nn.Module()
  module.w = p
  opt = torch.optim.Adam([p], lr=2e-5)
  ema = R.ModelEma(module, decay=decay)
  tx = make_optimizer(2e-5)
  state = initial_state({"w": jnp.asarray(w0)}, tx, jax.random.key(0))
  for g in grads:
    p.grad = torch.from_numpy(g)
    opt.step()
    ema.update(module)
    state = apply_gradients(state, {"w": jnp.asarray(g)}, tx, decay)
  theirs, theirs_ema = p.detach().numpy(), ema.module.w.detach().numpy()
  assert np.abs(theirs - w0).max() > 5e-5  # Adam moved the weights (about 5 x lr).
  for ours, ref in ((state.params["w"], theirs), (state.ema_params["w"], theirs_ema)):
    # Two ulps of the weight, plus 1e-4 of a step for Adam's own arithmetic, whose order
    # differs (measured: 1.9e-9 beyond one ulp, where a gradient of ~1e-9 meets eps 1e-8).
    excess = np.abs(np.asarray(ours) - ref) - 2 * np.spacing(np.abs(ref))
    assert excess.max() <= 1e-4 * 2e-5, excess.max()
  if decay == 0.9:
    assert np.abs(theirs_ema - w0).max() > 1e-5
  assert int(state.step) == 5


def test_upconv_equals_flax_conv_transpose_and_torch():
  """UpConv (one 3x3 conv + depth-to-space) is PyTorch's ConvTranspose2d(C, F, 4, 2, 1),
  and equals Flax's input-dilated ConvTranspose with the same parameters."""
  import flax.linen as nn
  from ddpm_jax.model import UpConv
  torch.manual_seed(0)
  ref = torch.nn.ConvTranspose2d(12, 6, 4, stride=2, padding=1)
  x = np.random.default_rng(0).standard_normal((2, 12, 5, 7)).astype(np.float32)
  params = {"kernel": ref.weight.detach().numpy().transpose(2, 3, 1, 0),
            "bias": ref.bias.detach().numpy()}
  with torch.no_grad():
    y_ref = ref(torch.from_numpy(x)).numpy()
  y = UpConv(6).apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)))
  assert y.shape == (2, 10, 14, 6)
  assert np.abs(nhwc_to_nchw(y) - y_ref).max() <= 1e-5
  flax_t = nn.ConvTranspose(6, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                            transpose_kernel=True)
  np.testing.assert_allclose(y, flax_t.apply({"params": params}, jnp.asarray(nchw_to_nhwc(x))),
                             atol=1e-5)


def test_upconv_gradients_equal_torch():
  """UpConv's kernel, bias and input gradients are ConvTranspose2d's (its weight is built
  from the kernel by ``phase_taps``, whose gradient XLA must route back tap by tap)."""
  from ddpm_jax.model import UpConv
  torch.manual_seed(1)
  ref = torch.nn.ConvTranspose2d(12, 6, 4, stride=2, padding=1)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 12, 5, 7)).astype(np.float32)
  cotangent = rng.standard_normal((2, 6, 10, 14)).astype(np.float32)
  x_ref = torch.from_numpy(x).requires_grad_()
  (ref(x_ref) * torch.from_numpy(cotangent)).sum().backward()
  params = {"kernel": jnp.asarray(ref.weight.detach().numpy().transpose(2, 3, 1, 0)),
            "bias": jnp.asarray(ref.bias.detach().numpy())}

  def objective(p, xs):
    return (UpConv(6).apply({"params": p}, xs) * nchw_to_nhwc(cotangent)).sum()
  grads, grad_x = jax.grad(objective, argnums=(0, 1))(params, jnp.asarray(nchw_to_nhwc(x)))
  np.testing.assert_allclose(grads["kernel"], ref.weight.grad.numpy().transpose(2, 3, 1, 0),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(grads["bias"], ref.bias.grad.numpy(), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(nhwc_to_nchw(grad_x), x_ref.grad.numpy(), rtol=1e-5, atol=1e-5)
