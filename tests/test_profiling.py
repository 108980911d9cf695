"""``ddpm_jax.profiling``: HLO metadata, trace events and their summary in closed form, and a
real trace of a small jitted gradient step on the CPU."""

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from ddpm_jax import profiling
from tests.conftest import micro_config

HLO = """HloModule jit_train_step

%fused_computation.9 (param_0: f32[4,8], param_1: f32[8,2]) -> f32[4,2] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,2]{1,0} parameter(1)
  ROOT %convolution.62 = f32[4,2]{1,0} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}

%fused_computation.10 (param_0.1: f32[4,2]) -> f32[4,2] {
  %param_0.1 = f32[4,2]{1,0} parameter(0)
  ROOT %add.1 = f32[4,2]{1,0} add(%param_0.1, %param_0.1), metadata={op_name="jit(train_step)/add" stack_frame_id=3}
}

ENTRY %main (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %fwd = f32[4,8]{1,0} multiply(%p0, %p0), metadata={op_name="jit(train_step)/jvp(UNet)/Layer1/ResBlock1/Conv_0/mul" stack_frame_id=1}
  %bwd = f32[8,2]{1,0} negate(%p1), metadata={op_name="jit(train_step)/transpose(jvp(UNet))/Layer1/ResBlock1/Conv_0/neg" stack_frame_id=2}
  %ynn_fusion.9 = f32[4,2]{1,0} fusion(%fwd, %bwd), kind=kCustom, calls=%fused_computation.9
  %copy.1 = f32[4,2]{1,0} copy(%ynn_fusion.9)
  ROOT %loop_fusion = f32[4,2]{1,0} fusion(%copy.1), kind=kLoop, calls=%fused_computation.10
}
"""


def test_hlo_op_names_from_metadata_roots_and_operands():
  names = profiling.hlo_op_names(HLO)
  assert names["fwd"] == "jit(train_step)/jvp(UNet)/Layer1/ResBlock1/Conv_0/mul"
  # No metadata and a root without any: its operands', the backward one first.
  assert names["ynn_fusion.9"] == names["bwd"]
  assert names["copy.1"] == names["bwd"]  # Through a chain of such ops.
  assert names["loop_fusion"] == "jit(train_step)/add"  # Its fused computation's root's.
  assert "p0" not in names


def test_copy_instructions_counts_the_copies_outside_fusions():
  root, p1 = "  ROOT %add.1 = f32[4,2]{1,0} add(", "  %p1 = f32[8,2]{1,0} parameter(1)\n"
  hlo = HLO.replace(root, "  %copy.9 = f32[4,2]{1,0} copy(%param_0.1)\n" + root)
  hlo = hlo.replace(p1, p1 + "  %copy.2 = bf16[8,2]{0,1} copy(%p1)\n")
  # copy.1 (f32[4,2]) and copy.2 (bf16[8,2]) in ENTRY; copy.9 is inside a fusion.
  assert profiling.copy_instructions(hlo) == {"count": 2, "bytes": 4 * 8 + 2 * 16}
  assert profiling.copy_instructions(HLO) == {"count": 1, "bytes": 32}


@pytest.mark.parametrize("op_name, expected", [
    ("jit(train_step)/jvp(UNet)/Layer6/attention_layer/vmap()/reduce_sum",
     (profiling.FORWARD, "Layer6/attention_layer")),
    ("jit(train_step)/transpose(jvp(UNet))/Layer6/attention_layer/vmap()/reduce_sum",
     (profiling.BACKWARD, "Layer6/attention_layer")),
    ("jit(train_step)/transpose(jvp(UNet))/late_conv/conv_general_dilated",
     (profiling.BACKWARD, "late_conv")),
    ("jit(train_step)/jvp(UNet)/concatenate", (profiling.FORWARD, "UNet")),
    ("jit(train_step)/jvp(jit(_normal))/mul", (profiling.FORWARD, "_normal")),
    ("jit(train_step)/add", (profiling.REST, "add")),
])
def test_phase_and_module(op_name, expected):
  assert profiling.phase_and_module(op_name) == expected


