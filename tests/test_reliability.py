"""Reliability of training (issue 7): kills at any moment, stop signals, damaged checkpoints,
non-finite losses, a mismatched config on resume, and atomic checkpoint writes.

Runs ``python -m ddpm_jax.train`` on a micro UNet in subprocesses and compares what they
leave, bit for bit, with an uninterrupted in-process run that kept every step's checkpoint.
The config is a file of this module's own, so that edits to ``configs/`` cannot change it
between the in-process run and the subprocesses.
"""

import collections
import errno
import json
import os
import pathlib
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import checkpoint, data
from ddpm_jax.errors import UserError
from ddpm_jax.train import (abstract_train_state, create_train_state, make_mesh,
                            make_train_step, train_and_evaluate)
from tests.conftest import load_config_file

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 8  # Of the shared reference run.
TMP_SUFFIX = ".orbax-checkpoint-tmp"
MICRO_CONFIG = textwrap.dedent(f"""
    \"\"\"A micro UNet with the original's wiring; a metrics line and a checkpoint every step.\"\"\"
    from ddpm_jax.config_defaults import base_config


    def get_config():
      config = base_config()
      config.model.channels = (8, 16, 32, 64, 64, 48)
      config.model.num_groups = 4
      config.model.num_heads = 2
      config.model.dropout_rate = 0.0
      config.data.range = "zero_one"
      config.batch_size = 8
      config.num_train_steps = {STEPS}
      config.learning_rate = 2e-3
      config.warmup_steps = 0
      config.grad_clip_norm = 0.0
      config.ema_decay = 0.99
      config.log_every_steps = 1
      config.checkpoint_every_steps = 1
      return config
""")


_config_path = None  # MICRO_CONFIG's file, written by the fixture below.


@pytest.fixture(scope="module", autouse=True)
def micro_config_file(tmp_path_factory):
  global _config_path
  _config_path = tmp_path_factory.mktemp("config") / "micro.py"
  _config_path.write_text(MICRO_CONFIG)


def _config_file():
  return str(_config_path)


def _config(overrides=None):
  config = load_config_file(_config_file())
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _flag(key, value):
  if isinstance(value, tuple):
    value = "(" + ",".join(str(v) for v in value) + ")"
  return f"--config.{key}={value}"


def _cli(workdir, overrides=None, python=("-m", "ddpm_jax.train")):
  flags = [_flag(k, v) for k, v in (overrides or {}).items()]
  return [sys.executable, *python, "--config", _config_file(), "--workdir", str(workdir), *flags]


def _run(argv, timeout=300, **kwargs):
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        **kwargs)


def _messages(stderr):
  """stderr without tqdm's progress bars."""
  lines = (l.strip() for l in stderr.replace("\r", "\n").splitlines())
  return [l for l in lines if l and "%|" not in l]


def _abstract():
  return checkpoint.with_sharding(abstract_train_state(_config()),
                                  jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def _leaves(tree):
  return [np.array(x, copy=True) for x in jax.tree.leaves(jax.device_get(tree))]


def _restore(workdir, step):
  """Every array of the train state saved at ``step`` (params, Adam, EMA, step, rng)."""
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract()), meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  return _leaves(restored["state"])


def _steps(workdir):
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def _assert_same(leaves, expected):
  assert len(leaves) == len(expected)
  for x, y in zip(leaves, expected):
    np.testing.assert_array_equal(x, y)


def _listing(path):
  """Every file under ``path`` with its size and mtime: to show nothing was touched."""
  return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in path.rglob("*") if p.is_file())


def _metrics(workdir):
  path = workdir / checkpoint.METRICS_FILE
  return path.read_text() if path.exists() else ""


