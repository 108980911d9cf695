"""``scripts/gpu_proof.sh``, the one GPU command that trains the original's configuration,
samples and scores it: its commands and limits with a stand-in for Python, and whole runs
of the tiny config on the CPU (complete, refused, and cut short by the train limit)."""

import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ["bash", "scripts/gpu_proof.sh"]
STEPS = ("train", "sample_ddim", "grid", "evaluate_ddim", "sample_ddpm", "evaluate_ddpm")
EVALUATE_KEYS = {"frechet_distance", "mean_confidence", "frac_confident", "class_histogram",
                 "class_kl", "num_samples"}

# A stand-in for Python that logs each call's arguments (a JSON list a line) and writes what
# the real command would: a checkpoint and metrics for train, the output files for sample
# and the grid, a JSON line for evaluate, parity's files. Python fed a program on stdin (the
# script's summary) is the real one.
FAKE_PYTHON = """\
import json, os, pathlib, sys
args = sys.argv[1:]
if args[0] == "-":
  os.execv(REAL, [REAL] + args)
with open(LOG, "a") as f:
  f.write(json.dumps(args) + "\\n")
def flag(name):
  return args[args.index(name) + 1]
if args[:2] == ["-m", "ddpm_jax.train"]:
  steps = next(a.split("=")[1] for a in args if a.startswith("--config.num_train_steps="))
  workdir = pathlib.Path(flag("--workdir"))
  (workdir / "checkpoints" / steps).mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text(json.dumps({"step": int(steps)}) + "\\n")
elif args[:2] == ["-m", "ddpm_jax.sample"]:
  for name in ("--out", "--npz", "--reverse_strip"):
    if name in args:
      pathlib.Path(flag(name)).write_text(name)
elif args[:2] == ["-m", "ddpm_jax.evaluate"]:
  print("a summary")
  print(json.dumps(dict(frechet_distance=1.5, mean_confidence=0.9, frac_confident=0.8,
                        class_histogram=[0.1] * 10, class_kl=0.01, num_samples=3)))
elif args[0] == "-c":
  pathlib.Path(args[3]).write_text("grid")
elif args[0] == "scripts/train_parity.py":
  out = pathlib.Path(flag("--out"))
  out.mkdir()
  (out / "parity.json").write_text("{}")
  (out / "loss_curves.png").write_text("png")
"""