def _meta(pid, tid=None, process=None, thread=None):
  if process is not None:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": thread}}


def _event(pid, tid, event_name, dur, **args):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": event_name,
          **({"args": args} if args else {})}


def test_op_times_on_a_cpu_trace():
  """The XLA client threads' ops, without the executor's bookkeeping or Python."""
  events = [_meta(1, process="/host:CPU"), _meta(1, 10, thread="python"),
            _meta(1, 11, thread="tf_XLAPjRtCpuClient/1"), _meta(1, 12, thread="tf_XLAEigen/2"),
            _event(1, 10, "PjitFunction(train_step)", 900.0),
            _event(1, 11, "ThunkExecutor::Execute", 800.0),
            _event(1, 11, "end: ynn_fusion.9", 1.0),
            _event(1, 11, "ynn_fusion.9", 300.0), _event(1, 12, "ynn_fusion.9", 100.0),
            _event(1, 11, "fwd", 50.0)]
  assert profiling.op_times(events) == {"ynn_fusion.9": (400.0, 2), "fwd": (50.0, 1)}


def test_op_times_of_one_program():
  """Ops of other programs traced in the same window (a sample grid) are left out; ops
  that name no program are kept."""
  events = [_meta(1, process="/host:CPU"), _meta(1, 11, thread="tf_XLAPjRtCpuClient/1"),
            _event(1, 11, "fwd", 50.0, hlo_module="jit_train_step", hlo_op="fwd"),
            _event(1, 11, "bwd", 70.0, hlo_module="jit_train_step(8841)", hlo_op="bwd"),
            _event(1, 11, "fwd", 900.0, hlo_module="jit_sample", hlo_op="fwd"),
            _event(1, 11, "copy.1", 5.0)]
  assert profiling.hlo_module_name(HLO) == "jit_train_step"
  assert profiling.op_times(events, "jit_train_step") == {
      "fwd": (50.0, 1), "bwd": (70.0, 1), "copy.1": (5.0, 1)}
  assert profiling.op_times(events)["fwd"] == (950.0, 2)


def test_op_times_on_a_gpu_trace():
  """The device's ``XLA Ops`` line when there is one (its streams would count twice), keyed
  by ``hlo_op`` or by the event's HLO text's instruction name; else its streams."""
  events = [_meta(1, process="/host:CPU"), _meta(1, 10, thread="tf_XLAPjRtClient"),
            _meta(2, process="/device:GPU:0"), _meta(2, 20, thread="Stream #13(Compute)"),
            _meta(2, 21, thread="XLA Ops"), _meta(2, 22, thread="XLA Modules"),
            _event(1, 10, "host_op", 5.0), _event(2, 22, "jit_train_step", 500.0),
            _event(2, 20, "sm90_xmma_fprop", 120.0, hlo_op="fwd"),
            _event(2, 21, "fwd", 130.0, hlo_op="fwd"),
            _event(2, 21, "%loop_fusion = f32[4,2]{1,0} fusion(%copy.1), kind=kLoop", 20.0)]
  assert profiling.op_times(events) == {"fwd": (130.0, 1), "loop_fusion": (20.0, 1)}
  streams_only = [e for e in events if e.get("tid") != 21]
  assert profiling.op_times(streams_only) == {"fwd": (120.0, 1)}


def test_a_device_event_named_by_its_op_name_path_is_summed_under_it():
  """Some GPU traces give a kernel its JAX scope in ``args.name`` rather than an HLO op."""
  path = "jit(train_step)/transpose(jvp(UNet))/Layer3/ResBlock2/conv2/conv_general_dilated"
  events = [_meta(2, process="/device:GPU:0"), _meta(2, 20, thread="Stream #13(Compute)"),
            _event(2, 20, "sm90_xmma_dgrad", 300.0, name=path),
            _event(2, 20, "sm90_xmma_wgrad", 100.0, name=path)]
  times = profiling.op_times(events)
  assert times == {path: (400.0, 2)}
  s = profiling.summarize(times, {}, steps=1)
  module = s["modules"][0]
  assert (module["phase"], module["module"], module["share"]) == (
      profiling.BACKWARD, "Layer3/ResBlock2", 1.0)
  assert module["ms"] == pytest.approx(0.4)


