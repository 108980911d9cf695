"""``scripts/bench.py --quick``: every figure is in the JSON and sane. No timing assertion."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import load_config_file, micro_config, reversed_kernel_formats

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "configs/mnist_tiny.py"


def _bench(*args, timeout: int = 900, **env_vars: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **env_vars)
  return subprocess.run([sys.executable, "scripts/bench.py", *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _tiny_model() -> dict:
  return load_config_file(str(ROOT / TINY)).model.to_dict()


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  """The quick run's JSON document and stdout."""
  path = tmp_path_factory.mktemp("bench") / "tmp.json"
  proc = _bench("--config", TINY, "--quick", "--json", path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(path.read_text()), proc.stdout


@pytest.mark.slow
def test_metadata_and_table(quick):
  doc, stdout = quick
  assert doc["device"]["platform"] == "cpu" and doc["device"]["kind"]
  assert doc["device"]["cpu_count"] >= 1 and len(doc["device"]["load_average_end"]) == 3
  for name in ("python", "jax", "jaxlib", "flax", "optax", "torch", "numpy"):
    assert doc["versions"][name], name
  assert "--quick" in doc["command"] and TINY in doc["command"]
  assert doc["complete"] and doc["settings"]["parts"] == ["train", "sample", "parity"]
  assert doc["date"][:2] == "20"
  settings = doc["settings"]
  assert settings["quick"] and settings["batch_sizes"] == [8] and not settings["torch_compile"]
  tiny = _tiny_model()
  assert doc["config"]["model"] == {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in tiny.items()}
  for text in ("device: cpu", f"jax {doc['versions']['jax']}", f"torch {doc['versions']['torch']}",
               doc["command"], "QUICK", "| JAX jit | float32 | 8 |", "DDPM-1000", "DDIM-50",
               "Where the step time goes", "in a jax.profiler trace",
               "copy kernels XLA added to the JAX step (count, MiB written per step): "
               "float32 batch 8: "):
    assert text in stdout, text


@pytest.mark.slow
def test_train_rows_and_ratios(quick):
  doc, _ = quick
  rows = {(r["framework"], r["variant"], r["dtype"]): r for r in doc["train"]}
  assert set(rows) == {("jax", "jit", "float32"), ("jax", "jit", "bfloat16"),
                       ("torch", "eager", "float32"), ("torch", "compile", "float32")}
  assert rows["torch", "compile", "float32"]["status"] == "skipped (--quick)"
  measured = [r for r in doc["train"] if r["status"] == "ok"]
  assert len(measured) == 3
  for r in measured:
    assert r["batch"] == 8
    assert _positive(r["img_per_s"]) and _positive(r["step_ms"])
    timing = r["timing"]
    assert len(timing["rep_s"]) == 2 and all(_positive(s) for s in timing["rep_s"])
    assert r["img_per_s"] == pytest.approx(r["batch"] / timing["median_s"])
    assert r["step_ms"] == pytest.approx(1e3 * timing["median_s"])
    assert r["memory"]["host_peak_rss_bytes"] > 50 * 2**20
    assert r["memory"]["device_peak_bytes"] is None  # CPU.
  for dtype in ("float32", "bfloat16"):
    r = rows["jax", "jit", dtype]
    assert _positive(r["compile_s"]) and r["mfu"] is None and r["mfu_peak"] is None
    # On the CPU, XLA copies buffers of the donated state each step (the count and the
    # bytes come from the compiled HLO; tests/test_profiling.py checks the reading).
    copies = r["xla_copies"]
    assert copies["count"] > 0 and copies["bytes"] > 0
    xla = r["memory"]["xla_bytes"]
    assert 0 < xla["argument"] < xla["peak"] and xla["temp"] > 0
  eager = rows["torch", "eager", "float32"]["img_per_s"]
  ratios = {r["dtype"]: r for r in doc["train_ratios"]}
  assert set(ratios) == {"float32", "bfloat16"}
  for dtype, r in ratios.items():
    assert r["batch"] == 8
    assert r["jax_over_eager"] == pytest.approx(rows["jax", "jit", dtype]["img_per_s"] / eager)
    assert r["jax_over_compile"] is None


@pytest.mark.slow
def test_a_cpu_of_several_devices_adds_the_loops_split_step(tmp_path):
  """With two host CPU devices (the training CLI's split of 2 cores) the float32 step is
  also timed with the batch split over both, and its ratio to torch is its own row."""
  path = tmp_path / "two.json"
  proc = _bench("--config", TINY, "--quick", "--parts", "train", "--dtypes", "float32",
                "--nobreakdown", "--noprofile", "--loop_steps_per_call=", "--json", path,
                XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  doc = json.loads(path.read_text())
  rows = {(r["framework"], r["variant"]): r for r in doc["train"] if r["status"] == "ok"}
  assert set(rows) == {("jax", "jit"), ("jax", "jit, 2 CPU devices"), ("torch", "eager")}
  split = rows["jax", "jit, 2 CPU devices"]
  assert split["batch"] == 8 and _positive(split["img_per_s"])
  ratios = {r["variant"]: r["jax_over_eager"] for r in doc["train_ratios"]}
  assert ratios["jit, 2 CPU devices"] == pytest.approx(
      split["img_per_s"] / rows["torch", "eager"]["img_per_s"])
  assert "| JAX jit, 2 CPU devices | float32 | 8 |" in proc.stdout
  assert "| 8 | jit, 2 CPU devices | float32 |" in proc.stdout


@pytest.mark.slow
def test_sampling_rows(quick):
  doc, _ = quick
  rows = doc["sampling"]
  original = rows[0]  # Measured first: the batched rows' speed-ups are taken against it.
  assert original["framework"] == "torch" and original["batch"] == 1
  assert original["timed_steps"] == 2 and original["steps"] == 1000 and original["scaled"]
  assert original["seconds_per_batch"] == pytest.approx(original["timing"]["median_s"] * 500)
  jax_rows = {(r["sampler"], r["dtype"]): r for r in rows[1:]}
  assert set(jax_rows) == {(s, d) for s in ("DDPM-1000", "DDIM-50")
                           for d in ("float32", "bfloat16")}
  for (sampler, _), r in jax_rows.items():
    assert r["batch"] == 8 and r["timed_steps"] == 4 and r["scaled"]
    assert r["steps"] == (1000 if sampler == "DDPM-1000" else 50)
    assert _positive(r["img_per_s"]) and _positive(r["compile_s"])
    assert r["seconds_per_batch"] == pytest.approx(r["timing"]["median_s"] * r["steps"] / 4)
    assert r["img_per_s"] == pytest.approx(8 / r["seconds_per_batch"])
    assert r["speedup_over_original"] == pytest.approx(r["img_per_s"] / original["img_per_s"])


@pytest.mark.slow
def test_parity_rows_hold_the_numbers_the_timings_stand_on(quick):
  """The original's weights in both frameworks: float32 within the CPU parity tests'
  limits (each side uses its own embedding table), bfloat16 measurably off but within
  its 8-bit mantissa; on a CPU, 'highest' precision changes nothing."""
  doc, stdout = quick
  rows = {(r["dtype"], r["precision"]): r for r in doc["parity"]}
  assert list(rows) == [("float32", "default"), ("float32", "highest"),
                        ("bfloat16", "default")]
  for r in rows.values():
    assert r["batch"] == 8 and r["timesteps"] == [0, 999] and 0.1 < r["output_scale"] < 10
    assert r["worst_param"].endswith((".weight", ".bias"))
    assert r["loss_torch"] == pytest.approx(rows["float32", "default"]["loss_torch"], rel=1e-6)
    assert (f"| {r['dtype']} | {r['precision']} | {r['output_max_abs_diff']:.2e} "
            f"({r['output_scale']:.2f}) | {r['output_rel_l2']:.2e} |") in stdout
  for precision in ("default", "highest"):
    r = rows["float32", precision]
    assert r["output_rel_l2"] < 1e-4 and r["grads_rel_l2"] < 1e-4
    assert r["loss_jax"] == pytest.approx(r["loss_torch"], rel=1e-5)
  assert rows["float32", "highest"]["output_rel_l2"] == pytest.approx(
      rows["float32", "default"]["output_rel_l2"], rel=0.1)
  bf16 = rows["bfloat16", "default"]
  assert 1e-3 < bf16["output_rel_l2"] < 5e-2 and 1e-3 < bf16["grads_rel_l2"] < 0.1
  assert bf16["loss_jax"] == pytest.approx(bf16["loss_torch"], rel=1e-2)


@pytest.mark.slow
def test_flops_near_the_analytic_count(quick):
  doc, stdout = quick
  flops = doc["flops"]
  analytic = flops["analytic_train_flops_per_img"]
  assert analytic == 3 * flops["analytic_forward_flops_per_img"]
  # Near the seed UNet's count scaled by the square of the width ratio; attention's
  # token-by-token products (linear in the width) weigh more in a narrow model.
  width = _tiny_model()["channels"][0] / 64
  assert 0.8 < analytic / (21.8e9 * width**2) < 1.6
  for r in doc["train"]:
    if r["framework"] == "jax":
      # XLA counts what the step runs: the up-convs' zero taps, no input gradient for the
      # first conv, the elementwise work; it must stay near the conv/matmul count.
      assert 0.7 * analytic < r["xla_train_flops_per_img"] < 1.3 * analytic
  seed = flops["seed_unet"]
  assert seed["issue_train_flops_per_img"] == 21.8e9
  assert seed["analytic_train_flops_per_img"] == pytest.approx(21.8e9, rel=0.01)
  assert seed["xla_lowered_train_flops_per_img"] == pytest.approx(21.8e9, rel=0.3)
  assert "seed UNet 32x32: analytic 21.79 GFLOP" in stdout


@pytest.mark.slow
def test_breakdown_and_targets(quick):
  doc, _ = quick
  b = doc["breakdown"]
  assert b["batch"] == 8
  for part in ("forward_ms", "optimizer_ema_ms", "step_ms"):
    assert _positive(b["jax"][part]), part
  for part in ("forward_ms", "backward_ms", "optimizer_ms", "ema_ms", "step_ms"):
    assert _positive(b["torch"][part]), part
  jax_row = next(r for r in doc["train"] if r["framework"] == "jax")
  assert b["jax"]["step_ms"] == jax_row["step_ms"]
  assert b["jax"]["backward_ms"] == pytest.approx(
      b["jax"]["step_ms"] - b["jax"]["forward_ms"] - b["jax"]["optimizer_ema_ms"])
  # The one-off experiments once timed here live in benchmarks/experiments/.
  assert "update_variants" not in b["jax"] and "xla_layouts" not in b["jax"]
  # The profiler trace of the same step: op time by phase, module and op, per step.
  profile = jax_row["profile"]
  assert profile["steps"] == 3 and profile["trace_dir"] is None
  phases = profile["phases"]
  assert set(phases) == {"forward", "backward", "optimizer, EMA, rest"}
  assert sum(p["ms"] for p in phases.values()) == pytest.approx(profile["op_ms_per_step"])
  assert phases["backward"]["ms"] > phases["optimizer, EMA, rest"]["ms"]
  modules = {(m["phase"], m["module"]) for m in profile["modules"]}
  assert ("backward", "Layer6/attention_layer") in modules  # The costliest on this CPU.
  assert all(m["module"] != "(no metadata)" for m in profile["modules"])
  assert 0 < profile["ops"][0]["share"] < 0.5
  # The targets are for the original UNET at batch 64/256 on a GPU: listed only.
  assert not doc["targets_applicable"] and len(doc["targets"]) == 5
  assert all(t["measured"] is None and t["met"] is None for t in doc["targets"])


@pytest.mark.slow
def test_the_loop_program_beside_the_single_step(quick):
  """The loop's k-step program (``train.compile_train_steps``), for the first row (float32,
  batch 8), at 2 steps a call under --quick: per-step figures from the call's timing, set
  against the single step's row, and its table."""
  doc, stdout = quick
  (r,) = doc["loop_program"]
  single = next(r for r in doc["train"] if r["framework"] == "jax" and r["dtype"] == "float32")
  assert (r["framework"], r["program"], r["dtype"], r["batch"], r["steps_per_call"]) == (
      "jax", "train.compile_train_steps", "float32", 8, 2)
  assert len(r["timing"]["rep_s"]) == 2 and _positive(r["compile_s"])
  assert r["call_ms"] == pytest.approx(1e3 * r["timing"]["median_s"])
  assert r["step_ms"] == pytest.approx(r["call_ms"] / 2)
  assert r["img_per_s"] == pytest.approx(8 / r["step_ms"] * 1e3)
  assert r["over_single_step"] == pytest.approx(r["img_per_s"] / single["img_per_s"])
  assert r["over_one_step_per_call"] is None  # No row of one step a call under --quick.
  assert "The training loop's program (train.compile_train_steps" in stdout
  assert f"| float32 | 8 | 2 | {r['step_ms']:.2f} | {r['img_per_s']:.1f} | – |" in stdout
  assert doc["settings"]["loop_steps_per_call"] == [2]


def test_the_loop_program_rows_are_set_against_one_step_a_call_and_the_single_step(
    monkeypatch):
  """Each loop-program row against the row of one step a call and the single step of its
  own dtype and batch; None where that was not measured."""
  monkeypatch.syspath_prepend(str(ROOT / "scripts"))
  from bench import report  # pylint: disable=g-import-not-at-top,import-error

  def loop(k, img_per_s, dtype="float32"):
    return dict(dtype=dtype, batch=64, steps_per_call=k, img_per_s=img_per_s)

  train = [dict(framework="jax", status="ok", dtype="float32", batch=64, img_per_s=100.0),
           dict(framework="torch", status="ok", dtype="float32", batch=64, img_per_s=50.0)]
  rows = [loop(1, 90.0), loop(10, 135.0), loop(10, 40.0, "bfloat16")]
  report.compare_loop_program(rows, train)
  assert [(r["over_one_step_per_call"], r["over_single_step"]) for r in rows] == [
      (1.0, 0.9), (1.5, 1.35), (None, None)]


def test_the_step_runs_with_its_state_in_other_layouts(monkeypatch):
  """On the CPU XLA keeps every state array row-major; ``compile_train_step`` given other
  layouts (here the reverse order of every kernel's dimensions) takes and gives back its
  state in them, so it loops, and computes the row-major step's numbers; the breakdown of
  a step in those layouts times its parts on a row-major copy."""
  monkeypatch.syspath_prepend(str(ROOT / "scripts"))
  # pylint: disable=g-import-not-at-top,import-error
  from bench import jax_rows, settings as bench_settings
  from absl import flags  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ddpm_jax import train  # pylint: disable=g-import-not-at-top

  def row_major(a, layout_format) -> bool:
    return tuple(layout_format.layout.major_to_minor) == tuple(range(a.ndim))

  config = micro_config(batch_size=2)
  # Two layers (a down and an up one), to keep the compilations short.
  config.model.update(channels=(8, 16), attentions=(False, True), upscales=(False, True))
  mesh = train.make_mesh()
  initial = train.create_train_state(config, NamedSharding(mesh, P()))
  x = jax.device_put(jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 1)),
                     NamedSharding(mesh, P("data")))
  fv = flags.FlagValues()
  bench_settings.define_flags(fv)
  fv(["bench", "--reps", "1", "--warmup", "0", "--min_rep_s", "0"])
  _, chosen = train.compile_train_step(config, mesh, initial, x)
  leaves = jax.tree.leaves(initial)
  assert all(row_major(a, f) for a, f in zip(leaves, jax.tree.leaves(chosen)))

  formats = reversed_kernel_formats(initial)
  compiled, _ = train.compile_train_step(config, mesh, initial, x, formats=formats)
  state = jax.device_put(initial, formats, may_alias=False)
  reference = train.make_train_step(config, mesh)
  expected = jax.tree.map(lambda a: a.copy(), initial)
  for _ in range(2):
    state, _ = compiled(state, x)
    expected, _ = reference(expected, x)
  relaid = [a for a in jax.tree.leaves(state) if not row_major(a, a.format)]
  # 13 conv kernels (4 per layer in its ResBlocks, 1 for its resampling, 3 around them)
  # in each of params, mu, nu and the EMA.
  assert len(relaid) == 4 * 13
  assert all(a.format.layout.major_to_minor == f.layout.major_to_minor
             for a, f in zip(jax.tree.leaves(state), jax.tree.leaves(formats)))
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
  found = jax_rows.jax_breakdown(config, state, x, 1.0, bench_settings.settings_from_flags(fv))
  assert set(found) == {"step_ms", "forward_ms", "backward_ms", "optimizer_ema_ms"}
  assert found["forward_ms"] > 0 and found["optimizer_ema_ms"] > 0
  # The step's own state is left in its layouts: the parts ran on a copy.
  assert len([a for a in jax.tree.leaves(state) if not row_major(a, a.format)]) == 4 * 13


