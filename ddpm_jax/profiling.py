"""Where a jitted step's time goes: a JAX profiler trace read back per phase and UNet layer.

:func:`profile_calls` runs a compiled function a few times under ``jax.profiler.trace``
and sums the trace's XLA op events by what each op computes: the forward pass, the
backward pass (ops whose JAX name is under ``transpose(jvp(...))``) or the rest (Adam, the
EMA, the finite check), and the UNet module it belongs to (``Layer6/attention_layer``). An
op's module comes from the ``op_name`` metadata that JAX attaches to every HLO instruction
(see :func:`hlo_op_names` for ops without it), read from the compiled program's text.

Op events are the device's on a GPU (the ``XLA Ops`` line of each ``/device:`` process, or
its streams, keyed by ``hlo_op`` or named by their ``op_name`` path) and the XLA CPU
client's threads on a CPU, where ops that run concurrently on several threads each count
their own time, so the per-step total can exceed the step's wall time. The CPU reading is
tested; the GPU one follows the trace format's documented layout and is untested here.
Kernels that XLA runs from command buffers (CUDA graphs) may carry no HLO name; the
summary then says how to profile without them.

The trace itself (``*.trace.json.gz``, ``*.xplane.pb``) stays in ``logdir`` for Perfetto
or TensorBoard.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import pathlib
import re
from typing import Any, Callable, Iterable, Iterator

import jax

# Host-side bookkeeping on the XLA CPU threads, not ops of the program.
_NOT_OPS = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "end: ")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*\{\s*$")
_WRAPPER = re.compile(r"^[\w]+\((.*)\)$")
_MODULE = re.compile(r"^HloModule ([\w.\-]+)", re.MULTILINE)

FORWARD, BACKWARD, REST = "forward", "backward", "optimizer, EMA, rest"
NO_METADATA = "(no metadata)"


def _instructions(hlo_text: str) -> Iterator[tuple[str | None, str, str, str]]:
  """``(computation, name, text after '=', line)`` of each instruction in HLO text."""
  computation = None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match and " = " not in line:
      computation = match.group(1)
      continue
    match = _INSTRUCTION.match(line)
    if match:
      yield computation, match.group(1), match.group(2), line


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Each HLO instruction's JAX ``op_name``.

  An instruction without one (XLA drops it from some rewritten ops) takes its fused
  computation's root's, else its operands' (a backward one first: a weight gradient's
  operands are a forward activation and a backward gradient). HLO text defines every
  name before its use, so one pass in order resolves chains of such instructions.
  """
  names: dict[str, str] = {}
  roots: dict[str, str] = {}
  for computation, name, rest, line in _instructions(hlo_text):
    found = _OP_NAME.search(rest)
    called = _CALLS.search(rest)
    if found:
      names[name] = found.group(1)
    elif called and called.group(1) in roots:
      names[name] = roots[called.group(1)]
    else:
      operands = [names[o] for o in _OPERAND.findall(rest.split("), ")[0]) if o in names]
      backward = [o for o in operands if "transpose(" in o]
      if backward or operands:
        names[name] = (backward or operands)[0]
    if line.lstrip().startswith("ROOT") and computation is not None and name in names:
      roots[computation] = names[name]
  return names


_COPY = re.compile(r"^(\w+)\[([\d,]*)\]\S* copy\(")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2,
                "f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}


def copy_instructions(hlo_text: str) -> dict:
  """The copies a compiled program runs as their own kernels (not inside a fusion):
  ``{"count": N, "bytes": B}``, B the bytes they write. XLA adds them, e.g., to keep a
  donated buffer's old value alive while an update writes the new one."""
  fused = set(re.findall(r"\bfusion\([^\n]*?calls=%?([\w.\-]+)", hlo_text))
  count = written = 0
  for computation, _, rest, _ in _instructions(hlo_text):
    copy = None if computation in fused else _COPY.match(rest)
    if copy:
      count += 1
      dims = [int(d) for d in copy.group(2).split(",") if d]
      written += _DTYPE_BYTES.get(copy.group(1), 4) * math.prod(dims)
  return dict(count=count, bytes=written)


def hlo_module_name(hlo_text: str) -> str | None:
  """The program's name in its HLO text (``jit_train_step``), as trace events give it."""
  match = _MODULE.search(hlo_text)
  return match.group(1) if match else None