def _env(**settings: str) -> dict:
  """The environment without inherited GPU_PROOF_ settings, with ``settings`` added."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_PROOF_")}
  return dict(env, JAX_PLATFORMS="cpu", **settings)


def _run(out, timeout=60, **settings: str) -> subprocess.CompletedProcess:
  """``scripts/gpu_proof.sh OUT`` from the repository's root with ``settings``."""
  return subprocess.run([*SCRIPT, str(out)], cwd=ROOT, env=_env(**settings),
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(name="fake_python")
def _fake_python(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
  """The stand-in for Python and the file it logs its calls to."""
  log = tmp_path / "calls.log"
  fake = tmp_path / "python"
  fake.write_text(f"#!{sys.executable}\nREAL = {sys.executable!r}\nLOG = {str(log)!r}\n" +
                  FAKE_PYTHON)
  fake.chmod(0o755)
  return fake, log


def _steps_logged(log: str) -> list[tuple[str, str]]:
  """Each ``== NAME: exit CODE after S s`` line of command.log: ``(NAME, CODE)``."""
  return [(line.split(":")[0][3:], line.split()[3]) for line in log.splitlines()
          if line.startswith("== ") and ": exit " in line]


def test_gpu_proof_runs_the_originals_commands_with_their_limits(tmp_path, fake_python):
  """By default: the original's config in bfloat16 on the bundled digits to 70,275 steps
  with a checkpoint every 5,000, the paper's deterministic DDIM-50 on 10,000 samples and
  DDPM-1000 on 1,000, both in batches of 1,000, each step under its limit; the parity step
  only when asked for. The output folder receives at most 8 files and no checkpoint."""
  fake, calls = fake_python
  out, work = tmp_path / "out", tmp_path / "work"
  proc = _run(out, PYTHON=str(fake), GPU_PROOF_WORKDIR=str(work), GPU_PROOF_PARITY="1")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert [l for l in proc.stdout.splitlines() if "(limit" in l] == [
      "== train (limit 420 s)", "== sample_ddim (limit 120 s)", "== grid (limit 60 s)",
      "== evaluate_ddim (limit 60 s)", "== sample_ddpm (limit 120 s)",
      "== evaluate_ddpm (limit 60 s)", "== parity (limit 300 s)"]
  scratch = work / "gpu_proof"
  called = [json.loads(line) for line in calls.read_text().splitlines()]
  grid = called.pop(2)
  assert grid[0] == "-c" and "images.save_grid(" in grid[1]
  assert grid[2:] == [f"{scratch}/ddim.npz", f"{out}/samples.png", "64"]
  assert [" ".join(args) for args in called] == [
      f"-m ddpm_jax.train --config configs/mnist.py --workdir {work} "
      "--config.data.source=bundled --config.model.dtype=bfloat16 "
      "--config.num_train_steps=70275 --config.checkpoint_every_steps=5000",
      f"-m ddpm_jax.sample --workdir {work} --sampler ddim --num_steps 50 --eta 0 "
      f"--no_clip_denoised --num_samples 10000 --seed 0 --batch_size 1000 "
      f"--npz {scratch}/ddim.npz --out {scratch}/ddim.png --overwrite",
      f"-m ddpm_jax.evaluate --samples {scratch}/ddim.npz",
      f"-m ddpm_jax.sample --workdir {work} --sampler ddpm --num_samples 1000 --seed 0 "
      f"--batch_size 1000 --npz {scratch}/ddpm.npz --out {scratch}/ddpm.png "
      f"--reverse_strip {out}/reverse.png --overwrite",
      f"-m ddpm_jax.evaluate --samples {scratch}/ddpm.npz",
      f"scripts/train_parity.py --config configs/mnist.py --num_train_steps 1000 "
      f"--out {out}/parity --config.data.source=bundled"]
  files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
  assert files == ["command.log", "evaluation_ddim.json", "evaluation_ddpm.json",
                   "metrics.jsonl", "parity/loss_curves.png", "parity/parity.json",
                   "reverse.png", "samples.png"]
  assert json.loads((out / "evaluation_ddim.json").read_text())["frac_confident"] == 0.8
  log = (out / "command.log").read_text()
  assert _steps_logged(log) == [(s, "0") for s in STEPS + ("parity",)]
  assert "steps reached: 70275 of 70275 (the last checkpoint)\n" in proc.stdout
  assert "train loop: fewer than two metrics lines from this run; not timed\n" in proc.stdout
  assert ("ddim: 3 images, frac_confident 0.8000, mean_confidence 0.9000, FD 1.50, "
          "class_kl 0.0100\n") in proc.stdout
  assert proc.stdout.endswith(" s, exit 0\n") and log.endswith(" s, exit 0\n")


def test_gpu_proof_skips_what_the_total_limit_leaves_no_time_for(tmp_path, fake_python):
  """A total limit under 10 s runs no step: training is skipped, nothing is sampled, and
  the script says so and exits 1."""
  fake, calls = fake_python
  out = tmp_path / "out"
  proc = _run(out, PYTHON=str(fake), GPU_PROOF_WORKDIR=str(tmp_path / "work"),
              GPU_PROOF_TOTAL_LIMIT="9")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "== train: skipped, " in proc.stdout
  assert " s left of the total limit (9 s)\n" in proc.stdout
  assert "steps reached: none of 70275" in proc.stdout
  assert "== no checkpoint to sample: the steps after training are skipped" in proc.stdout
  assert not calls.exists()
  assert sorted(p.name for p in out.iterdir()) == ["command.log"]


def test_gpu_proof_user_errors_are_one_line(tmp_path, fake_python):
  """A bad setting, a workdir inside the output folder or a missing config: one line on
  stderr, exit 2, and no command run."""
  fake, calls = fake_python
  out = tmp_path / "out"
  for settings, message in (
      (dict(GPU_PROOF_STEPS="7e4"),
       "error: GPU_PROOF_STEPS must be a whole number, got '7e4'"),
      (dict(GPU_PROOF_DDIM_SAMPLES="0"),
       "error: GPU_PROOF_DDIM_SAMPLES must be at least 1"),
      (dict(GPU_PROOF_WORKDIR=str(out / "run")),
       f"error: GPU_PROOF_WORKDIR {out}/run lies inside the output folder {out};"),
      (dict(GPU_PROOF_CONFIG="configs/none.py"),
       "error: GPU_PROOF_CONFIG configs/none.py: no such file")):
    proc = _run(out, PYTHON=str(fake), **settings)
    assert proc.returncode == 2 and proc.stderr.startswith(message), (settings, proc.stderr)
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
  assert not calls.exists() and not (out / "command.log").exists()


def _wheel(folder: pathlib.Path, name: str, source: str) -> pathlib.Path:
  """A pure-Python wheel in ``folder`` of the one module ``name`` with ``source``."""
  folder.mkdir(parents=True, exist_ok=True)
  dist = f"{name}-1.0.dist-info"
  path = folder / f"{name}-1.0-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as wheel:
    wheel.writestr(f"{name}.py", source)
    wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                   "Root-Is-Purelib: true\nTag: py3-none-any\n")
    wheel.writestr(f"{dist}/RECORD", "".join(
        f"{n},,\n" for n in (f"{name}.py", f"{dist}/METADATA", f"{dist}/WHEEL",
                             f"{dist}/RECORD")))
  return path


def test_gpu_python_installs_the_wheels_a_python_lacks(tmp_path):
  """``scripts/gpu_python.sh``: a module Python lacks is installed from GPU_WHEELS' wheels
  into the site folder, which then leads PYTHONPATH for every later command; without a
  wheel for it, one line on stderr names the module and ``make gpu-wheels``."""
  script = ('source scripts/gpu_python.sh; gpu_python "$0" "$1" json gpu_python_probe && '
            '"$0" -c "import gpu_python_probe; print(gpu_python_probe.VALUE)"')
  site = tmp_path / "site"

  def run(wheels: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script, sys.executable, str(site)], cwd=ROOT,
                          env=dict(_env(), GPU_WHEELS=str(wheels)), capture_output=True,
                          text=True, timeout=120, check=False)

  proc = run(tmp_path / "no_wheels")
  assert proc.returncode == 1 and proc.stdout == "", proc.stdout + proc.stderr
  assert proc.stderr.startswith(
      f"error: {sys.executable}: gpu_python_probe does not import (ModuleNotFoundError: ")
  assert "; missing: gpu_python_probe; run 'make gpu-wheels' where PyPI" in proc.stderr
  assert proc.stderr.count("\n") == 1

  _wheel(tmp_path / "wheels", "gpu_python_probe", "VALUE = 42\n")
  proc = run(tmp_path / "wheels")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  installing, found, value = proc.stdout.splitlines()
  assert installing.startswith(f"installing 1 wheels from {tmp_path}/wheels into {site} (")
  assert found.startswith(f"python {sys.version.split()[0]} ({sys.executable}), jax ")
  assert found.endswith("devices: cpu:0") and value == "42"
  assert (site / "gpu_python_probe.py").read_text() == "VALUE = 42\n"


