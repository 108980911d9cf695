"""Training: exact resume, data parallelism, the EMA, a falling loss, and config checks."""

import functools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from PIL import Image

from ddpm_jax import checkpoint, cli, data, images, profiling, sampling, train, train_state
from ddpm_jax.model import build_unet
from ddpm_jax.schedule import linear_schedule
from ddpm_jax.train import abstract_train_state, sample_grid_path, train_and_evaluate
from ddpm_jax.train_state import (adam_states, ema_update, fit_opt_state, learning_rate_at,
                                  make_optimizer, stored_opt_state_target)
from tests.conftest import micro_config, reversed_kernel_formats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, capsys):
  # The uninterrupted run also profiles: from step 6 (after 5), 3 steps asked, 1 run.
  straight = train_and_evaluate(micro_config(num_train_steps=6, profile_steps=3),
                                str(tmp_path / "a"))
  profile = json.loads((tmp_path / "a" / "profile" / "summary.json").read_text())
  assert (profile["first_step"], profile["last_step"], profile["steps"]) == (6, 6, 1)
  assert {"forward", "backward"} <= set(profile["phases"])
  assert any(m["module"].startswith("Layer") for m in profile["modules"])
  assert list((tmp_path / "a" / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert "Step 6 | profile of steps 6..6 -> " in capsys.readouterr().out
  train_and_evaluate(micro_config(num_train_steps=3), str(tmp_path / "b"))
  capsys.readouterr()
  resumed = train_and_evaluate(micro_config(num_train_steps=6), str(tmp_path / "b"))
  assert "note:" not in capsys.readouterr().err
  assert int(straight.step) == int(resumed.step) == 6
  for x, y in zip(_leaves(straight), _leaves(resumed), strict=True):
    np.testing.assert_array_equal(x, y)
  # The restored checkpoint equals the state in memory, and the metrics were appended.
  config, params, ema = checkpoint.load_run(tmp_path / "b")
  for x, y in zip(_leaves((params, ema)), _leaves((resumed.params, resumed.ema_params))):
    np.testing.assert_array_equal(x, y)
  lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l.get("resumed_from")) for l in lines] == [
      (2, None), (3, None), (4, 3), (6, None)]
  assert config.num_train_steps == 6