def _unwrap(component: str) -> str:
  """``transpose(jvp(UNet))`` -> ``UNet``."""
  while (match := _WRAPPER.match(component)):
    component = match.group(1)
  return component


_LOOP_COMPONENTS = ("while", "body", "cond", "closed_call", "scan")


def phase_and_module(op_name: str, root: str = "UNet") -> tuple[str, str]:
  """``(phase, module)`` of a JAX ``op_name`` such as
  ``jit(train_step)/transpose(jvp(UNet))/Layer6/attention_layer/vmap()/reduce_sum``.

  The module is the path under ``root`` without the final primitive, at most two deep
  (``root`` itself for a primitive directly under it); outside ``root``, the first
  component below the jitted function, unwrapped.
  """
  parts = op_name.split("/")[1:] if op_name.startswith("jit(") else op_name.split("/")
  # The loop of several steps runs the step in a lax.scan: its ops sit under while/body.
  while parts and parts[0] in _LOOP_COMPONENTS:
    parts = parts[1:]
  head = parts[0] if parts else ""
  phase = BACKWARD if "transpose(" in head else FORWARD if "jvp(" in head else REST
  names = [_unwrap(p) for p in parts]
  if root in names:
    below = names[names.index(root) + 1:-1]
    return phase, "/".join(below[:2]) or root
  return phase, names[0] if names else "?"


