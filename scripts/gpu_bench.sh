#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md in one command that fits a 10-minute limit per command.
# Six parts, each under its own time limit: bench.py's parity rows (JAX's output and
# gradients against the original's on the GPU), its train rows at batch 64, its samplers
# at batch 64, its train rows at batch 256, its samplers at batch 256 (bench.py rewrites
# its JSON after every row, so a part cut short keeps what it measured), and "loop":
# python -m ddpm_jax.train itself for GPU_BENCH_LOOP_STEPS steps (default 1500) on the
# bundled digits, whose metrics give the whole loop's time per step (data, dispatch,
# logging included), projected to the original's 70,275 steps.
#
#   scripts/gpu_bench.sh OUTDIR [CONFIG [bench.py flags...]]
#
# CONFIG defaults to configs/mnist.py (the original UNET). GPU_BENCH_LIMITS overrides the
# parts' limits in seconds (default "75 240 50 95 45 60": 565 s in all, from what each part
# took on the H100 of BENCHMARKS.md, with a margin). Writes OUTDIR/bench_<part>.json for
# the bench parts, OUTDIR/bench.log (every part's output), OUTDIR/loop_metrics.jsonl and
# OUTDIR/bench_gpu.json, the bench parts merged (8 files, as many as a device call returns).
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
read -r -a limits <<< "${GPU_BENCH_LIMITS:-75 240 50 95 45 60}"
if [ "${#limits[@]}" -ne 6 ]; then
  echo "error: GPU_BENCH_LIMITS needs six numbers of seconds, got '${GPU_BENCH_LIMITS}'" >&2
  exit 2
fi
loop_steps=${GPU_BENCH_LOOP_STEPS:-1500}
nvidia-smi -L 2>&1 || echo "no nvidia-smi"

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
bench parity "${limits[0]}" --parts parity "$@"
bench train64 "${limits[1]}" --parts train --batch_sizes 64 "$@"
bench sample64 "${limits[2]}" --parts sample --batch_sizes 64 "$@"
# At batch 256 no target needs torch.compile, the breakdown or the profile, and the
# samplers run a quarter of their steps (img/s scaled to the full count) to fit the limit.
bench train256 "${limits[3]}" --parts train --batch_sizes 256 --nobreakdown --noprofile \
  --notorch_compile "$@"
bench sample256 "${limits[4]}" --parts sample --batch_sizes 256 --sample_timed_steps 250 \
  --sample_reps 2 "$@"

workdir=$(mktemp -d)
# A constant rate: the loop's time per step does not depend on it, and a cosine decay
# (configs/mnist_tiny.py) would refuse a run no longer than its warm-up.
run_part loop "${limits[5]}" "$python" -m ddpm_jax.train --config "$config" \
  --workdir "$workdir" --config.num_train_steps="$loop_steps" \
  --config.log_every_steps=$(( loop_steps / 8 > 0 ? loop_steps / 8 : 1 )) \
  --config.checkpoint_every_steps="$loop_steps" --config.lr_schedule=constant
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
rm -rf "$workdir" "$cache"

# One document and the tables for BENCHMARKS.md, from the bench parts that left a JSON.
parts=()
for name in parity train64 sample64 train256 sample256; do
  [ -s "$out/bench_$name.json" ] && parts+=("$out/bench_$name.json")
done
if [ "${#parts[@]}" -gt 0 ]; then
  "$python" scripts/bench_merge.py --json "$out/bench_gpu.json" "${parts[@]}" || status=1
fi
exit $status