def test_mostly_unnamed_op_time_points_at_command_buffers():
  s = profiling.summarize({"kernel_a": (900.0, 1), "fwd": (100.0, 1)},
                          profiling.hlo_op_names(HLO), steps=1)
  assert "90 % of the op time has no HLO name" in profiling.format_summary(s)
  assert "--xla_gpu_enable_command_buffer=" in profiling.format_summary(s)
  named = profiling.summarize({"fwd": (100.0, 1)}, profiling.hlo_op_names(HLO), steps=1)
  assert "no HLO name" not in profiling.format_summary(named)


def test_summarize_per_step_by_phase_module_and_op():
  names = profiling.hlo_op_names(HLO)
  times = {"fwd": (3000.0, 3), "ynn_fusion.9": (6000.0, 3), "loop_fusion": (600.0, 3),
           "unknown.1": (400.0, 2)}
  s = profiling.summarize(times, names, steps=2)
  assert s["steps"] == 2 and s["op_ms_per_step"] == pytest.approx(5.0)
  assert s["phases"][profiling.FORWARD] == dict(ms=pytest.approx(1.5), share=pytest.approx(0.3))
  assert s["phases"][profiling.BACKWARD]["ms"] == pytest.approx(3.0)
  assert s["phases"][profiling.REST]["ms"] == pytest.approx(0.5)  # add + no metadata.
  assert [(m["phase"], m["module"], m["ms"]) for m in s["modules"]] == [
      (profiling.BACKWARD, "Layer1/ResBlock1", pytest.approx(3.0)),
      (profiling.FORWARD, "Layer1/ResBlock1", pytest.approx(1.5)),
      (profiling.REST, "add", pytest.approx(0.3)),
      (profiling.REST, "(no metadata)", pytest.approx(0.2))]
  assert s["ops"][0] == dict(op="ynn_fusion.9", op_name=names["bwd"], phase=profiling.BACKWARD,
                             module="Layer1/ResBlock1", ms=pytest.approx(3.0),
                             calls_per_step=1.5, share=pytest.approx(0.6))
  table = profiling.format_summary(s)
  assert "op time per step 5.0 ms over 2 traced steps" in table
  assert "| backward | Layer1/ResBlock1 | 3.0 | 60.0 % |" in table


def test_read_trace_events_takes_the_newest_and_says_when_there_is_none(tmp_path):
  with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
    profiling.read_trace_events(tmp_path)
  for run, events in (("2026_01_01", [1]), ("2026_01_02", [2])):
    (tmp_path / "plugins" / "profile" / run).mkdir(parents=True)
    with gzip.open(tmp_path / "plugins" / "profile" / run / "h.trace.json.gz", "wt") as f:
      json.dump({"traceEvents": events}, f)
  assert profiling.read_trace_events(tmp_path) == [2]


