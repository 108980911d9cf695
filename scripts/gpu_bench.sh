#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md in one command that fits a 10-minute limit per command.
# Parts, each under its own time limit (bench.py rewrites its JSON after every row, so a
# part cut short keeps what it measured):
#   parity     bench.py's parity rows (JAX's output and gradients against the original's;
#              only when named: measured once on the H100 of BENCHMARKS.md)
#   train64    its train rows at batch 64 (with the breakdown, the float32 profile and
#              the loop's program at 1 and 10 steps a call)
#   sample64   its samplers at batch 64
#   train256   its train rows at batch 256
#   sample256  its samplers at batch 256
#   loop       python -m ddpm_jax.train itself for GPU_BENCH_LOOP_STEPS steps (default
#              1500) on the bundled digits, whose metrics give the whole loop's time per
#              step (data, dispatch, logging included), projected to the original's 70,275;
#              GPU_BENCH_LOOP_FLAGS adds train flags (--config.model.dtype=bfloat16)
#   profile256 (only when named) the bfloat16 step at batch 256 in a profile, with XLA's
#              command buffers off so that the trace names each kernel (its timings are
#              not the ones to quote; left out of the merge)
#
#   scripts/gpu_bench.sh OUTDIR [CONFIG [bench.py flags...]]
#
# CONFIG defaults to configs/mnist.py (the original UNET). GPU_BENCH_PARTS lists the parts
# to run, in order (default "train64 sample64 train256 sample256 loop"); GPU_BENCH_LIMITS
# gives one limit in seconds per listed part (default: parity 75, train64 300, sample64
# 50, train256 95, sample256 45, loop 60, profile256 90; 550 s for the
# default five, from what each took on the H100 of BENCHMARKS.md, with a margin). Writes
# OUTDIR/bench_<part>.json for the bench parts, OUTDIR/bench.log (every part's output),
# OUTDIR/loop_metrics.jsonl and OUTDIR/bench_gpu.json, the bench parts merged (a device
# call returns 8 files at most: 7 for the default parts). A Python that cannot import the
# parts' modules, even after installing the wheels in .whl/ (`make gpu-wheels`), is a
# one-line error and exit status 2 before any part.
set -u
out=${1:?usage: scripts/gpu_bench.sh OUTDIR [CONFIG [bench.py flags...]]}
config=${2:-configs/mnist.py}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# One XLA compilation cache for all parts: the loop part then loads the float32 batch-64
# train step that train64 compiled (each bench part's own programs differ in shape).
cache=$(mktemp -d)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$cache}
declare -A default_limit=([parity]=75 [train64]=300 [sample64]=50 [train256]=95
                         [sample256]=45 [loop]=60 [profile256]=90)
read -r -a parts <<< "${GPU_BENCH_PARTS:-train64 sample64 train256 sample256 loop}"
limits=()
for part in "${parts[@]}"; do
  if [ -z "${default_limit[$part]:-}" ]; then
    echo "error: GPU_BENCH_PARTS has '$part'; the parts are parity train64 sample64" \
      "train256 sample256 loop profile256" >&2
    exit 2
  fi
  limits+=("${default_limit[$part]}")
done
if [ -n "${GPU_BENCH_LIMITS:-}" ]; then
  read -r -a limits <<< "$GPU_BENCH_LIMITS"
  if [ "${#limits[@]}" -ne "${#parts[@]}" ]; then
    echo "error: GPU_BENCH_LIMITS needs one number of seconds for each of the" \
      "${#parts[@]} parts (${parts[*]}), got '${GPU_BENCH_LIMITS}'" >&2
    exit 2
  fi
fi
loop_steps=${GPU_BENCH_LOOP_STEPS:-1500}
nvidia-smi -L 2>&1 || echo "no nvidia-smi"
# Every part's modules, checked (and installed from .whl/ where the machine lacks them)
# before the first part: scripts/gpu_python.sh.
source scripts/gpu_python.sh
gpu_python "$python" "$cache/site" ddpm_jax.train torch reference_torch || exit 2