class Reference:
  """An uninterrupted in-process run that keeps the checkpoint of every step."""

  def __init__(self, workdir, steps):
    self.workdir, self.steps = workdir, steps
    train_and_evaluate(_config({"num_train_steps": steps, "keep_checkpoints": steps}),
                       str(workdir))
    self._states = {}

  def state(self, step):
    if step not in self._states:
      self._states[step] = _restore(self.workdir, step)
    return self._states[step]

  def copy_at(self, step, workdir):
    """A workdir as a run stopped after saving ``step`` would leave it."""
    workdir.mkdir(parents=True)
    shutil.copy(self.workdir / checkpoint.CONFIG_FILE, workdir)
    for s in range(max(1, step - 2), step + 1):
      shutil.copytree(self.workdir / checkpoint.CHECKPOINTS / str(s),
                      workdir / checkpoint.CHECKPOINTS / str(s))
    lines = _metrics(self.workdir).splitlines(keepends=True)
    (workdir / checkpoint.METRICS_FILE).write_text("".join(lines[:step]))
    return workdir


@pytest.fixture(scope="module")
def reference(micro_config_file, tmp_path_factory):
  del micro_config_file  # Only its file.
  return Reference(tmp_path_factory.mktemp("reference"), STEPS)


# Kill at any moment ---------------------------------------------------------------------


def _wait_then_kill(proc, rng, workdir, new_lines):
  """SIGKILLs ``proc`` at a random moment; returns which kind, or None if it ended first.

  1 time in 4 during start-up (imports, restore, compile); else ``new_lines`` metrics lines
  later, plus a random fraction of a step (each line is followed by a checkpoint write).
  """
  if rng.random() < 0.25:
    moment, deadline = "start-up", time.monotonic() + rng.uniform(0.5, 6.0)
  else:
    lines, times = _metrics(workdir).count("\n"), []
    give_up = time.monotonic() + 240
    while len(times) < new_lines:
      if proc.poll() is not None or time.monotonic() > give_up:
        return None
      if _metrics(workdir).count("\n") > lines:
        lines += 1
        times.append(time.monotonic())
      time.sleep(0.005)
    step_time = times[-1] - times[-2] if len(times) > 1 else 1.0
    moment, deadline = "steps", times[-1] + rng.uniform(0.0, step_time)
  while time.monotonic() < deadline and proc.poll() is None:
    time.sleep(0.005)
  if proc.poll() is not None:
    return None
  proc.send_signal(signal.SIGKILL)
  return moment


def _check_after_kill(workdir, reference, stats):
  """Every step in checkpoints/ restores to the reference's state at that step."""
  names = [p.name for p in (workdir / checkpoint.CHECKPOINTS).iterdir()]
  odd = [n for n in names if not (n.isdigit() or n.endswith(TMP_SUFFIX) or n == "todelete")]
  assert not odd, names
  stats["left_a_tmp_dir"] += any(n.endswith(TMP_SUFFIX) for n in names)
  stats["left_todelete"] += "todelete" in names
  assert not (workdir / checkpoint.UNREADABLE).exists()
  for step in _steps(workdir):
    _assert_same(_restore(workdir, step), reference.state(step))
    stats["checkpoints_checked"] += 1


def _logged_steps(workdir):
  if not (workdir / checkpoint.METRICS_FILE).exists():
    return []
  return [record["step"] for record in checkpoint.read_metrics(workdir)]


def _kill_and_resume(workdir, reference, steps, kills, seed):
  """Runs the CLI to ``steps``, SIGKILLing it ``kills`` times at random moments."""
  rng = random.Random(seed)
  stats = collections.Counter()
  log = workdir.parent / f"{workdir.name}.log"
  argv = _cli(workdir, {"num_train_steps": steps})
  while True:
    before = _metrics(workdir)
    with open(log, "a") as out:
      proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out)
    try:
      moment = None
      if stats["kills"] < kills:
        # About as many steps a trial as leave room for the kills still to come.
        room = (steps - max(_logged_steps(workdir), default=0)) // (kills - stats["kills"])
        moment = _wait_then_kill(proc, rng, workdir, rng.randint(1, max(1, min(3, room))))
      returncode = proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    assert _metrics(workdir).startswith(before), "metrics.jsonl was truncated"
    if returncode == 0:
      break
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    stats["kills"] += 1
    stats[f"kills_during_{moment}"] += 1
    _check_after_kill(workdir, reference, stats)
  output = log.read_text()
  assert "unreadable" not in output and "error:" not in output, output[-3000:]
  assert _steps(workdir)[-1] == steps
  _assert_same(_restore(workdir, steps), reference.state(steps))
  # One record a step (the resumed run's where a step was logged twice): the losses of
  # the run that was never interrupted.
  assert [(r["step"], r["loss"]) for r in checkpoint.read_metrics(workdir)] == [
      (r["step"], r["loss"]) for r in checkpoint.read_metrics(reference.workdir)]
  assert _logged_steps(workdir) == list(range(1, steps + 1))
  return stats