def read_trace_events(logdir: str | pathlib.Path) -> list[dict]:
  """The newest ``*.trace.json.gz`` under ``logdir`` as a list of trace events."""
  paths = sorted(pathlib.Path(logdir).glob("plugins/profile/*/*.trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {logdir}/plugins/profile")
  with gzip.open(paths[-1], "rt") as f:
    return json.load(f)["traceEvents"]


def op_times(events: Iterable[dict], module: str | None = None
             ) -> dict[str, tuple[float, int]]:
  """``{op: (total microseconds, count)}`` over the trace's XLA op events.

  An op is keyed by its HLO instruction name, or by its JAX ``op_name`` path
  (``jit(train_step)/...``) where a device event carries that in ``args.name``. Given a
  ``module``, events of other programs (``args.hlo_module``: a sample grid or a transfer
  traced in the same window, named with or without a ``(fingerprint)``) are left out;
  events that name no program are kept.
  """
  events = list(events)
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  devices = {pid for pid, name in processes.items() if "/device:" in name}
  if devices:
    op_lines = {key for key, name in threads.items() if key[0] in devices and "XLA Ops" in name}
    keep = op_lines or {key for key, name in threads.items()
                        if key[0] in devices and name.startswith("Stream")}
  else:
    keep = {key for key, name in threads.items() if name.startswith("tf_XLA")}
  totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in keep:
      continue
    args = e.get("args") or {}
    if module is not None and args.get("hlo_module", module).split("(")[0] != module:
      continue
    if str(args.get("name", "")).startswith("jit("):
      name = args["name"]
    else:  # Device op lines may name an event by its HLO text, "%fusion.3 = f32[] ...".
      name = (args.get("hlo_op") or e["name"]).split(" = ")[0].lstrip("%")
    if name.startswith(_NOT_OPS):
      continue
    totals[name][0] += float(e.get("dur", 0.0))
    totals[name][1] += 1
  return {name: (us, count) for name, (us, count) in totals.items()}


def summarize(times: dict[str, tuple[float, int]], names: dict[str, str], steps: int,
              top: int = 12) -> dict:
  """Per-step milliseconds by phase, by (phase, module) and for the costliest ops."""
  by_phase: dict[str, float] = collections.Counter()
  by_module: dict[tuple[str, str], float] = collections.Counter()
  ops = []
  for op, (us, count) in times.items():
    op_name = names.get(op) or (op if op.startswith("jit(") else None)
    phase, module = phase_and_module(op_name) if op_name else (REST, NO_METADATA)
    ms = us / 1e3 / steps
    by_phase[phase] += ms
    by_module[(phase, module)] += ms
    ops.append(dict(op=op, op_name=op_name, phase=phase, module=module, ms=ms,
                    calls_per_step=count / steps))
  total = sum(by_phase.values())
  share = lambda ms: ms / total if total else 0.0
  modules = [dict(phase=p, module=m, ms=ms, share=share(ms))
             for (p, m), ms in sorted(by_module.items(), key=lambda kv: -kv[1])]
  ops.sort(key=lambda o: -o["ms"])
  return dict(steps=steps, op_ms_per_step=total,
              phases={p: dict(ms=ms, share=share(ms)) for p, ms in by_phase.items()},
              modules=modules[:top], ops=[dict(o, share=share(o["ms"])) for o in ops[:top]])


def summarize_trace(logdir: str | pathlib.Path, hlo_text: str, steps: int, top: int = 12
                    ) -> dict:
  """:func:`summarize` of the newest trace in ``logdir``: the ops of ``hlo_text``'s program,
  named from it."""
  times = op_times(read_trace_events(logdir), hlo_module_name(hlo_text))
  return summarize(times, hlo_op_names(hlo_text), steps, top)


def profile_calls(run: Callable[[], Any], steps: int, logdir: str | pathlib.Path,
                  hlo_text: str, top: int = 12) -> dict:
  """Traces ``steps`` calls of ``run`` (waited for) into ``logdir`` and summarizes them."""
  with jax.profiler.trace(str(logdir)):
    for _ in range(steps):
      jax.block_until_ready(run())
  return summarize_trace(logdir, hlo_text, steps, top)


class LoopProfile:
  """Traces steps ``first + 1 .. first + count`` of a training loop into ``logdir``.

  Call :meth:`before_step` with the number of steps done before each step and
  :meth:`due` after it; :meth:`stop` ends the trace (also early, at the end of a shorter
  run), summarizes it with the step program's HLO text and writes ``summary.json``.
  """

  def __init__(self, logdir: str | pathlib.Path, first: int, count: int):
    self.logdir, self.first, self.count = pathlib.Path(logdir), first, count
    self.active = False

  def before_step(self, done: int) -> None:
    if done == self.first and not self.active:
      jax.profiler.start_trace(str(self.logdir))
      self.active = True

  def due(self, done: int) -> bool:
    return self.active and done >= self.first + self.count

  def stop(self, done: int, state: Any, hlo_text: Callable[[], str]) -> dict | None:
    """Waits for ``state``, ends the trace and returns its summary (None if not tracing)."""
    if not self.active:
      return None
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    summary = dict(summarize_trace(self.logdir, hlo_text(), done - self.first),
                   first_step=self.first + 1, last_step=done)
    (self.logdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary

  def abort(self) -> None:
    """Ends a trace still running (the loop stopped with an error), keeping its files."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def format_summary(summary: dict) -> str:
  """The summary as markdown tables: phases, then modules, then ops."""
  if not summary["ops"]:
    return ("no XLA op events found in the trace (a layout this reader does not know); "
            "open the trace itself in Perfetto or TensorBoard")
  lines = [f"op time per step {summary['op_ms_per_step']:.1f} ms over {summary['steps']} "
           "traced steps", "", "| phase | ms | share |", "|---|---|---|"]
  for phase in (FORWARD, BACKWARD, REST):
    if phase in summary["phases"]:
      p = summary["phases"][phase]
      lines.append(f"| {phase} | {p['ms']:.1f} | {100 * p['share']:.1f} % |")
  lines += ["", "| phase | module | ms | share |", "|---|---|---|---|"]
  lines += [f"| {m['phase']} | {m['module']} | {m['ms']:.1f} | {100 * m['share']:.1f} % |"
            for m in summary["modules"]]
  lines += ["", "| op | phase | module | ms | share |", "|---|---|---|---|---|"]
  lines += [f"| {o['op']} | {o['phase']} | {o['module']} | {o['ms']:.1f} | "
            f"{100 * o['share']:.1f} % |" for o in summary["ops"]]
  unnamed = sum(m["share"] for m in summary["modules"] if m["module"] == NO_METADATA)
  if unnamed > 0.5:
    lines += ["", f"{100 * unnamed:.0f} % of the op time has no HLO name. On a GPU, kernels "
              "run from XLA command buffers (CUDA graphs) lose theirs: profile again with "
              "XLA_FLAGS=--xla_gpu_enable_command_buffer= (it changes the timing a little)."]
  return "\n".join(lines)
