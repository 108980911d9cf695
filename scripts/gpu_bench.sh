#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md in one command that fits a 10-minute limit per command:
# the train rows at batch 64, the samplers at batch 64, the train rows at batch 256, the
# samplers at batch 256, each part a bench.py run under its own time limit. bench.py
# rewrites its JSON after every row, so a part cut short keeps what it measured.
#
#   scripts/gpu_bench.sh OUTDIR [CONFIG [bench.py flags...]]
#
# CONFIG defaults to configs/mnist.py (the original UNET). GPU_BENCH_LIMITS overrides the
# four parts' limits in seconds (default "200 100 150 120": 570 s in all). Writes
# OUTDIR/bench_<part>.json and .log for each part (8 files: what a device call returns).
set -u
out=${1:?usage: scripts/gpu_bench.sh OUTDIR [CONFIG [bench.py flags...]]}
config=${2:-configs/mnist.py}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out" || exit 1
cd "$(dirname "$0")/.." || exit 1
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
read -r -a limits <<< "${GPU_BENCH_LIMITS:-200 100 150 120}"
if [ "${#limits[@]}" -ne 4 ]; then
  echo "error: GPU_BENCH_LIMITS needs four numbers of seconds, got '${GPU_BENCH_LIMITS}'" >&2
  exit 2
fi
nvidia-smi -L 2>&1 || echo "no nvidia-smi"

status=0
part() {  # part NAME LIMIT_S bench.py-flags...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$python" scripts/bench.py --config "$config" \
    --json "$out/bench_$name.json" "$@" > "$out/bench_$name.log" 2>&1
  local code=$?
  tail -n 25 "$out/bench_$name.log"
  echo "== $name: exit $code$([ "$code" -eq 124 ] && echo ' (time limit: the JSON holds the rows measured)')"
  [ "$code" -eq 0 ] || status=1
}
part train64 "${limits[0]}" --parts train --batch_sizes 64 "$@"
part sample64 "${limits[1]}" --parts sample --batch_sizes 64 "$@"
part train256 "${limits[2]}" --parts train --batch_sizes 256 --nobreakdown "$@"
part sample256 "${limits[3]}" --parts sample --batch_sizes 256 "$@"
exit $status