def test_killed_at_random_moments_a_run_resumes_bit_identically(reference, tmp_path):
  stats = _kill_and_resume(tmp_path / "run", reference, steps=8, kills=3, seed=0)
  print(stats)
  assert stats["kills"] >= 2, stats


def test_a_run_of_several_steps_per_call_killed_and_resumed_is_bit_identical(reference,
                                                                             tmp_path):
  """steps_per_call 4 (on a GPU four steps a call; a CPU runs one plain step a call
  whatever it is set to), a checkpoint every four: SIGKILLed once step 4's checkpoint is
  committed, the run resumes to step 8, and both checkpoints hold the uninterrupted run's
  state, bit for bit."""
  workdir = tmp_path / "run"
  argv = _cli(workdir, {"steps_per_call": 4, "log_every_steps": 4,
                        "checkpoint_every_steps": 4})
  with open(tmp_path / "run.log", "w") as out:
    proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=out)
  try:
    deadline = time.monotonic() + 300
    while not (workdir / checkpoint.CHECKPOINTS / "4").is_dir():
      assert proc.poll() is None and time.monotonic() < deadline, (
          tmp_path / "run.log").read_text()[-3000:]
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert 8 not in _steps(workdir)
  resumed = _run(argv)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert _steps(workdir) == [4, 8]
  for step in (4, 8):
    _assert_same(_restore(workdir, step), reference.state(step))


@pytest.mark.slow
def test_twenty_kills_at_random_moments_lose_nothing(tmp_path):
  reference = Reference(tmp_path / "reference", 45)
  stats = _kill_and_resume(tmp_path / "run", reference, steps=45, kills=20, seed=1)
  print(stats)
  assert stats["kills"] == 20 and stats["checkpoints_checked"] > 0, stats


# Checkpoint writes are atomic -----------------------------------------------------------