def test_a_real_trace_of_a_gradient_step(tmp_path):
  """A jitted step with a forward and a backward under ``UNet``-named scopes on the CPU:
  both phases are found and every op's time is counted once."""
  def loss(w, x):
    with jax.named_scope("UNet"), jax.named_scope("Layer1"), jax.named_scope("dense"):
      return jnp.sum(jnp.tanh(x @ w) ** 2)

  def train_step(w, x):
    return w - 0.1 * jax.grad(loss)(w, x)

  @jax.jit
  def other_program(x):  # Traced in the same window; its ops are not the step's.
    return jnp.cos(x @ x.T) @ x

  w, x = jnp.ones((256, 256)) / 256, jnp.ones((512, 256))
  compiled = jax.jit(train_step).lower(w, x).compile()
  compiled(w, x).block_until_ready()
  other_program(x).block_until_ready()
  s = profiling.profile_calls(lambda: (compiled(w, x), other_program(x)), 3, tmp_path,
                              compiled.as_text())
  names = profiling.hlo_op_names(compiled.as_text())
  assert all(o["op"] in names for o in s["ops"])
  assert not any("cos" in o["op"] for o in s["ops"])
  assert s["steps"] == 3 and s["op_ms_per_step"] > 0
  assert {profiling.FORWARD, profiling.BACKWARD} <= set(s["phases"])
  assert sum(p["share"] for p in s["phases"].values()) == pytest.approx(1.0)
  assert any(m["module"] == "Layer1/dense" for m in s["modules"])
  assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))  # Kept for TensorBoard.


def test_a_summary_without_ops_says_so():
  s = profiling.summarize({}, {}, steps=3)
  assert s["op_ms_per_step"] == 0 and s["phases"] == {} and s["ops"] == []
  assert profiling.format_summary(s).startswith("no XLA op events found in the trace")


def test_the_bench_keeps_a_train_row_whose_profile_fails(monkeypatch):
  """The GPU trace layout is untested here: a profile that fails leaves its error in the
  row, and the row's timings stand."""
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
  # pylint: disable=g-import-not-at-top,import-error
  from bench import jax_rows, settings as bench_settings, timing
  from ddpm_jax.train_state import create_train_state  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise FileNotFoundError("no *.trace.json.gz under /x/plugins/profile")
  monkeypatch.setattr(profiling, "profile_calls", fail)
  config = micro_config(batch_size=2)
  devices = timing.Devices(jax.devices("cpu")[0], None, "CPU")
  settings = bench_settings.Settings(batch_sizes=(2,), dtypes=("float32",), reps=1, warmup=0,
                                     min_rep_s=0.0, ddim_steps=2, sample_timed_steps=0,
                                     reference_timed_steps=2, sample_reps=1,
                                     torch_compile=False, breakdown=False, profile=True,
                                     profile_dir=None, parts=("train",), quick=True,
                                     loop_steps_per_call=())
  initial = create_train_state(config)
  row = jax_rows.jax_train(config, "float32", 2, initial, devices, settings, breakdown=False,
                           profile=True)
  assert row["status"] == "ok" and row["step_ms"] > 0
  assert row["profile"] == dict(error="FileNotFoundError: no *.trace.json.gz under "
                                      "/x/plugins/profile", trace_dir=None)


def test_loop_profile_traces_its_steps_and_stops_early_or_on_an_error(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  hlo = f.lower(x).compile().as_text()
  profile = profiling.LoopProfile(tmp_path / "a", first=2, count=3)
  done, summary = 0, None
  while done < 8 and summary is None:
    profile.before_step(done)
    x = f(x)
    done += 1
    assert profile.active == (3 <= done <= 5)
    if profile.due(done):
      summary = profile.stop(done, x, lambda: hlo)
  assert done == 5 and not profile.active
  assert (summary["first_step"], summary["last_step"], summary["steps"]) == (3, 5, 3)
  assert json.loads((tmp_path / "a" / "summary.json").read_text()) == summary
  assert profile.stop(done, x, lambda: hlo) is None  # Once only.
  # A loop that ends (or fails) inside the window: stop() sums what ran, abort() just ends.
  early = profiling.LoopProfile(tmp_path / "b", first=0, count=10)
  early.before_step(0)
  x = f(x)
  assert early.stop(1, x, lambda: hlo)["steps"] == 1
  failed = profiling.LoopProfile(tmp_path / "c", first=0, count=10)
  failed.before_step(0)
  failed.abort()
  assert not failed.active and not (tmp_path / "c" / "summary.json").exists()
  failed.abort()  # Nothing to end.