def test_a_run_with_its_state_in_other_device_layouts_trains_and_resumes_the_same(
    tmp_path, monkeypatch):
  """On a GPU the loop keeps the state in layouts XLA picks (``compile_train_steps``); on a
  CPU these are row-major. Given the reverse order of every kernel's dimensions instead,
  a run that checkpoints, resumes and writes a sample grid trains the row-major run's
  numbers, and its checkpoint and grid hold the values of the state in memory."""
  def config(num_train_steps=4):
    c = micro_config(sample_every_steps=4, sample_num_images=4, sample_num_steps=3,
                     ema_decay=0.5, num_train_steps=num_train_steps)
    c.model.update(channels=(8, 16), attentions=(False, True), upscales=(False, True))
    return c

  straight = train_and_evaluate(config(), str(tmp_path / "a"))
  chosen_by_xla = train.compile_train_steps

  def reversed_kernels(config, mesh, state, images, num_steps, formats=None):
    assert formats is None  # The loop lets XLA choose (one call length here).
    return chosen_by_xla(config, mesh, state, images, num_steps, reversed_kernel_formats(state))

  monkeypatch.setattr(train, "compile_train_steps", reversed_kernels)
  train_and_evaluate(config(num_train_steps=2), str(tmp_path / "b"))
  relaid = train_and_evaluate(config(), str(tmp_path / "b"))
  # 13 conv kernels in each of params, mu, nu and the EMA.
  assert sum(a.format.layout.major_to_minor != tuple(range(a.ndim))
             for a in jax.tree.leaves(relaid)) == 4 * 13
  # The same sums in another order: float32 rounding, which Adam's normalised steps (1e-3
  # each at this rate) carry into the weights at ~1e-6.
  for x, y in zip(_leaves(straight), _leaves(relaid), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
  _, params, ema = checkpoint.load_run(tmp_path / "b")
  for x, y in zip(_leaves((params, ema)), _leaves((relaid.params, relaid.ema_params))):
    np.testing.assert_array_equal(x, y)
  grids = []
  for run in ("a", "b"):
    with Image.open(sample_grid_path(tmp_path / run, 4)) as png:
      grids.append(np.asarray(png).astype(int))
  assert np.abs(grids[0] - grids[1]).max() <= 1


def test_resuming_under_another_seed_says_what_that_does(tmp_path, capsys):
  train_and_evaluate(micro_config(num_train_steps=2), str(tmp_path))
  capsys.readouterr()
  train_and_evaluate(micro_config(num_train_steps=3, seed=7), str(tmp_path))
  err = capsys.readouterr().err
  assert (f"note: {tmp_path} was trained with seed 0; resuming with seed 7, the checkpoint's "
          "noise key carries on and the batches follow seed 7") in err
  assert len([line for line in err.splitlines() if line.startswith("note:")]) == 1


OPTIMIZER_SETTINGS = [{}, {"grad_clip_norm": 1.0}, {"warmup_steps": 2}, {"decay_steps": 6},
                      {"grad_clip_norm": 1.0, "warmup_steps": 2, "decay_steps": 6}]


@pytest.mark.parametrize("old", OPTIMIZER_SETTINGS)
def test_fit_opt_state_carries_adam_into_every_optimizer_setting(old):
  params = {"w": jnp.arange(3.0), "b": jnp.ones((2, 2))}
  tx = make_optimizer(1e-3, **old)
  opt_state = tx.init(params)
  for k in range(3):
    _, opt_state = tx.update(jax.tree.map(lambda p: p * (k + 1), params), opt_state, params)
  # Its Adam state as orbax reads a checkpoint back without optax's types: a dict.
  is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
  stored = jax.tree.map(lambda s: dict(s._asdict()) if is_adam(s) else s, opt_state,
                        is_leaf=is_adam)
  (adam,) = adam_states(opt_state)
  for new in OPTIMIZER_SETTINGS:
    new_tx = make_optimizer(1e-3, **new)
    fitted = fit_opt_state(stored, new_tx.init(params))
    assert jax.tree.structure(fitted) == jax.tree.structure(new_tx.init(params))
    adams = adam_states(fitted)
    assert len(adams) == 1
    for x, y in zip(_leaves(adams[0]), _leaves(adam), strict=True):
      np.testing.assert_array_equal(x, y)
    counts = [s.count for s in jax.tree.leaves(fitted, is_leaf=lambda s: isinstance(
        s, optax.ScaleByScheduleState)) if isinstance(s, optax.ScaleByScheduleState)]
    assert [int(c) for c in counts] == [3] * ("warmup_steps" in new or "decay_steps" in new)
  with pytest.raises(ValueError, match="the checkpoint's opt_state holds 0 Adam states"):
    stored_opt_state_target([None], jax.eval_shape(tx.init, params))


def _assert_close(xs, ys, rtol=5e-3):
  """Leaf by leaf, ``|x - y| <= rtol |y|`` in the L2 norm. Another XLA program (a clip, a
  schedule) rounds differently, and the steps after it grow the difference: measured up
  to 8e-5 in the params after two steps and 1e-3 in Adam's first moment two steps later
  (an AVX-512 Xeon). A lost Adam moment is off by tens of percent, one lost update by
  ~2e-2 of the params."""
  xs, ys = _leaves(xs), _leaves(ys)
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    x, y = x.astype(np.float64), y.astype(np.float64)
    assert np.linalg.norm(x - y) <= rtol * np.linalg.norm(y), (x, y)


def test_resuming_with_other_optimizer_settings_carries_adam_over(tmp_path):
  """A run resumed with clipping and a warm-up added, then with them removed again, keeps
  Adam's moments and count and the schedule's count: clipping at 1e9 never clips, and a
  1-step warm-up whose count goes on from step 2 is at the full rate, so both legs follow
  a run that never changed (to float32 rounding: they are other XLA programs). Every
  checkpoint stays readable, whichever optimizer wrote it."""
  straight = train_and_evaluate(micro_config(num_train_steps=6), str(tmp_path / "a"))
  workdir = tmp_path / "b"
  train_and_evaluate(micro_config(num_train_steps=2), str(workdir))
  chained = train_and_evaluate(micro_config(num_train_steps=4, grad_clip_norm=1e9,
                                            warmup_steps=1), str(workdir))
  clip_state, (adam, schedule) = chained.opt_state
  assert isinstance(clip_state, optax.EmptyState)
  assert int(adam.count) == int(schedule.count) == 4
  _, _, at_4 = checkpoint.load_run_state(tmp_path / "a", step=4)
  _assert_close((chained.params, adam.mu, adam.nu, chained.ema_params),
                (at_4.params, at_4.opt_state[0].mu, at_4.opt_state[0].nu, at_4.ema_params))
  resumed = train_and_evaluate(micro_config(num_train_steps=6), str(workdir))
  assert int(resumed.opt_state[0].count) == 6
  _assert_close(resumed, straight)
  # config.json says plain Adam now; the checkpoint the chain wrote is read into it.
  for step in (2, 4, 6):
    config, _, state = checkpoint.load_run_state(workdir, step=step)
    assert config.grad_clip_norm == 0.0 and config.warmup_steps == 0
    assert int(state.opt_state[0].count) == step
    _assert_close(state, checkpoint.load_run_state(tmp_path / "a", step=step)[2])


def test_read_metrics_keeps_the_resumed_runs_line_for_a_step_logged_twice(tmp_path,
                                                                         monkeypatch, capsys):
  """A run killed after step 3's checkpoint but after logging step 4 logs step 4 again."""
  straight = tmp_path / "straight"
  # Its profile's summary fails (a trace it cannot read): said in a line, the run goes on.
  def unreadable(logdir):
    raise FileNotFoundError(f"no *.trace.json.gz under {logdir}/plugins/profile")
  monkeypatch.setattr(profiling, "read_trace_events", unreadable)
  train_and_evaluate(micro_config(num_train_steps=6, log_every_steps=1, profile_steps=1),
                     str(straight))
  out = capsys.readouterr().out
  assert "Step 6 | profile of steps 6..6 -> " in out
  assert "its summary failed (FileNotFoundError: no *.trace.json.gz under " in out
  killed = tmp_path / "killed"
  train_and_evaluate(micro_config(num_train_steps=4, log_every_steps=1,
                                  checkpoint_every_steps=3), str(killed))
  # What the kill leaves: checkpoint 3, metrics up to step 4 (the last line cut short).
  for step in checkpoint.manager(killed, read_only=True).all_steps():
    if step > 3:
      shutil.rmtree(killed / checkpoint.CHECKPOINTS / str(step))
  with open(killed / checkpoint.METRICS_FILE, "a") as f:
    f.write('{"step": 5, "lo')
  train_and_evaluate(micro_config(num_train_steps=6, log_every_steps=1), str(killed))
  raw = [l for l in (killed / checkpoint.METRICS_FILE).read_text().splitlines()]
  assert len(raw) == 8  # Steps 1-4, the cut line (ended, not extended), 4, 5, 6.
  records = checkpoint.read_metrics(killed)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[3]["resumed_from"] == 3  # Step 4's second line.
  # Bit-identical training: the same losses as the run that was never interrupted.
  assert [r["loss"] for r in records] == [r["loss"] for r in checkpoint.read_metrics(straight)]


def test_each_metrics_line_averages_every_step_since_the_previous_line(tmp_path):
  """Losses fetched at a checkpoint step that is not a log step count in the next line."""
  train_and_evaluate(micro_config(num_train_steps=8, log_every_steps=1), str(tmp_path / "all"))
  per_step = [r["loss"] for r in checkpoint.read_metrics(tmp_path / "all")]
  train_and_evaluate(micro_config(num_train_steps=8, log_every_steps=4, checkpoint_every_steps=3),
                     str(tmp_path / "sparse"))
  records = checkpoint.read_metrics(tmp_path / "sparse")
  assert [r["step"] for r in records] == [4, 8]
  assert [r["loss"] for r in records] == pytest.approx(
      [np.mean(per_step[:4]), np.mean(per_step[4:])], rel=1e-12)


def test_read_metrics_drops_the_lines_of_steps_a_resume_redid(tmp_path):
  """Steps 5 and 6 logged, checkpoint 6 lost: the resumed run logs 6 and 8 only, and the
  first run's step 5 is not in the history of the run the latest checkpoint continues."""
  train_and_evaluate(micro_config(num_train_steps=6, log_every_steps=1,
                                  checkpoint_every_steps=4), str(tmp_path))
  first = checkpoint.read_metrics(tmp_path)
  shutil.rmtree(tmp_path / checkpoint.CHECKPOINTS / "6")
  train_and_evaluate(micro_config(num_train_steps=8, log_every_steps=2,
                                  checkpoint_every_steps=4), str(tmp_path))
  records = checkpoint.read_metrics(tmp_path)
  assert [(r["step"], r.get("resumed_from")) for r in records] == [
      (1, None), (2, None), (3, None), (4, None), (6, 4), (8, None)]
  assert records[:4] == first[:4]
  # Bit-identical training: the redone steps 5 and 6 give the first run's losses again.
  assert records[4]["loss"] == pytest.approx(np.mean([r["loss"] for r in first[4:6]]),
                                             rel=1e-12)


def test_sample_grids_are_written_every_sample_every_steps(tmp_path):
  # A short EMA: at the default 0.9999 the EMA of 2 more steps hardly changes the samples.
  config = micro_config(sample_every_steps=2, sample_num_images=4, sample_num_steps=3,
                        ema_decay=0.5)
  train_and_evaluate(config, str(tmp_path))
  assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
      "step_0000002.png", "step_0000004.png"]
  # The last grid is deterministic DDIM of the final EMA params from the fixed noise.
  _, _, ema = checkpoint.load_run(tmp_path)
  rng = jax.random.fold_in(jax.random.key(config.seed), -2 % 2**31)
  x, _ = sampling.ddim_sample(build_unet(config.model).apply, ema, linear_schedule(), rng,
                              (4, 32, 32, 1), 3, snapshot_times=())
  want = images.tile(images.to_uint8(np.asarray(x), "zero_one"), 2)[..., 0]
  final = sample_grid_path(tmp_path, 4)
  with Image.open(final) as png:
    np.testing.assert_array_equal(np.asarray(png), want)
  with Image.open(sample_grid_path(tmp_path, 2)) as png:
    assert np.abs(np.asarray(png).astype(int) - want).mean() > 1  # An earlier model's.
  # A run killed after its last checkpoint but before its grid writes the grid on resume.
  final_bytes = final.read_bytes()
  final.unlink()
  train_and_evaluate(config, str(tmp_path))
  assert final.read_bytes() == final_bytes