# Runs the CLI with orbax's commit (the rename of <step>.orbax-checkpoint-tmp) of step
# $DDPM_KILL_AT_COMMIT replaced by a SIGKILL: the process dies with that step fully written
# but not committed.
_KILL_AT_COMMIT = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
      if self.get_final().name == os.environ["DDPM_KILL_AT_COMMIT"]:
        os.kill(os.getpid(), signal.SIGKILL)
      return await commit(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    from ddpm_jax import train
    from ddpm_jax.errors import run_cli
    run_cli(lambda: train.main(["ddpm_jax.train"] + sys.argv[1:]))
""")


def test_a_kill_before_the_commit_leaves_only_a_tmp_dir_that_resume_ignores(
    reference, tmp_path, capsys):
  workdir = reference.copy_at(3, tmp_path / "run")
  env = dict(os.environ, DDPM_KILL_AT_COMMIT="5")
  killed = _run(_cli(workdir, python=("-c", _KILL_AT_COMMIT)), env=env)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  names = sorted(p.name for p in (workdir / checkpoint.CHECKPOINTS).iterdir())
  assert "5" + TMP_SUFFIX in names and "5" not in names, names
  assert _steps(workdir)[-1] == 4
  for step in _steps(workdir):
    _assert_same(_restore(workdir, step), reference.state(step))

  resumed = train_and_evaluate(_config({"num_train_steps": 6}), str(workdir))
  assert "from step 4" in capsys.readouterr().out
  names = [p.name for p in (workdir / checkpoint.CHECKPOINTS).iterdir()]
  assert not [n for n in names if TMP_SUFFIX in n], names  # cleared on resume
  _assert_same(_restore(workdir, 6), reference.state(6))
  _assert_same(_leaves(resumed), reference.state(6))


# SIGTERM / SIGINT -----------------------------------------------------------------------


def _stop_once_a_line_is_logged(argv, workdir, sig):
  """Runs the CLI and sends it ``sig`` once it has logged a new metrics line; returns the
  step it says it stopped at, after checking its exit and its lines."""
  before = _metrics(workdir)
  proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    give_up = time.monotonic() + 240
    while _metrics(workdir).count("\n") == before.count("\n"):
      assert proc.poll() is None and time.monotonic() < give_up, proc.communicate()
      time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, err[-3000:]
  assert "error:" not in err, err[-3000:]
  stopped = [l for l in out.splitlines() if l.startswith("Stopped by")]
  assert len(stopped) == 1 and sig.name in stopped[0], out
  assert "Run the same command again to resume" in stopped[0]
  assert _metrics(workdir).startswith(before)  # appended, never truncated
  return int(stopped[0].split(" at step ")[1].split(";")[0])


def test_sigterm_and_sigint_save_the_last_step_and_the_run_resumes_bit_identically(
    reference, tmp_path):
  """SIGTERM stops a fresh run, SIGINT the resumed one; both checkpoints match the reference."""
  workdir = tmp_path / "run"
  argv = _cli(workdir, {"checkpoint_every_steps": 100})
  metrics = workdir / checkpoint.METRICS_FILE
  for sig in (signal.SIGTERM, signal.SIGINT):
    step = _stop_once_a_line_is_logged(argv, workdir, sig)
    assert step < STEPS
    assert _steps(workdir)[-1] == step  # the checkpoint is the last completed step
    _assert_same(_restore(workdir, step), reference.state(step))
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step


def test_a_stop_signal_on_a_checkpoint_step_saves_it_once(reference, tmp_path):
  """With a checkpoint every step, the signal always lands on a step the loop has saved:
  the stop keeps that checkpoint (writing it again failed with 'cannot write the
  checkpoint of step N', exit 2)."""
  workdir = tmp_path / "run"
  step = _stop_once_a_line_is_logged(_cli(workdir, {"num_train_steps": 400}), workdir,
                                     signal.SIGTERM)
  assert step < STEPS
  assert _steps(workdir)[-1] == step
  _assert_same(_restore(workdir, step), reference.state(step))


# Damaged checkpoints --------------------------------------------------------------------


def _largest_file(path):
  return max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _flip_a_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _another_architecture(model):
  """Replaces a step dir by a checkpoint of the same loop with another UNet."""
  def damage(step_dir):
    other = abstract_train_state(_config({f"model.{k}": v for k, v in model.items()}))
    scratch = step_dir.parent.parent.parent / "other"
    mngr = checkpoint.manager(scratch)
    checkpoint.save(mngr, 1, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), other), {})
    checkpoint.finish(mngr, 1)
    mngr.close()
    shutil.rmtree(step_dir)
    shutil.copytree(scratch / checkpoint.CHECKPOINTS / "1", step_dir)
    shutil.rmtree(scratch)
  return damage