def test_gpu_proof_refuses_a_python_that_cannot_import_its_steps(tmp_path, fake_python):
  """A Python without ml_collections (as a GPU image may be) and no wheels for it: one line
  on stderr, also in command.log, exit 2, and no step run."""
  fake, calls = fake_python
  shadow = tmp_path / "shadow" / "ml_collections"
  shadow.mkdir(parents=True)
  (shadow / "__init__.py").write_text(
      "raise ModuleNotFoundError(\"No module named 'ml_collections'\", name='ml_collections')\n")
  out = tmp_path / "out"
  proc = _run(out, PYTHON=str(fake), GPU_PROOF_WORKDIR=str(tmp_path / "work"),
              PYTHONPATH=str(shadow.parent), GPU_WHEELS=str(tmp_path / "no_wheels"))
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert proc.stderr.startswith(f"error: {fake}: ddpm_jax.train does not import "
                                "(ModuleNotFoundError: No module named 'ml_collections'); "
                                "missing: ml_collections; run 'make gpu-wheels'")
  assert proc.stderr.count("\n") == 1 and "== train" not in proc.stdout
  assert not calls.exists()
  assert (out / "command.log").read_text().endswith(proc.stderr)


@pytest.fixture(name="cpu_runs", scope="module")
def _cpu_runs(tmp_path_factory) -> dict:
  """Three runs of the script with the real commands on the tiny config (a 100-step
  schedule, so that DDPM samples in 100 steps): a complete one of 4 steps; one into the same
  folder without GPU_PROOF_OVERWRITE; and one with it, asked for 100,000 steps from the same
  workdir but given 25 s of training."""
  tmp = tmp_path_factory.mktemp("gpu_proof")
  out, work = tmp / "out", tmp / "work"
  settings = dict(
      PYTHON=sys.executable, GPU_PROOF_CONFIG="configs/mnist_tiny.py", GPU_PROOF_STEPS="4",
      GPU_PROOF_WORKDIR=str(work), GPU_PROOF_DDIM_SAMPLES="8", GPU_PROOF_DDIM_STEPS="5",
      GPU_PROOF_DDPM_SAMPLES="2",
      # The tiny config's cosine decay would refuse a run no longer than its warm-up.
      GPU_PROOF_TRAIN_FLAGS="--config.lr_schedule=constant --config.schedule.num_steps=100 "
      "--config.model.time_steps=100")

  def files() -> dict:
    """The output folder's files: their bytes and modification times."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}

  runs = {"complete": _run(out, timeout=600, **settings)}
  runs["complete_files"] = files()
  runs["refused"] = _run(out, timeout=60, **settings)
  runs["files_after_refusal"] = files()
  runs["cut"] = _run(out, timeout=600, **dict(
      settings, GPU_PROOF_OVERWRITE="1", GPU_PROOF_STEPS="100000",
      GPU_PROOF_CHECKPOINT_EVERY="100000", GPU_PROOF_TRAIN_LIMIT="25"))
  runs["out"], runs["work"] = out, work
  return runs


@pytest.mark.slow
def test_gpu_proof_trains_samples_and_scores_on_the_cpu(cpu_runs):
  """The complete run: every command exited 0, the evaluations hold the evaluate JSON,
  samples.png is the grid of the 8 DDIM samples, and the output folder holds no
  checkpoint."""
  proc = cpu_runs["complete"]
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  files = {name: content for name, (content, _) in cpu_runs["complete_files"].items()}
  assert sorted(files) == ["command.log", "evaluation_ddim.json", "evaluation_ddpm.json",
                           "metrics.jsonl", "reverse.png", "samples.png"]
  log = files["command.log"].decode()
  assert _steps_logged(log) == [(s, "0") for s in STEPS]
  assert f"--workdir {cpu_runs['work']} --config.data.source=bundled " \
         "--config.model.dtype=bfloat16 --config.num_train_steps=4 " in log
  assert "steps reached: 4 of 4 (the last checkpoint)" in log
  for name, count in (("ddim", 8), ("ddpm", 2)):
    result = json.loads(files[f"evaluation_{name}.json"])
    assert EVALUATE_KEYS <= result.keys() and result["num_samples"] == count
    assert f"{name}: {count} images, frac_confident {result['frac_confident']:.4f}" in log
  assert [json.loads(l)["step"] for l in files["metrics.jsonl"].splitlines()] == [4]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # 8 tiles of 32 pixels and their padding, 3 a row; the strip: 2 rows of 10 frames.
  assert Image.open(io.BytesIO(files["samples.png"])).size == (3 * 34 + 2,) * 2
  assert Image.open(io.BytesIO(files["reverse.png"])).size == (10 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
def test_gpu_proof_refuses_an_output_folder_with_its_files(cpu_runs):
  """Run again into the same folder without GPU_PROOF_OVERWRITE: one line, exit 2, and
  every file as it was."""
  proc = cpu_runs["refused"]
  assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
  assert proc.stderr == (
      f"error: {cpu_runs['out']} already holds command.log metrics.jsonl samples.png "
      "evaluation_ddim.json reverse.png evaluation_ddpm.json; set GPU_PROOF_OVERWRITE=1 to "
      "replace them, or name another output folder\n")
  assert cpu_runs["files_after_refusal"] == cpu_runs["complete_files"]


@pytest.mark.slow
def test_gpu_proof_samples_the_last_checkpoint_of_a_run_cut_short(cpu_runs):
  """Training cut by its time limit (exit 124) resumes the workdir and leaves its last
  checkpoint, from which the samplers and evaluations still run; the script reports the
  step reached and exits 1, the run being unfinished."""
  proc, out, work = cpu_runs["cut"], cpu_runs["out"], cpu_runs["work"]
  assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
  log = (out / "command.log").read_text()
  assert _steps_logged(log) == [("train", "124")] + [(s, "0") for s in STEPS[1:]]
  assert "Resuming " in log and "(time limit)" in log
  reached = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert f"steps reached: {reached} of 100000 (the last checkpoint)" in log
  # Stopped inside the loop, training saved the step it reached; stopped before, the
  # complete run's step 4 is the last checkpoint.
  stopped = [l for l in log.splitlines() if l.startswith("Stopped by SIGTERM at step ")]
  assert reached == (int(stopped[0].split()[5].rstrip(";")) if stopped else 4)
  for name in ("ddim", "ddpm"):
    assert EVALUATE_KEYS <= json.loads((out / f"evaluation_{name}.json").read_text()).keys()
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert records[-1]["step"] >= 4
  # The loop's speed from this run's lines alone (the complete run's step-4 line before
  # them): first to last logged step, where the 25 s reached two lines.
  if len(records) < 3:
    assert "train loop: fewer than two metrics lines from this run; not timed\n" in log
  else:
    first, last = records[1], records[-1]
    per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
    assert (f"train loop: steps {first['step']}..{last['step']} at {1e3 * per_step:.2f} ms a "
            f"step (70,275 steps: {70275 * per_step / 60:.1f} min)\n") in log