def test_ema_arithmetic_closed_form():
  e0, p, decay = jnp.float32(2.0), jnp.float32(-1.0), 0.9
  ema = {"w": e0}
  for _ in range(10):
    ema = ema_update(ema, {"w": p}, decay)
  # With constant params, ema_k = p + (e0 - p) * decay^k.
  np.testing.assert_allclose(float(ema["w"]), -1.0 + 3.0 * 0.9 ** 10, rtol=1e-6)


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_cosine_schedule_steps_adam_by_the_closed_form_rate(warmup_steps):
  """With a constant gradient every Adam update is -lr_k (bias-corrected m / sqrt(v) = 1),
  so the updates read off the rate: warm-up, then lr / 2 * (1 + cos(pi k' / K'))."""
  lr, total = 0.5, 10
  tx = make_optimizer(lr, warmup_steps, decay_steps=total)
  params = {"w": jnp.float32(0.0)}
  opt_state = tx.init(params)
  steps = []
  for _ in range(total + 1):
    updates, opt_state = tx.update({"w": jnp.float32(3.0)}, opt_state, params)
    steps.append(-float(updates["w"]))

  def closed_form(k):
    if k < warmup_steps:
      return lr * k / warmup_steps
    return lr / 2 * (1 + math.cos(math.pi * (k - warmup_steps) / (total - warmup_steps)))
  expected = [closed_form(k) for k in range(total + 1)]
  np.testing.assert_allclose(steps, expected, rtol=1e-5, atol=1e-7)
  assert expected[-1] == 0.0 and max(expected) == lr
  logged = [learning_rate_at(k, lr, warmup_steps, decay_steps=total) for k in range(total + 1)]
  np.testing.assert_allclose(logged, expected, rtol=1e-6, atol=1e-7)


