"""Weight conversion between the original's state_dict and Flax params, and its errors."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

import reference_torch as R
from ddpm_jax import checkpoint, convert
from ddpm_jax.convert import (flax_to_torch, infer_architecture, load_torch_checkpoint,
                              load_torch_training_state, to_torch_checkpoint, torch_to_flax)
from ddpm_jax.errors import UserError
from ddpm_jax.model import UNet
from ddpm_jax.train import train_and_evaluate
from tests.conftest import QUARTER, micro_config, randomize_norms, reference_kwargs

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quarter_ref():
  torch.manual_seed(0)
  return randomize_norms(R.UNET(**reference_kwargs(QUARTER)))


def test_round_trip_reproduces_the_state_dict_exactly(quarter_ref):
  sd = quarter_ref.state_dict()
  back = flax_to_torch(torch_to_flax(sd, UNet(**QUARTER)))
  # In the original's order, that of model.parameters(): its optimizer state follows it.
  assert list(back) == list(sd) == [name for name, _ in quarter_ref.named_parameters()]
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
  # And the original accepts it.
  fresh = R.UNET(**reference_kwargs(QUARTER))
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_default_model_round_trip():
  torch.manual_seed(1)
  sd = R.UNET().state_dict()
  params = torch_to_flax(sd)
  assert sum(v.size for v in __import__("jax").tree.leaves(params)) == 35_178_689
  back = flax_to_torch(params)
  assert set(back) == set(sd)
  assert all(np.array_equal(back[k], v.numpy()) for k, v in sd.items())


def test_infers_the_architecture(quarter_ref):
  arch = infer_architecture(quarter_ref.state_dict())
  assert arch == dict(channels=QUARTER["channels"],
                      attentions=(False, True, False, False, False, True),
                      upscales=(False, False, False, True, True, True),
                      out_channels=1, in_channels=1)


def test_conversion_copies_instead_of_aliasing_torch_memory(quarter_ref):
  sd = quarter_ref.state_dict()
  params = torch_to_flax(sd, UNet(**QUARTER))
  before = params["output_conv"]["bias"].copy()
  with torch.no_grad():
    quarter_ref.output_conv.bias.add_(1.0)
  np.testing.assert_array_equal(params["output_conv"]["bias"], before)
  with torch.no_grad():
    quarter_ref.output_conv.bias.sub_(1.0)


@pytest.mark.parametrize("use_ema", [True, False])
def test_loads_a_checkpoint_in_the_original_format(tmp_path, quarter_ref, use_ema):
  optimizer, ema, _ = R.make_training(quarter_ref)
  with torch.no_grad():
    for p in ema.module.parameters():
      p.mul_(0.5)  # Make EMA and raw weights differ.
  path = tmp_path / "ddpm_checkpoint"
  torch.save({"weights": quarter_ref.state_dict(), "optimizer": optimizer.state_dict(),
              "ema": ema.state_dict()}, path)
  assert all(k.startswith("module.") for k in ema.state_dict())
  params = load_torch_checkpoint(path, use_ema=use_ema, model=UNet(**QUARTER))
  source = ema.module if use_ema else quarter_ref
  np.testing.assert_array_equal(params["Layer2"]["attention_layer"]["proj1"]["kernel"],
                                source.Layer2.attention_layer.proj1.weight.detach().numpy().T)


def test_wrong_keys_are_named(quarter_ref):
  sd = dict(quarter_ref.state_dict())
  del sd["Layer3.ResBlock2.conv2.bias"]
  sd["Layer9.extra.weight"] = torch.zeros(3)
  sd["late_conv.bias"] = torch.zeros(7)
  with pytest.raises(UserError) as info:
    torch_to_flax(sd, UNet(**QUARTER))
  msg = str(info.value)
  assert "\n" not in msg
  for needle in ("missing keys: Layer3.ResBlock2.conv2.bias",
                 "unexpected keys: Layer9.extra.weight", "wrong shapes", "late_conv.bias (7,)"):
    assert needle in msg, msg


@pytest.mark.parametrize("key,value", [(0, torch.zeros(3)), ("shallow_conv.weight", 7),
                                       ("shallow_conv.weight", torch.zeros(3, dtype=torch.int64)),
                                       ("shallow_conv.weight", "text")])
def test_entries_that_are_not_named_float_tensors(quarter_ref, key, value):
  sd = dict(quarter_ref.state_dict())
  sd[key] = value
  with pytest.raises(UserError, match=f"entry {key!r} is not a named float tensor"):
    torch_to_flax(sd, UNet(**QUARTER))


def test_bfloat16_weights_convert_to_float32(quarter_ref):
  sd = {k: v.to(torch.bfloat16) for k, v in quarter_ref.state_dict().items()}
  params = torch_to_flax(sd, UNet(**QUARTER))
  kernel = params["shallow_conv"]["kernel"]
  np.testing.assert_array_equal(
      kernel, sd["shallow_conv.weight"].float().numpy().transpose(2, 3, 1, 0))


def test_checkpoint_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    load_torch_checkpoint(tmp_path / "nope")
  junk = tmp_path / "junk.pt"
  junk.write_bytes(b"not a checkpoint at all")
  with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
    load_torch_checkpoint(junk)
  partial = tmp_path / "weights_only.pt"
  torch.save({"weights": {"shallow_conv.weight": torch.zeros(1)}}, partial)
  with pytest.raises(UserError, match="no 'ema' entry.*--no_use_ema"):
    load_torch_checkpoint(partial)


def test_ddpm_jax_imports_without_torch():
  code = ("import sys; sys.modules['torch'] = None\n"
          "import ddpm_jax.model, ddpm_jax.schedule, ddpm_jax.diffusion, ddpm_jax.convert, "
          "ddpm_jax.train_state\n"
          "assert 'reference_torch' not in sys.modules\n"
          "print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_convert_names_what_the_original_would_take_for_something_else():
  config = micro_config()
  assert convert._differences_from_the_original(config) == []  # pylint: disable=protected-access
  config.data.range = "minus_one_one"
  config.schedule.num_steps = 500
  config.data.image_size = 28
  assert convert._differences_from_the_original(config) == [  # pylint: disable=protected-access
      "data in minus_one_one, not zero_one",
      "schedule {'num_steps': 500, 'beta_start': 0.0001, 'beta_end': 0.02}, not "
      "{'num_steps': 1000, 'beta_start': 0.0001, 'beta_end': 0.02}", "28x28 images, not 32x32"]


def test_convert_names_an_objective_or_schedule_the_original_would_misread():
  import ml_collections  # pylint: disable=g-import-not-at-top
  differences = convert._differences_from_the_original  # pylint: disable=protected-access
  config = micro_config()
  # Training-only options: the weights still predict the noise on the linear schedule.
  config.loss_weighting, config.min_snr_gamma, config.ema_warmup = "min_snr", 1.0, True
  assert differences(config) == []
  config.objective, config.schedule.kind = "v", "cosine"
  assert differences(config) == ["the cosine schedule, not linear",
                                 "the model predicts v, not the noise (eps)"]
  config.schedule.num_steps, config.schedule.beta_end = 500, 0.5  # Cosine reads no betas.
  assert differences(config)[1] == "schedule {'num_steps': 500}, not {'num_steps': 1000}"
  # A config.json written before objective and schedule.kind existed: the original's.
  old = micro_config().to_dict()
  del old["objective"], old["schedule"]["kind"]
  assert differences(ml_collections.ConfigDict(old)) == []


def test_converting_a_signed_data_run_says_how_to_sample_it(tmp_path, capsys):
  config = micro_config(batch_size=4, num_train_steps=1)
  config.data.range = "minus_one_one"
  train_and_evaluate(config, str(tmp_path / "run"))
  capsys.readouterr()
  assert convert.main(["--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "c.pt")]) == 0
  note = capsys.readouterr().out.splitlines()[-1]
  assert note.startswith("note: the original's code assumes other settings than this run's "
                         "(data in minus_one_one, not zero_one)")
  assert note.endswith(f"--torch_checkpoint {tmp_path / 'c.pt'} --data_range minus_one_one` "
                       "samples it right")


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "ddpm_jax.convert", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_writes_a_run_as_the_original_checkpoint(tmp_path):
  config = micro_config(batch_size=4, num_train_steps=2)
  workdir, out = tmp_path / "run", tmp_path / "torch" / "ddpm_checkpoint"
  train_and_evaluate(config, str(workdir))
  proc = _convert("--workdir", workdir, "--out", out)
  assert proc.returncode == 0, proc.stderr
  assert "step 2" in proc.stdout and "num_groups=4" in proc.stdout and "num_heads=2" in proc.stdout
  assert "note:" not in proc.stdout  # The original's data range, schedule and size.
  ckpt = torch.load(out, weights_only=True)  # What the original's torch.load gets.
  assert sorted(ckpt) == ["ema", "optimizer", "weights"]
  _, params, ema = checkpoint.load_run(workdir)
  for key, value in flax_to_torch(params).items():
    np.testing.assert_array_equal(ckpt["weights"][key].numpy(), value, err_msg=key)
  assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-3
  assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {2.0}
  # Read back as the EMA weights by the sampler's loader: exactly the run's EMA params.
  for x, y in zip(jax.tree.leaves(load_torch_checkpoint(out, model=UNet(
      channels=(8, 16, 32, 64, 64, 48), num_groups=4, num_heads=2))), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(x, np.asarray(y))
  # An existing file is kept unless --overwrite; a missing workdir is one line.
  before = out.read_bytes()
  for args, message in ((("--workdir", workdir, "--out", out), "exists; pass --overwrite"),
                        (("--workdir", tmp_path / "nope", "--out", tmp_path / "x"),
                         "does not exist")):
    proc = _convert(*args)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
  assert out.read_bytes() == before


@pytest.mark.parametrize("warmup_steps", [0, 4])
def test_a_run_through_the_original_format_and_back_resumes_bit_identically(tmp_path,
                                                                             warmup_steps):
  """Three steps, exported as the original's checkpoint, then a new workdir started from it
  with init_torch_checkpoint: the same six steps as a run that never left JAX."""
  def config(steps, **overrides):
    return micro_config(batch_size=4, num_train_steps=steps, warmup_steps=warmup_steps,
                        **overrides)

  straight = train_and_evaluate(config(6), str(tmp_path / "straight"))
  part = train_and_evaluate(config(3), str(tmp_path / "part"))
  path = tmp_path / "ddpm_checkpoint"
  torch.save(to_torch_checkpoint(part.params, part.ema_params, part.opt_state, 1e-3), path)
  resumed = train_and_evaluate(config(6, init_torch_checkpoint=str(path)),
                               str(tmp_path / "from_torch"))
  assert int(resumed.step) == 6
  for x, y in zip(jax.tree.leaves(jax.device_get(straight)),
                  jax.tree.leaves(jax.device_get(resumed)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_training_state_errors(tmp_path, quarter_ref):
  model = UNet(**QUARTER)
  weights_only = tmp_path / "weights_only.pt"
  torch.save({"weights": quarter_ref.state_dict(), "ema": quarter_ref.state_dict()}, weights_only)
  with pytest.raises(UserError, match="has no 'optimizer' entry"):
    load_torch_training_state(weights_only, model)
  # A fresh optimizer (no step taken) gives zero moments at step 0.
  fresh = tmp_path / "fresh.pt"
  optimizer = torch.optim.Adam(quarter_ref.parameters(), lr=2e-5)
  torch.save({"weights": quarter_ref.state_dict(), "ema": quarter_ref.state_dict(),
              "optimizer": optimizer.state_dict()}, fresh)
  _, _, adam = load_torch_training_state(fresh, model)
  assert int(adam.count) == 0 and not any(np.any(np.asarray(m)) for m in jax.tree.leaves(adam.mu))
  with pytest.raises(UserError, match="wrong shapes"):
    load_torch_training_state(fresh, UNet(**dict(QUARTER, channels=(16, 32, 64, 128, 128, 64))))
