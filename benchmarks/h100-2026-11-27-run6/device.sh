#!/usr/bin/env bash
# One device call: bf16 batch-256 step with threefry vs rbg dropout keys, the bf16 loop,
# then the batch-64 train rows (eager, torch.compile, breakdown) in the time left.
set -u
start=$(date +%s)
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi -L; git log --oneline -1 2>/dev/null
B=(python3 scripts/bench.py --config configs/mnist.py)
part() {  # part NAME LIMIT cmd...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit $limit s, at $(( $(date +%s) - start )) s)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name: exit $? at $(( $(date +%s) - start )) s"
  grep -E "img/s|JAX jit|torch|MFU|error" "$OUT/$name.log" | tail -n 8
}
part b256 85 "${B[@]}" --parts train --batch_sizes 256 --dtypes bfloat16 --nobreakdown \
  --noprofile --notorch_compile --json "$OUT/b256.json"
JAX_DEFAULT_PRNG_IMPL=rbg part b256rbg 85 "${B[@]}" --parts train --batch_sizes 256 \
  --dtypes bfloat16 --nobreakdown --noprofile --notorch_compile --json "$OUT/b256rbg.json"
mkdir -p "$OUT/loop"
echo "== loop bf16 at $(( $(date +%s) - start )) s"
GPU_BENCH_PARTS=loop GPU_BENCH_LIMITS=110 GPU_BENCH_LOOP_FLAGS=--config.model.dtype=bfloat16 \
  scripts/gpu_bench.sh "$OUT/loop"
left=$(( 575 - ($(date +%s) - start) ))
part t64 "$left" "${B[@]}" --parts train --batch_sizes 64 --novariant_steps --noprofile \
  --json "$OUT/t64.json"
echo "== done at $(( $(date +%s) - start )) s"