def test_cosine_run_logs_the_rate_each_step_applied(tmp_path):
  """Step N's line logs the rate of the update that made step N: optax's count N - 1 (the
  closed-form test above), so a warm-up's first step logs 0 and the last step is not 0."""
  config = micro_config(num_train_steps=6, log_every_steps=1, lr_schedule="cosine",
                        warmup_steps=2)
  train_and_evaluate(config, str(tmp_path / "cosine"))
  records = checkpoint.read_metrics(tmp_path / "cosine")
  assert [r["step"] for r in records] == list(range(1, 7))
  cosine = lambda k: 1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4))  # After the warm-up.
  expected = [0.0, 5e-4, cosine(0), cosine(1), cosine(2), cosine(3)]
  np.testing.assert_allclose([r["lr"] for r in records], expected, rtol=1e-12, atol=1e-15)
  assert [r["lr"] for r in records] == [learning_rate_at(n - 1, 1e-3, 2, decay_steps=6)
                                        for n in range(1, 7)]


_DEVICE_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np, jax
    sys.path.insert(0, {repo!r})
    from tests.conftest import micro_config
    from ddpm_jax.train import train_and_evaluate
    assert len(jax.devices()) == int(sys.argv[2]), jax.devices()
    state = train_and_evaluate(micro_config(num_train_steps=3), sys.argv[1])
    trees = jax.device_get((state.params, state.ema_params))
    leaves = [np.asarray(x) for x in jax.tree.leaves(trees)]
    np.savez(os.path.join(sys.argv[1], "leaves.npz"), *leaves)
