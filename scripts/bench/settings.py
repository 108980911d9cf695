"""The bench's flags (beside ``--config``, which ``ddpm_jax.cli.parse_flags`` defines) and
the :class:`Settings` they ask for."""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from ddpm_jax.errors import UserError

from .flops import PEAK_KEY

PARTS = ("train", "sample", "parity")

# Calls of the train step that --profile traces.
PROFILE_STEPS = 3

# --quick: CI-sized settings, applied to the flags not given on the command line. The
# loop's program is compiled once, at 2 steps a call: the k-step path, at the least cost.
QUICK = dict(batch_sizes=["8"], reps=2, warmup=1, min_rep_s=0.0, sample_timed_steps=4,
             reference_timed_steps=2, sample_reps=1, torch_compile=False,
             loop_steps_per_call=["2"])


def define_flags(fv: flags.FlagValues) -> None:
  """The bench's flags on ``fv``; ``--config`` and its overrides are the shared parser's."""
  flags.DEFINE_string("json", None, "Where to write every figure (JSON).", flag_values=fv)
  flags.DEFINE_bool("quick", False, "CI-sized run: batch 8, 2 timed repetitions, 4 sampler "
                    "steps, 2 steps of the original's sampler, no torch.compile, the loop's "
                    "program at 2 steps a call only (flags given explicitly still win).",
                    flag_values=fv)
  flags.DEFINE_list("batch_sizes", ["64", "256"], "Batch sizes of the train step and the "
                    "batched samplers.", flag_values=fv)
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "JAX compute dtypes (params stay "
                    "float32); the torch rows are float32.", flag_values=fv)
  flags.DEFINE_integer("reps", 5, "Timed repetitions per train figure (median reported).",
                       flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Untimed calls before timing a train step.",
                       flag_values=fv)
  flags.DEFINE_float("min_rep_s", 1.0, "A train repetition runs enough steps to last about "
                     "this long (0: one step).", flag_values=fv)
  flags.DEFINE_integer("ddim_steps", 50, "Steps of the DDIM sampler.", flag_values=fv)
  flags.DEFINE_integer("sample_timed_steps", 0, "If > 0, a batched sampler runs only this "
                       "many reverse steps and its img/s is scaled to the full count (every "
                       "step does the same work).", flag_values=fv)
  flags.DEFINE_integer("reference_timed_steps", 10, "Steps of the original's one-image "
                       "sampler that are timed; img/s is scaled to the full count.",
                       flag_values=fv)
  flags.DEFINE_integer("sample_reps", 3, "Timed repetitions per sampling figure.",
                       flag_values=fv)
  flags.DEFINE_bool("torch_compile", True, "Also time the original's step with the model "
                    "under torch.compile (minutes to compile on a CPU).", flag_values=fv)
  flags.DEFINE_list("parts", list(PARTS), "What to measure: 'train' (the train-step rows, "
                    "ratios and breakdown), 'sample' (the samplers and the original's loop) "
                    "and/or 'parity' (JAX's output, loss and gradients against the "
                    "original's, same weights, on this device). On a machine with a time "
                    "limit per command, run them apart.", flag_values=fv)
  flags.DEFINE_bool("breakdown", True, "Time forward, backward and optimizer+EMA of the "
                    "float32 step separately, for both frameworks (first batch size).",
                    flag_values=fv)
  flags.DEFINE_list("loop_steps_per_call", ["1", "10"], "With the train part, also time the "
                    "training loop's program (ddpm_jax.train.compile_train_steps: k steps "
                    "a call in one lax.scan, as --config.steps_per_call sets) for each k "
                    "given, at the first batch size and the first of --dtypes, every step on "
                    "the same batch: img/s per step beside the single step's. Empty: none.",
                    flag_values=fv)
  flags.DEFINE_bool("profile", True, f"Trace {PROFILE_STEPS} calls of the JAX step of the "
                    "first of --dtypes at the first batch size with jax.profiler and report "
                    "its op time by phase and UNet layer.", flag_values=fv)
  flags.DEFINE_string("profile_dir", None, "Keep that trace here, for Perfetto or "
                      "TensorBoard (default: a temporary folder, deleted).", flag_values=fv)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to measure and how often."""
  batch_sizes: tuple[int, ...]
  dtypes: tuple[str, ...]
  reps: int
  warmup: int
  min_rep_s: float
  ddim_steps: int
  sample_timed_steps: int
  reference_timed_steps: int
  sample_reps: int
  torch_compile: bool
  breakdown: bool
  profile: bool
  profile_dir: str | None
  parts: tuple[str, ...]
  quick: bool
  loop_steps_per_call: tuple[int, ...] = ()


def _positive_ints(name: str, values: list[str], example: str) -> tuple[int, ...]:
  try:
    ints = tuple(int(v) for v in values)
  except ValueError as e:
    raise UserError(f"--{name} must be integers, e.g. {example}: {e}") from e
  if ints and min(ints) < 1:
    raise UserError(f"--{name} must be positive, e.g. {example}; got {','.join(values)}")
  return ints


def settings_from_flags(fv: flags.FlagValues) -> Settings:
  """Applies ``--quick`` to the flags left at their defaults, then checks the values."""
  values = {name: fv[name].value for name in (
      "batch_sizes", "dtypes", "reps", "warmup", "min_rep_s", "ddim_steps",
      "sample_timed_steps", "reference_timed_steps", "sample_reps", "torch_compile",
      "breakdown", "profile", "profile_dir", "parts", "loop_steps_per_call")}
  if fv["quick"].value:
    values.update({k: v for k, v in QUICK.items() if not fv[k].present})
  batch_sizes = _positive_ints("batch_sizes", values.pop("batch_sizes"), "64,256")
  if not batch_sizes:
    raise UserError("--batch_sizes needs at least one positive batch size")
  loop_steps = _positive_ints("loop_steps_per_call", values.pop("loop_steps_per_call"), "1,10")
  dtypes = tuple(values.pop("dtypes"))
  bad = [d for d in dtypes if d not in PEAK_KEY]
  if bad or not dtypes:
    raise UserError(f"--dtypes must be some of {', '.join(PEAK_KEY)}; got {','.join(dtypes)}")
  parts = tuple(values.pop("parts"))
  if not parts or any(p not in PARTS for p in parts):
    raise UserError(f"--parts must be some of {','.join(PARTS)}; got {','.join(parts)}")
  for name in ("reps", "ddim_steps", "sample_reps"):
    if values[name] < 1:
      raise UserError(f"--{name} must be >= 1, got {values[name]}")
  if values["profile_dir"] and os.path.exists(values["profile_dir"]) and \
      not os.path.isdir(values["profile_dir"]):
    raise UserError(f"--profile_dir {values['profile_dir']} is a file; give a folder")
  if values["warmup"] < 0 or values["min_rep_s"] < 0:
    raise UserError("--warmup and --min_rep_s must be >= 0")
  # A timed schedule needs two steps at least.
  timed = values["sample_timed_steps"]
  if not (timed == 0 or timed >= 2) or values["reference_timed_steps"] < 2:
    raise UserError("--sample_timed_steps must be 0 (all) or >= 2, and "
                    "--reference_timed_steps >= 2")
  return Settings(batch_sizes=batch_sizes, dtypes=dtypes, parts=parts,
                  quick=fv["quick"].value, loop_steps_per_call=loop_steps, **values)


def breakdown_and_profile(settings: Settings, batch_index: int, dtype: str
                          ) -> tuple[bool, bool]:
  """Whether the JAX train row of the ``batch_index``-th batch size and ``dtype`` gets the
  breakdown and the profile. The breakdown sets JAX's float32 step beside torch's, at the
  first batch size; the profile takes the first row, so that ``--dtypes bfloat16
  --batch_sizes 256`` profiles that step."""
  first_batch = batch_index == 0
  return (settings.breakdown and first_batch and dtype == "float32",
          settings.profile and first_batch and dtype == settings.dtypes[0])


def times_loop_program(settings: Settings, batch_index: int, dtype: str) -> bool:
  """Whether the loop's k-step program is timed beside that row: the first row, as the
  profile, so that ``--dtypes bfloat16`` times bfloat16's."""
  return bool(settings.loop_steps_per_call) and batch_index == 0 and \
      dtype == settings.dtypes[0]
