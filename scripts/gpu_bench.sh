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
# OUTDIR/bench_<part>.json for each part, OUTDIR/bench.log (every part's output) and
# OUTDIR/bench_gpu.json, the parts merged (6 files; a device call returns up to 8).
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
  local log
  log=$(mktemp)
  timeout -k 10 "$limit" "$python" scripts/bench.py --config "$config" \
    --json "$out/bench_$name.json" "$@" > "$log" 2>&1
  local code=$?
  { echo "== $name"; cat "$log"; } >> "$out/bench.log"
  grep '^\[' "$log" | tail -n 12
  rm -f "$log"
  echo "== $name: exit $code$([ "$code" -eq 124 ] && echo ' (time limit: the JSON holds the rows measured)')"
  [ "$code" -eq 0 ] || status=1
}
part train64 "${limits[0]}" --parts train --batch_sizes 64 "$@"
part sample64 "${limits[1]}" --parts sample --batch_sizes 64 "$@"
part train256 "${limits[2]}" --parts train --batch_sizes 256 --nobreakdown "$@"
part sample256 "${limits[3]}" --parts sample --batch_sizes 256 "$@"
# One document and the tables for BENCHMARKS.md, from the parts that left a JSON.
parts=()
for name in train64 sample64 train256 sample256; do
  [ -s "$out/bench_$name.json" ] && parts+=("$out/bench_$name.json")
done
if [ "${#parts[@]}" -gt 0 ]; then
  "$python" scripts/bench_merge.py --json "$out/bench_gpu.json" "${parts[@]}" || status=1
fi
exit $status