def test_the_profile_takes_the_first_row_and_the_breakdown_float32(monkeypatch):
  """The profile and the loop program take the first row, the breakdown the float32 row
  of the first batch size; each can be turned off."""
  monkeypatch.syspath_prepend(str(ROOT / "scripts"))
  from bench import settings as bench_settings  # pylint: disable=g-import-not-at-top,import-error
  import dataclasses  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  bench_settings.define_flags(fv)
  fv(["bench", "--batch_sizes", "256,64", "--dtypes", "bfloat16,float32"])
  settings = bench_settings.settings_from_flags(fv)
  assert settings.loop_steps_per_call == (1, 10)
  rows = {(i, d): bench_settings.breakdown_and_profile(settings, i, d)
          for i in (0, 1) for d in ("bfloat16", "float32")}
  assert rows == {(0, "bfloat16"): (False, True), (0, "float32"): (True, False),
                  (1, "bfloat16"): (False, False), (1, "float32"): (False, False)}
  loops = {(i, d) for i in (0, 1) for d in ("bfloat16", "float32")
           if bench_settings.times_loop_program(settings, i, d)}
  assert loops == {(0, "bfloat16")}
  off = dataclasses.replace(settings, breakdown=False, profile=False, loop_steps_per_call=())
  assert bench_settings.breakdown_and_profile(off, 0, "bfloat16") == (False, False)
  assert bench_settings.breakdown_and_profile(off, 0, "float32") == (False, False)
  assert not bench_settings.times_loop_program(off, 0, "bfloat16")
  none = flags.FlagValues()
  bench_settings.define_flags(none)
  none(["bench", "--loop_steps_per_call="])
  assert bench_settings.settings_from_flags(none).loop_steps_per_call == ()