DAMAGE = {
    "truncated_array_file": lambda d: _truncate(_largest_file(d / "state")),
    # Tensorstore restores this without complaint; the CRC32s in the meta catch it.
    "flipped_byte_in_array_file": lambda d: _flip_a_byte(_largest_file(d / "state")),
    "truncated_tree_metadata": lambda d: _truncate(d / "state" / "_METADATA"),
    "missing_state_item": lambda d: shutil.rmtree(d / "state"),
    "missing_meta_item": lambda d: shutil.rmtree(d / "meta"),
    "empty_step_dir": lambda d: (shutil.rmtree(d), d.mkdir()),
    "other_widths": _another_architecture({"channels": (4, 8, 16, 32, 32, 24)}),
    "other_layers": _another_architecture({"channels": (8, 16, 32, 32),
                                           "attentions": (False, True, False, True),
                                           "upscales": (False, False, True, True)}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(
    damage, reference, tmp_path, capsys):
  workdir = reference.copy_at(4, tmp_path / "run")
  DAMAGE[damage](workdir / checkpoint.CHECKPOINTS / "4")
  before = _listing(workdir)
  capsys.readouterr()
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    step, state, meta = checkpoint.restore_latest(mngr, _abstract())
  finally:
    mngr.close()
  assert step == 3 and meta["step"] == 3
  _assert_same(_leaves(state), reference.state(3))
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if "unreadable" in l]
  assert len(lines) == 1, err
  assert lines[0].startswith("warning: checkpoint step 4 in ") and "used step 3" in lines[0]
  assert "Traceback" not in err and "never retrieved" not in err
  assert _listing(workdir) == before  # nothing deleted


def test_resuming_past_a_damaged_checkpoint_sets_it_aside_and_matches(reference, tmp_path):
  workdir = reference.copy_at(4, tmp_path / "run")
  _truncate(_largest_file(workdir / checkpoint.CHECKPOINTS / "4" / "state"))
  damaged = _listing(workdir / checkpoint.CHECKPOINTS / "4")
  result = _run(_cli(workdir, {"num_train_steps": 6}))
  assert result.returncode == 0, result.stderr[-3000:]
  messages = _messages(result.stderr)
  assert len(messages) == 1 and messages[0].startswith("warning: checkpoint step 4 "), messages
  assert " is unreadable (ValueError: " in messages[0]  # tensorstore's, cut to one line
  assert "moved it to" in messages[0] and "from step 3" in result.stdout
  # Kept, not deleted, where the message says.
  assert _listing(workdir / checkpoint.UNREADABLE / "4") == damaged
  _assert_same(_restore(workdir, 6), reference.state(6))


# Non-finite losses ----------------------------------------------------------------------

# Adam moves every weight by ~learning_rate in its first step: at 1e30 the second forward
# pass overflows, so step 2's loss is not finite (measured: step 1's loss is ~2.6).
HUGE_LR = {"learning_rate": 1e30}


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  result = _run(_cli(workdir, HUGE_LR))
  assert result.returncode == 2, result.stderr[-3000:]
  messages = _messages(result.stderr)
  assert len(messages) == 1 and messages[0].startswith("error: "), messages
  assert "not finite at step 2" in messages[0]
  assert "the last good checkpoint (step 1) is kept" in messages[0]
  assert "Traceback" not in result.stderr
  assert _steps(workdir) == [1]
  assert all(np.isfinite(x).all() for x in _restore(workdir, 1) if x.dtype.kind == "f")


def test_nan_policy_skip_leaves_the_state_unchanged_and_goes_on(tmp_path):
  config = _config({**HUGE_LR, "nan_policy": "skip", "num_train_steps": 4})
  state = train_and_evaluate(config, str(tmp_path))
  losses = [json.loads(l)["loss"] for l in _metrics(tmp_path).splitlines()]
  assert np.isfinite(losses[0]) and not np.isfinite(losses[1:]).any(), losses
  assert int(state.step) == 4

  # By hand: step 1 on the run's first batch gives the run's final state (steps 2-4 were
  # skipped), and a NaN batch after it changes nothing but the step count.
  mesh = make_mesh()
  step_fn = make_train_step(config, mesh)
  images = data.preprocess(data.load_bundled("train")[0], config.data.image_size)
  first = data.BatchIterator(images, config.batch_size, config.seed).batch_at(0)
  one, metrics = step_fn(create_train_state(config, NamedSharding(mesh, P())), first)
  assert bool(metrics["finite"])
  unchanged = lambda s: (s.params, s.opt_state, s.ema_params, s.rng)
  after_one = _leaves(unchanged(one))  # A copy: the step donates its input.
  _assert_same(after_one, _leaves(unchanged(state)))
  after_nan, metrics = step_fn(one, np.full_like(first, np.nan))
  assert not bool(metrics["finite"]) and int(after_nan.step) == 2
  _assert_same(_leaves(unchanged(after_nan)), after_one)


# A config that does not match the workdir -----------------------------------------------


@pytest.mark.parametrize("change,keys", [
    ({"model.channels": (4, 8, 16, 32, 32, 24)}, ["model.channels"]),
    ({"data.image_size": 64, "model.num_heads": 4}, ["data.image_size", "model.num_heads"]),
])
def test_resuming_with_another_architecture_is_refused_and_nothing_changes(
    change, keys, reference, tmp_path):
  workdir = reference.copy_at(3, tmp_path / "run")
  before = _listing(workdir)
  result = _run(_cli(workdir, change))
  assert result.returncode == 2, result.stderr[-3000:]
  messages = _messages(result.stderr)
  assert len(messages) == 1 and messages[0].startswith("error: "), messages
  assert f"trained with a different {', '.join(keys)};" in messages[0]
  assert _listing(workdir) == before  # config.json, checkpoints and metrics untouched
  suggested = shlex.split(messages[0].split("resume with ", 1)[1])
  assert sorted(f.split("=")[0] for f in suggested) == [f"--config.{k}" for k in keys]
  # The flags the message suggests, in place of the changed ones, resume the run.
  fixes = dict(f[len("--config."):].split("=", 1) for f in suggested)
  resumed = _run(_cli(workdir, {"num_train_steps": 3, **fixes}))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "from step 3" in resumed.stdout


def test_resuming_with_other_optimizer_settings_works_and_keeps_old_steps_readable(
    reference, tmp_path):
  """As the non-finite-loss message advises: resume with clipping (a chain around Adam), a
  warm-up and a cosine decay. The old steps, written by plain Adam, still sample."""
  workdir = reference.copy_at(3, tmp_path / "run")
  changes = {"grad_clip_norm": 1.0, "warmup_steps": 2, "lr_schedule": "cosine",
             "num_train_steps": 5}
  result = _run(_cli(workdir, changes))
  assert result.returncode == 0, result.stderr[-3000:]
  assert _messages(result.stderr) == [] and "from step 3" in result.stdout
  saved = checkpoint.read_config(workdir)
  assert (saved.grad_clip_norm, saved.warmup_steps, saved.lr_schedule) == (1.0, 2, "cosine")
  assert _steps(workdir) == [3, 4, 5]
  for step in (3, 5):
    _, _, state = checkpoint.load_run_state(workdir, step=step)
    assert int(state.opt_state[1][0].count) == int(state.opt_state[1][1].count) == step
  # Step 3 as the reference wrote it: its Adam state is the one in the chain's state.
  _, _, at_3 = checkpoint.load_run_state(workdir, step=3)
  _assert_same(_leaves((at_3.step, at_3.params, at_3.opt_state[1][0], at_3.ema_params,
                        at_3.rng)), reference.state(3))
  sampled = _run([sys.executable, "-m", "ddpm_jax.sample", "--workdir", str(workdir), "--step",
                  "3", "--num_samples", "2", "--sampler", "ddim", "--num_steps", "2", "--seed",
                  "0", "--out", str(tmp_path / "s.png")])
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert (tmp_path / "s.png").stat().st_size > 0


def test_a_resume_that_cannot_restore_writes_nothing(reference, tmp_path):
  """config.json is written only once a checkpoint is restored: a refused resume with other
  optimizer settings leaves the config that describes the workdir's checkpoints."""
  workdir = reference.copy_at(3, tmp_path / "run")
  for step in _steps(workdir):
    DAMAGE["empty_step_dir"](workdir / checkpoint.CHECKPOINTS / str(step))
  before = _listing(workdir)
  result = _run(_cli(workdir, {"grad_clip_norm": 1.0}))
  assert result.returncode == 2, result.stderr[-3000:]
  messages = _messages(result.stderr)
  assert len(messages) == 1 and messages[0].startswith("error: no readable checkpoint in ")
  assert _listing(workdir) == before


def test_resuming_with_another_compute_dtype_and_dropout_uses_them(reference, tmp_path,
                                                                     capsys):
  """model.dtype and model.dropout_rate change how the same arrays compute, not the arrays:
  a run resumes with them (as the README's bfloat16 example does) and trains with them."""
  workdir = reference.copy_at(3, tmp_path / "run")
  changes = {"model.dtype": "bfloat16", "model.dropout_rate": 0.5, "num_train_steps": 4}
  state = train_and_evaluate(_config(changes), str(workdir))
  out = capsys.readouterr().out
  assert "from step 3" in out and " parameters, bfloat16 compute, on " in out
  saved = checkpoint.read_config(workdir)
  assert (saved.model.dtype, saved.model.dropout_rate) == ("bfloat16", 0.5)
  # Trained in bfloat16 with dropout from step 3: not the float32 run's step 4.
  params = _leaves(state.params)
  want = _leaves(reference.state(4))[1:1 + len(params)]
  assert all(x.dtype == np.float32 for x in params)  # The params stay float32.
  assert sum(not np.array_equal(x, y) for x, y in zip(params, want)) > len(params) // 2


@pytest.mark.parametrize("name, make, message", [
    ("checkpoints", lambda p: p.write_text(""), "is a file, not a directory"),
    ("metrics.jsonl", lambda p: p.mkdir(), "is a directory, not a file"),
    ("config.json", lambda p: p.mkdir(), "is a directory, not a file"),
])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_before_training(name, make, message,
                                                                       tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  make(workdir / name)
  before = _listing(workdir)
  with pytest.raises(UserError, match=f"^{workdir / name} {message}; move it away or use "
                     "another --workdir$"):
    train_and_evaluate(_config(), str(workdir))
  assert _listing(workdir) == before
  assert sorted(p.name for p in workdir.iterdir()) == [name]


# Disk full ------------------------------------------------------------------------------

# The CLI with orbax's commit of step 2 (the rename of its written <step>.orbax-checkpoint-tmp,
# in a background thread) failing with ENOSPC.
_DISK_FULL_AT_STEP_2 = textwrap.dedent("""
    import errno, os, sys
    from orbax.checkpoint._src.path import atomicity
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self):
      if self.get_final().name == "2":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return await commit(self)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    from ddpm_jax import train
    from ddpm_jax.errors import run_cli
    run_cli(lambda: train.main(["ddpm_jax.train"] + sys.argv[1:]))
""")


def test_disk_full_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
  # keep_checkpoints=1: committing step 2 would delete step 1.
  result = _run(_cli(tmp_path, {"num_train_steps": 4, "keep_checkpoints": 1},
                     python=("-c", _DISK_FULL_AT_STEP_2)))
  checkpoints = tmp_path / checkpoint.CHECKPOINTS
  messages = _messages(result.stderr)
  assert result.returncode == 2, result.stderr[-3000:]
  assert messages == [
      f"error: cannot write the checkpoint of step 2 in {checkpoints} (No space left on "
      "device); the earlier checkpoints are kept (newest: step 1). To resume, free some disk "
      "space (or lower keep_checkpoints) and run the same command again"], result.stderr
  assert "Traceback" not in result.stderr
  assert sorted(p.name for p in checkpoints.iterdir()) == ["1", "2" + TMP_SUFFIX]
  assert _steps(tmp_path) == [1]


def test_a_save_that_fails_at_once_is_reported_the_same_way(tmp_path, monkeypatch):
  save = ocp.CheckpointManager.save

  def full_at_step_2(self, step, *args, **kwargs):
    if step == 2:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", full_at_step_2)
  with pytest.raises(UserError, match=r"cannot write the checkpoint of step 2 .* \(No space left "
                     r"on device\); the earlier checkpoints are kept \(newest: step 1\)"):
    train_and_evaluate(_config({"num_train_steps": 4}), str(tmp_path))
  assert sorted(p.name for p in (tmp_path / checkpoint.CHECKPOINTS).iterdir()) == ["1"]


def test_a_metrics_file_that_cannot_be_written_is_one_line_and_keeps_the_checkpoints(
    tmp_path):
  """``metrics.jsonl`` a link into a folder that does not exist: its first line (step 2)
  cannot be written. The run stops with one line; step 1's checkpoint stays."""
  (tmp_path / checkpoint.METRICS_FILE).symlink_to(tmp_path / "gone" / "metrics.jsonl")
  with pytest.raises(UserError) as info:
    train_and_evaluate(_config({"num_train_steps": 4, "log_every_steps": 2}), str(tmp_path))
  assert str(info.value) == (f"cannot write {tmp_path / checkpoint.METRICS_FILE} (No such file "
                             "or directory); the checkpoints written so far are kept")
  assert _steps(tmp_path) == [1]