status=0
run_part() {  # run_part NAME LIMIT_S command...: the command's output goes to bench.log.
  local name=$1 limit=$2 log code
  shift 2
  echo "== $name (limit ${limit} s)"
  log=$(mktemp)
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  code=$?
  { echo "== $name"; cat "$log"; } >> "$out/bench.log"
  grep -E '^\[|^error' "$log" | tail -n 12
  rm -f "$log"
  echo "== $name: exit $code$([ "$code" -eq 124 ] && echo ' (time limit)')"
  [ "$code" -eq 0 ] || status=1
}
bench() {  # bench NAME LIMIT_S bench.py-flags...
  local name=$1 limit=$2
  shift 2
  run_part "$name" "$limit" "$python" scripts/bench.py --config "$config" \
    --json "$out/bench_$name.json" "$@"
}
# The training loop itself, timed from its metrics; $1 is its limit.
loop() {
  local workdir loop_flags
  workdir=$(mktemp -d)
  # GPU_BENCH_LOOP_FLAGS holds more train flags, split at spaces.
  read -r -a loop_flags <<< "${GPU_BENCH_LOOP_FLAGS:-}"
  # A constant rate: the loop's time per step does not depend on it, and a cosine decay
  # (configs/mnist_tiny.py) would refuse a run no longer than its warm-up.
  run_part loop "$1" "$python" -m ddpm_jax.train --config "$config" \
    --workdir "$workdir" --config.num_train_steps="$loop_steps" \
    --config.log_every_steps=$(( loop_steps / 8 > 0 ? loop_steps / 8 : 1 )) \
    --config.checkpoint_every_steps="$loop_steps" --config.lr_schedule=constant \
    ${loop_flags[@]+"${loop_flags[@]}"}
  if [ -s "$workdir/metrics.jsonl" ]; then
    cp "$workdir/metrics.jsonl" "$out/loop_metrics.jsonl"
    "$python" - "$out/loop_metrics.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
if len(records) < 3:
  sys.exit(f"loop: {len(records)} metrics lines; too few to time (the first holds the compile)")
# From the first line on (compilation before it): wall time per step of the whole loop.
first, last = records[0], records[-1]
per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
print(f"loop: steps {first['step']}..{last['step']}: {1e3 * per_step:.2f} ms/step, "
      f"{70275 * per_step / 60:.1f} min for the original's 70,275 steps (loop only, "
      "no compile, no checkpoints)")
EOF
  fi
  rm -rf "$workdir"
}

for i in "${!parts[@]}"; do
  limit=${limits[$i]}
  case ${parts[$i]} in
    parity) bench parity "$limit" --parts parity "$@" ;;
    train64) bench train64 "$limit" --parts train --batch_sizes 64 "$@" ;;
    sample64) bench sample64 "$limit" --parts sample --batch_sizes 64 "$@" ;;
    # At batch 256 no target needs torch.compile, the breakdown, the profile or the loop's
    # program, and the samplers run a quarter of their steps (img/s scaled to the full
    # count).
    train256) bench train256 "$limit" --parts train --batch_sizes 256 --nobreakdown \
      --noprofile --notorch_compile --loop_steps_per_call= "$@" ;;
    sample256) bench sample256 "$limit" --parts sample --batch_sizes 256 \
      --sample_timed_steps 250 --sample_reps 2 "$@" ;;
    profile256) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
      bench profile256 "$limit" --parts train --batch_sizes 256 --dtypes bfloat16 \
      --nobreakdown --notorch_compile --loop_steps_per_call= --reps 2 "$@" ;;
    loop) loop "$limit" ;;
  esac
done
rm -rf "$cache"

# One document and the tables for BENCHMARKS.md, from the bench parts that left a JSON
# (not profile256's, whose timings ran without command buffers).
documents=()
for name in parity train64 sample64 train256 sample256; do
  [ -s "$out/bench_$name.json" ] && documents+=("$out/bench_$name.json")
done
if [ "${#documents[@]}" -gt 0 ]; then
  "$python" scripts/bench_merge.py --json "$out/bench_gpu.json" "${documents[@]}" || status=1
fi
exit $status