""")


@pytest.mark.slow
def test_eight_devices_give_the_one_device_result(tmp_path):
  results = {}
  for n in (1, 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    workdir = tmp_path / f"d{n}"
    out = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT.format(repo=REPO), str(workdir),
                          str(n)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with np.load(workdir / "leaves.npz") as f:
      results[n] = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    results[f"loss{n}"] = [json.loads(l)["loss"] for l in
                           (workdir / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(results["loss1"], results["loss8"], rtol=1e-5)
  a = np.concatenate([x.ravel() for x in results[1]])
  b = np.concatenate([x.ravel() for x in results[8]])
  # Same data and noise; only the summation order differs (first-step gradients agree to
  # 8e-5 relative L2, measured). Adam normalises each gradient entry by its own history,
  # so an entry whose gradient is near 0 can move by a different fraction of a step
  # (lr = 1e-3): bounded by 2 x lr x steps, and rare beyond 1 % of a step.
  diff = np.abs(a - b)
  assert diff.max() <= 2 * 1e-3 * 3
  assert np.mean(diff > 1e-5) <= 0.01, np.mean(diff > 1e-5)


@pytest.mark.slow
@pytest.mark.skipif(cli.available_cores() < 2, reason="needs 2 CPU cores")
def test_the_cli_trains_on_a_device_per_core_the_one_device_numbers(tmp_path):
  """Without a device count in XLA_FLAGS, `python -m ddpm_jax.train` on a 2-core CPU trains
  on 2 devices, each on half of every batch: the one-device run's numbers to the 8-device
  test's tolerance."""
  overrides = ["--config.model.channels=(8,16,32,64,64,48)", "--config.model.num_groups=4",
               "--config.model.num_heads=2", "--config.batch_size=8",
               "--config.num_train_steps=3", "--config.lr_schedule=constant",
               "--config.learning_rate=1e-3", "--config.warmup_steps=0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=1", "").strip()
  out = subprocess.run([sys.executable, "-m", "ddpm_jax.train", "--config",
                        "configs/mnist_tiny.py", f"--workdir={tmp_path / 'two'}", *overrides],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "on 2 cpu devices" in out.stdout, out.stdout
  config = cli.load_config_file(os.path.join(REPO, "configs/mnist_tiny.py"))
  config.model.update(channels=(8, 16, 32, 64, 64, 48), num_groups=4, num_heads=2)
  config.update(batch_size=8, num_train_steps=3, lr_schedule="constant", learning_rate=1e-3,
                warmup_steps=0)
  one = train_and_evaluate(config, str(tmp_path / "one"))
  _, params, _ = checkpoint.load_run(tmp_path / "two")
  a = np.concatenate([x.ravel() for x in _leaves(params)])
  b = np.concatenate([x.ravel() for x in _leaves(one.params)])
  diff = np.abs(a - b)  # As in the 8-device test: bounded by 2 x lr x steps, rare > 1e-5.
  assert diff.max() <= 2 * 1e-3 * 3
  assert np.mean(diff > 1e-5) <= 0.01, np.mean(diff > 1e-5)


@pytest.mark.slow
def test_tiny_config_loss_falls(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import mnist_tiny  # pylint: disable=g-import-not-at-top
  config = mnist_tiny.get_config()
  config.num_train_steps = 200
  config.checkpoint_every_steps = 200
  train_and_evaluate(config, str(tmp_path))
  losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # Measured: ~1.6 over the first 25 steps (warm-up), ~0.15 at steps 175-200.
  assert losses[0] > 0.5
  assert np.mean(losses[-2:]) < 0.25 * losses[0]
  assert np.mean(losses[-2:]) < 0.3


def test_k_steps_per_call_train_the_numbers_of_one_step_calls(tmp_path, capsys, monkeypatch):
  """A call of k steps is a lax.scan of the one-step program (as on a GPU; a CPU runs one
  plain step a call, and is made to scan here): the state, every metrics line and the
  epoch lines are those of single-step calls, bit for bit, with calls cut short at each
  line, checkpoint and the run's end (here of 2, 1, 1, 2, 1 steps for k = 3). 24 images
  make epochs of 3 steps, which end inside calls."""
  monkeypatch.setattr(train, "runs_in_scan", lambda platform: True)
  load = data.load_dataset
  monkeypatch.setattr(data, "load_dataset", lambda *a, **k: tuple(x[:24] for x in load(*a, **k)))
  config = functools.partial(micro_config, num_train_steps=7, log_every_steps=2,
                             checkpoint_every_steps=4)
  one = train_and_evaluate(config(steps_per_call=1), str(tmp_path / "one"))
  one_out = capsys.readouterr().out
  three = train_and_evaluate(config(steps_per_call=3), str(tmp_path / "three"))
  three_out = capsys.readouterr().out
  for x, y in zip(_leaves(one), _leaves(three), strict=True):
    np.testing.assert_array_equal(x, y)
  lines = {k: [json.loads(l) for l in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
           for k in ("one", "three")}
  assert [(r["step"], r["loss"]) for r in lines["one"]] == [
      (r["step"], r["loss"]) for r in lines["three"]]
  assert [r["step"] for r in lines["one"]] == [2, 4, 6, 7]
  assert checkpoint.manager(tmp_path / "three", read_only=True).all_steps() == [4, 7]
  epochs = [l for l in one_out.splitlines() if l.startswith("Epoch")]
  assert [l.split(" |")[0] for l in epochs] == ["Epoch 1", "Epoch 2"]
  assert epochs == [l for l in three_out.splitlines() if l.startswith("Epoch")]


def test_the_command_line_splits_the_cpu_into_a_device_per_core(monkeypatch):
  """One CPU device per core, as many as divide the batch; an XLA_FLAGS that sets the
  count already is left as it is."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
  assert cli.use_cpu_cores(16, cores=2) == 2
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_use_thunk_runtime=true "
                                     "--xla_force_host_platform_device_count=2")
  assert cli.use_cpu_cores(16, cores=2) == 0  # Set now: left alone.
  monkeypatch.delenv("XLA_FLAGS")
  assert cli.use_cpu_cores(12, cores=8) == 6 and "count=6" in os.environ["XLA_FLAGS"]
  monkeypatch.delenv("XLA_FLAGS")
  assert cli.use_cpu_cores(7, cores=2) == 1 and "XLA_FLAGS" not in os.environ


def test_the_ema_warm_up_ramps_its_decay_as_its_formula():
  """decay_t = min(decay, (1 + t) / (10 + t)); the EMA after a few updates is that lerp."""
  steps = jnp.arange(6)
  np.testing.assert_allclose(train_state.ema_decay_at(steps, 0.995, warmup=True),
                             np.minimum(0.995, (1 + np.arange(6)) / (10 + np.arange(6))),
                             rtol=1e-7)
  assert float(train_state.ema_decay_at(10**6, 0.995, warmup=True)) == np.float32(0.995)
  assert train_state.ema_decay_at(3, 0.995) == 0.995  # Off: the original's constant.
  tx = optax.sgd(1.0)
  state = train_state.initial_state({"w": jnp.zeros(())}, tx, jax.random.key(0))
  expected = 0.0
  for t in range(3):
    grads = {"w": -jnp.ones(())}  # w = t + 1 after the update.
    state = train_state.apply_gradients(state, grads, tx, 0.995, ema_warmup=True)
    decay = min(0.995, (1 + t) / (10 + t))
    expected = decay * expected + (1 - decay) * (t + 1)
  np.testing.assert_allclose(float(state.ema_params["w"]), expected, rtol=1e-6)


def test_abstract_state_matches_a_real_checkpoint_tree():
  abstract = abstract_train_state(micro_config())
  n = sum(x.size for x in jax.tree.leaves(abstract.params))
  assert n == sum(x.size for x in jax.tree.leaves(abstract.ema_params)) > 0
  assert abstract.rng.dtype == jnp.uint32 and abstract.step.dtype == jnp.int32


def test_the_cpu_init_compiled_at_O1_gives_the_default_compilations_bits():
  """create_train_state compiles the init at LLVM -O1 on CPU (faster to compile); the state
  must be the one XLA's default optimization level gives, bit for bit."""
  config = micro_config()
  init = train_state._init_state  # pylint: disable=protected-access
  default = jax.jit(functools.partial(init, config))()
  fast = train.create_train_state(config)
  for x, y in zip(jax.tree.leaves(jax.device_get(fast)), jax.tree.leaves(jax.device_get(default)),
                  strict=True):
    np.testing.assert_array_equal(x, y)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_result(tmp_path):
  """Multi-host training as the README describes it, on one machine: two processes of
  ``python -m ddpm_jax.train`` (one CPU device each, JAX_COORDINATOR_ADDRESS set) train 2
  steps into one workdir, are started again and resume to 4. Each reads its half of every
  batch, both write the same checkpoints, only process 0 writes the metrics, and the run
  is bit-identical to one process training 4 steps on two devices."""
  # A constant rate: the tiny config's cosine decay needs a run longer than its warm-up.
  flags = ["--config", "configs/mnist_tiny.py", "--config.model.channels=(8,16,32,64,64,48)",
           "--config.model.num_groups=4", "--config.model.num_heads=2",
           "--config.batch_size=8", "--config.checkpoint_every_steps=2",
           "--config.log_every_steps=2", "--config.lr_schedule=constant"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def train(workdir, steps, processes):
    if processes == 1:
      envs = [dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2")]
    else:
      address = f"localhost:{_free_port()}"
      envs = [dict(env, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i)) for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "ddpm_jax.train", *flags,
                               f"--workdir={workdir}", f"--config.num_train_steps={steps}"],
                              cwd=REPO, env=e, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for e in envs]
    try:
      for proc in procs:
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, output[-3000:]
    finally:  # One process failing leaves the other waiting for it.
      for proc in procs:
        proc.kill()
        proc.wait()

  train(tmp_path / "two", 2, processes=2)
  train(tmp_path / "two", 4, processes=2)
  train(tmp_path / "one", 4, processes=1)
  _, step_two, two = checkpoint.load_run_state(tmp_path / "two")
  _, step_one, one = checkpoint.load_run_state(tmp_path / "one")
  assert step_two == step_one == 4
  for x, y in zip(jax.tree.leaves(jax.device_get(two)), jax.tree.leaves(jax.device_get(one)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  lines = [json.loads(l) for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r.get("resumed_from")) for r in lines] == [(2, None), (4, 2)]
  assert [r["loss"] for r in lines] == [
      r["loss"] for r in checkpoint.read_metrics(tmp_path / "one")]


def test_the_run_summary_names_the_recipe_beyond_the_original():
  """The banner says what the model predicts, its weighting, schedule, classes and EMA, so a
  log tells an x0 or conditional run from the original's."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  params = {"w": np.zeros((3, 4)), "b": np.zeros(5)}
  config = micro_config()
  original = train.run_summary(config, params, mesh, 0, 10, 5, 80)
  assert original.endswith("; predicts eps, linear schedule of "
                           f"{config.schedule.num_steps} steps"), original
  assert ": 17 parameters, " in original and "steps 0 -> 10 (2 epochs of 80 images)" in original
  config.objective, config.loss_weighting, config.schedule.kind = "x0", "min_snr", "sigmoid"
  config.model.num_classes, config.ema_warmup = 10, True
  assert train.run_summary(config, params, mesh, 0, 10, 5, 80).endswith(
      f"warmed up; predicts x0 with Min-SNR-5 weights, sigmoid schedule of "
      f"{config.schedule.num_steps} steps, 10 classes (label dropout 0.1)")