def test_gpu_bench_script_runs_the_parts_named_in_order(tmp_path):
  """``GPU_BENCH_PARTS`` picks and orders the parts, each with its limit; profile256 runs
  the bfloat16 step at batch 256 with XLA's command buffers off, and only it; the loop
  takes ``GPU_BENCH_LOOP_FLAGS``; a part the script does not know, or a limit count that
  does not match, is a one-line error. Run with a stand-in for Python that logs its
  environment and arguments."""
  log = tmp_path / "calls.log"
  fake = tmp_path / "python"
  fake.write_text(f'#!/usr/bin/env bash\necho "XLA_FLAGS=${{XLA_FLAGS:-}} | $*" >> {log}\n')
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), GPU_BENCH_PARTS="profile256 train64")
  env.pop("XLA_FLAGS", None)
  script = ["bash", "scripts/gpu_bench.sh", str(tmp_path / "out")]
  proc = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert [l for l in proc.stdout.splitlines() if l.startswith("== ")] == [
      "== profile256 (limit 90 s)", "== profile256: exit 0",
      "== train64 (limit 300 s)", "== train64: exit 0"]
  # First the check that Python imports every part's modules (scripts/gpu_python.sh).
  imports, profile, train = log.read_text().splitlines()
  assert imports == "XLA_FLAGS= | - ddpm_jax.train torch reference_torch"
  assert profile.startswith("XLA_FLAGS= --xla_gpu_enable_command_buffer= | scripts/bench.py ")
  assert profile.endswith("--parts train --batch_sizes 256 --dtypes bfloat16 --nobreakdown "
                          "--notorch_compile --loop_steps_per_call= --reps 2")
  assert train.startswith("XLA_FLAGS= | scripts/bench.py --config configs/mnist.py --json ")
  assert train.endswith("/bench_train64.json --parts train --batch_sizes 64")
  defaults = dict(env, GPU_BENCH_LOOP_FLAGS="--config.model.dtype=bfloat16 --config.seed=3")
  del defaults["GPU_BENCH_PARTS"]
  proc = subprocess.run(script, cwd=ROOT, env=defaults, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert [l for l in proc.stdout.splitlines() if l.startswith("== ") and "limit" in l] == [
      "== train64 (limit 300 s)", "== sample64 (limit 50 s)", "== train256 (limit 95 s)",
      "== sample256 (limit 45 s)", "== loop (limit 60 s)"]
  loop = log.read_text().splitlines()[-1]
  assert loop.startswith("XLA_FLAGS= | -m ddpm_jax.train --config configs/mnist.py ")
  assert loop.endswith("--config.lr_schedule=constant --config.model.dtype=bfloat16 "
                       "--config.seed=3")
  for parts, limits, message in (
      ("train64 eval", None, "error: GPU_BENCH_PARTS has 'eval'; the parts are"),
      # An experiment's part, moved to benchmarks/experiments/.
      ("variants64", None, "error: GPU_BENCH_PARTS has 'variants64'; the parts are"),
      ("train64 loop", "1 2 3", "error: GPU_BENCH_LIMITS needs one number of seconds for "
                                "each of the 2 parts (train64 loop), got '1 2 3'")):
    bad = dict(env, GPU_BENCH_PARTS=parts, GPU_BENCH_LIMITS=limits or "")
    proc = subprocess.run(script, cwd=ROOT, env=bad, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
    assert proc.stderr.count("\n") == 1


def test_user_errors_are_one_line(tmp_path):
  for args in (["--config", TINY, "--json", tmp_path / "missing" / "out.json"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--batch_sizes", "0"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--dtypes", "float64"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--sample_timed_steps", "1"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--ddim_steps", "2000"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--parts", "train,eval"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--profile_dir", __file__],
               ["--config", TINY, "--json", tmp_path / "out.json", "--loop_steps_per_call", "0"],
               # The flags of the experiments moved to benchmarks/experiments/.
               ["--config", TINY, "--json", tmp_path / "out.json", "--variant_steps"],
               ["--config", TINY, "--json", tmp_path / "out.json", "stray"],
               ["--config", TINY, "--json", tmp_path / "out.json", "--config.no_such_key=1"],
               ["--json", tmp_path / "out.json"]):
    proc = _bench(*args, timeout=120)
    assert proc.returncode == 2, (args, proc.stderr)
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_one_part_and_a_run_cut_short_keep_their_figures(tmp_path):
  """``--parts sample`` measures only the samplers, and the JSON is rewritten after every
  row: killed after the original's loop was timed, the file holds that row."""
  path = tmp_path / "cut.json"
  proc = subprocess.Popen(
      [sys.executable, "scripts/bench.py", "--config", TINY, "--quick", "--parts", "sample",
       "--dtypes", "float32", "--json", str(path)], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    for line in proc.stdout:
      if "sample torch original" in line:
        break
  finally:
    proc.kill()
    proc.wait()
  doc = json.loads(path.read_text())
  assert not doc["complete"] and doc["train"] == [] and doc["train_ratios"] == []
  assert doc["flops"]["seed_unet"] is None  # Computed with the train rows only.
  assert [r["framework"] for r in doc["sampling"]] == ["torch"]
  assert _positive(doc["sampling"][0]["img_per_s"]) and doc["settings"]["parts"] == ["sample"]


def _merge(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "scripts/bench_merge.py", *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def _merged(tmp_path, **docs) -> tuple[dict, list, subprocess.CompletedProcess]:
  """Writes each document as NAME.json, merges them: ``(merged, paths, process)``."""
  paths = [tmp_path / f"{name}.json" for name in docs]
  for path, doc in zip(paths, docs.values()):
    path.write_text(json.dumps(doc))
  proc = _merge("--json", tmp_path / "merged.json", *paths)
  assert proc.returncode == 0, proc.stderr
  return json.loads((tmp_path / "merged.json").read_text()), paths, proc


@pytest.mark.slow
def test_merging_parts_gives_back_the_whole_run(quick, tmp_path):
  """The quick run split into its train and sample parts, merged: the same rows, ratios
  and targets, and the same tables."""
  doc, stdout = quick
  train = dict(doc, train_ratios=[], sampling=[],
               settings=dict(doc["settings"], parts=["train", "parity"]))
  sample = dict(doc, train=[], train_ratios=[], parity=[], loop_program=[],
                settings=dict(doc["settings"], parts=["sample"]),
                breakdown=dict(doc["breakdown"], jax=None, torch=None),
                flops=dict(doc["flops"], seed_unet=None))
  merged, paths, proc = _merged(tmp_path, train=train, sample=sample)
  for key in ("train", "train_ratios", "loop_program", "sampling", "parity", "breakdown",
              "flops", "targets", "device"):
    assert merged[key] == doc[key], key
  assert merged["complete"] and merged["settings"]["parts"] == ["parity", "sample", "train"]
  assert merged["merged_from"] == list(map(str, paths))
  tables = stdout[stdout.index("Train step"):stdout.index("\n\nwrote")]
  assert tables in proc.stdout
  # Runs of another device (or model) are refused, in one line.
  other = dict(sample, device=dict(doc["device"], kind="another"))
  paths[1].write_text(json.dumps(other))
  proc = _merge("--json", tmp_path / "refused.json", *paths)
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
  assert "measured on another device" in proc.stderr
  assert not (tmp_path / "refused.json").exists()


@pytest.mark.slow
def test_merge_takes_ratios_within_each_run_and_mfu_from_the_model_flops(quick, tmp_path):
  """Two runs on an H100 (the quick run relabelled, its torch step 2x slower in the
  second): each JAX row is compared with its own run's torch row, and MFU is the analytic
  train FLOPs x img/s over the dtype's peak, whatever MFU the input documents held."""
  doc, _ = quick
  gpu = dict(doc["device"], platform="gpu", kind="NVIDIA H100 80GB HBM3")
  first = dict(doc, device=gpu,
               train=[dict(r, mfu=0.5) if r["framework"] == "jax" else r for r in doc["train"]])
  second = dict(first, train=[dict(r, img_per_s=r["img_per_s"] / 2)
                              if r["framework"] == "torch" and r["status"] == "ok" else r
                              for r in first["train"]])
  merged, _, _ = _merged(tmp_path, first=first, second=second)
  own = {r["dtype"]: r["jax_over_eager"] for r in doc["train_ratios"]}
  assert [r["dtype"] for r in merged["train_ratios"]] == 2 * list(own)
  assert [r["jax_over_eager"] for r in merged["train_ratios"]] == pytest.approx(
      list(own.values()) + [2 * v for v in own.values()])
  peaks = {"float32": 494e12, "bfloat16": 989e12}  # H100 SXM: TF32, bfloat16.
  flops = doc["flops"]["analytic_train_flops_per_img"]
  for r in merged["train"]:
    if r["framework"] == "jax":
      assert r["mfu"] == pytest.approx(flops * r["img_per_s"] / peaks[r["dtype"]])
      assert r["mfu_peak"]["flops_per_s"] == peaks[r["dtype"]]
  eager_target = merged["targets"][0]
  assert eager_target["name"].endswith("JAX / torch eager") and eager_target["met"] is None


@pytest.mark.slow
def test_gpu_bench_script_leaves_its_files_when_a_part_runs_out_of_time(tmp_path):
  """``scripts/gpu_bench.sh``, the one device call of BENCHMARKS.md, run on the CPU with
  CI-sized flags and its batch-256 sampler part given 1 s (less than its imports): that
  part is reported cut short, the others' figures are merged, and the training loop's
  time per step is projected."""
  out = tmp_path / "out"
  proc = subprocess.run(
      ["bash", "scripts/gpu_bench.sh", str(out), TINY, "--quick", "--batch_sizes", "4",
       "--dtypes", "float32", "--nobreakdown"], cwd=ROOT, capture_output=True, text=True,
      timeout=900, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable, GPU_BENCH_LOOP_STEPS="8",
               GPU_BENCH_PARTS="parity train64 sample64 train256 sample256 loop",
               GPU_BENCH_LIMITS="300 300 300 300 1 300"))
  assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
  for part in ("parity", "train64", "sample64", "train256", "loop"):
    assert f"== {part}: exit 0\n" in proc.stdout, proc.stdout[-4000:]
  assert "== sample256: exit 124 (time limit)\n" in proc.stdout
  assert sorted(p.name for p in out.iterdir()) == [
      "bench.log", "bench_gpu.json", "bench_parity.json", "bench_sample64.json",
      "bench_train256.json", "bench_train64.json", "loop_metrics.jsonl"]
  merged = json.loads((out / "bench_gpu.json").read_text())
  parity, *parts = [json.loads((out / f"bench_{p}.json").read_text())
                    for p in ("parity", "train64", "sample64", "train256")]
  assert all(p["complete"] for p in parts) and merged["complete"]
  assert merged["train"] == parts[0]["train"] + parts[2]["train"]
  # The loop's program (at 2 steps a call, --quick): timed in the batch-64 part only.
  assert [r["steps_per_call"] for r in merged["loop_program"]] == [2]
  assert merged["loop_program"] == parts[0]["loop_program"] and parts[2]["loop_program"] == []
  assert merged["sampling"] == parts[1]["sampling"]
  assert parity["train"] == parity["sampling"] == [] and parts[0]["parity"] == []
  assert merged["parity"] == parity["parity"]
  assert [(r["dtype"], r["precision"]) for r in merged["parity"]] == [
      ("float32", "default"), ("float32", "highest")]
  assert [r["framework"] for r in merged["train"]] == ["jax", "torch", "torch"] * 2
  # The profile: the batch-64 part's JAX row only, and in the merged report.
  assert ["profile" in r for r in merged["train"]] == [True] + [False] * 5
  assert "JAX's float32 step at batch 4 in a jax.profiler trace" in \
      proc.stdout.split("== loop: exit")[-1]
  # The loop part: python -m ddpm_jax.train for 8 steps, a metrics line a step.
  records = [json.loads(line) for line in (out / "loop_metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, 9))
  per_step = (records[-1]["time"] - records[0]["time"]) / 7
  line = next(l for l in proc.stdout.splitlines() if l.startswith("loop: steps 1..8: "))
  assert f"{1e3 * per_step:.2f} ms/step, {70275 * per_step / 60:.1f} min" in line
  log = (out / "bench.log").read_text()
  assert [l for l in log.splitlines() if l.startswith("== ")] == [
      "== parity", "== train64", "== sample64", "== train256", "== sample256", "== loop"]
