#!/usr/bin/env bash
# The original's configuration trained on one GPU, sampled and scored, in one command that
# fits a 10-minute limit (RESULTS.md, "The original's configuration on a GPU"). In order,
# each step under its own time limit, all of them under a total one:
#   train          python -m ddpm_jax.train --config CONFIG (configs/mnist.py: the 35.2M
#                  UNet, batch 64, Adam 2e-5, EMA 0.9999) in bfloat16 on the bundled 8,000
#                  digits to STEPS (the original's 70,275), resuming the workdir's last
#                  checkpoint. Cut by its time limit, it saves a checkpoint at the step it
#                  reached (SIGTERM); killed outright, the last periodic one (every
#                  GPU_PROOF_CHECKPOINT_EVERY steps) is what the later steps sample.
#   sample_ddim    10,000 samples by DDIM-50 with --eta 0 --no_clip_denoised: the DDIM
#                  paper's deterministic sampler, whose figures compare with published
#                  ones, rather than the sample CLI's default (eta 1, x0 clipped), chosen on
#                  the undertrained CPU demo (GPU_PROOF_DDIM_FLAGS replaces these flags);
#   grid           samples.png, the first 64 of them;
#   evaluate_ddim  python -m ddpm_jax.evaluate on them -> evaluation_ddim.json (its last
#                  line, the JSON);
#   sample_ddpm    1,000 samples by the original's DDPM-1000, with reverse.png (the
#                  original's reverse-process strip of the first 8);
#   evaluate_ddpm  -> evaluation_ddpm.json;
#   parity         (only with GPU_PROOF_PARITY=1, if time is left) scripts/train_parity.py:
#                  GPU_PROOF_PARITY_STEPS steps of JAX against the PyTorch original from
#                  the same start -> parity/parity.json, parity/loss_curves.png.
#
#   scripts/gpu_proof.sh [OUTDIR]
#
# OUTDIR (or GPU_PROOF_OUT; default results/mnist-gpu) receives only small files, 8 at most:
# the above, the run's metrics.jsonl, and command.log (each command with its start time,
# limit, seconds, exit status and output's tail, then the summary printed at the end: the
# step reached, the training loop's ms a step from this run's metrics lines, and each
# sampler's scores). An
# OUTDIR that already holds any of them is refused unless GPU_PROOF_OVERWRITE=1, which
# deletes them first. The run (checkpoints, config.json, metrics.jsonl) goes to
# GPU_PROOF_WORKDIR (default a new temporary folder, never inside OUTDIR), with the samples'
# npz files and each step's whole output in its gpu_proof/ folder; nothing there is deleted.
# Run again with the same GPU_PROOF_WORKDIR to train on from its last checkpoint.
#
# Environment (defaults in brackets):
#   GPU_PROOF_CONFIG [configs/mnist.py]  GPU_PROOF_STEPS [70275]  GPU_PROOF_DTYPE [bfloat16]
#   GPU_PROOF_CHECKPOINT_EVERY [5000]    GPU_PROOF_TRAIN_FLAGS: more train flags []
#   GPU_PROOF_DDIM_SAMPLES [10000]  GPU_PROOF_DDIM_STEPS [50]  GPU_PROOF_DDPM_SAMPLES [1000]
#   GPU_PROOF_SAMPLE_BATCH [1000]   GPU_PROOF_SEED [0]  GPU_PROOF_GRID [64]
#   GPU_PROOF_PARITY [0]  GPU_PROOF_PARITY_STEPS [1000]  GPU_PROOF_OVERWRITE [0]
#   Time limits in seconds: GPU_PROOF_TOTAL_LIMIT [570] for the whole; per step
#   GPU_PROOF_TRAIN_LIMIT [420], GPU_PROOF_SAMPLE_LIMIT [120] (each sampler),
#   GPU_PROOF_EVAL_LIMIT [60] (each evaluation and the grid), GPU_PROOF_PARITY_LIMIT [300],
#   each cut to what is left of the total (a step with under 10 s left is skipped). The
#   default train limit leaves ~150 s for the rest, which BENCHMARKS.md's H100 sampling
#   rates put at ~120 s with compilation; training stopped by its limit has 60 s to save.
#   At the bfloat16 step's 8.39 ms (BENCHMARKS.md, one H100) it reaches about 50,000 of
#   the 70,275 steps (about 33,000 at the 10.8 ms of the loop measured before it ran
#   steps_per_call steps a call); the rest take further runs with the same
#   GPU_PROOF_WORKDIR (on the same machine: the checkpoints stay in the workdir).
#   GPU_WHEELS [.whl]: wheels to install where Python lacks a module (below).
#   PYTHON [python3].
#
# On a GPU machine whose Python lacks a module the steps import (ml_collections, in the
# image BENCHMARKS.md's H100s ran), the wheels in .whl/ are installed first: run
# `make gpu-wheels` on a machine that reaches PyPI and bring .whl/ along.
#
# Exit status: 0 when training reached STEPS and every step ran and exited 0; 1 otherwise
# (the files of the steps that ran are kept); 2 for a refused OUTDIR, a bad setting or a
# Python that cannot import the steps' modules (one line on stderr, before any step).
set -u
die() { echo "error: $*" >&2; exit 2; }
setting() {  # setting NAME DEFAULT: the variable's value, a whole number of at least 0.
  local value=${!1:-$2}
  [[ $value =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$value'"
  echo "$value"
}
root=$(cd "$(dirname "$0")/.." && pwd) || exit 2
out=${1:-${GPU_PROOF_OUT:-$root/results/mnist-gpu}}
config=${GPU_PROOF_CONFIG:-configs/mnist.py}
dtype=${GPU_PROOF_DTYPE:-bfloat16}
read -r -a train_flags <<< "${GPU_PROOF_TRAIN_FLAGS:-}"
read -r -a ddim_flags <<< "${GPU_PROOF_DDIM_FLAGS---eta 0 --no_clip_denoised}"
steps=$(setting GPU_PROOF_STEPS 70275) || exit 2
checkpoint_every=$(setting GPU_PROOF_CHECKPOINT_EVERY 5000) || exit 2
ddim_samples=$(setting GPU_PROOF_DDIM_SAMPLES 10000) || exit 2
ddim_steps=$(setting GPU_PROOF_DDIM_STEPS 50) || exit 2
ddpm_samples=$(setting GPU_PROOF_DDPM_SAMPLES 1000) || exit 2
sample_batch=$(setting GPU_PROOF_SAMPLE_BATCH 1000) || exit 2
seed=$(setting GPU_PROOF_SEED 0) || exit 2
grid=$(setting GPU_PROOF_GRID 64) || exit 2
parity=$(setting GPU_PROOF_PARITY 0) || exit 2
parity_steps=$(setting GPU_PROOF_PARITY_STEPS 1000) || exit 2
overwrite=$(setting GPU_PROOF_OVERWRITE 0) || exit 2
total_limit=$(setting GPU_PROOF_TOTAL_LIMIT 570) || exit 2
train_limit=$(setting GPU_PROOF_TRAIN_LIMIT 420) || exit 2
sample_limit=$(setting GPU_PROOF_SAMPLE_LIMIT 120) || exit 2
eval_limit=$(setting GPU_PROOF_EVAL_LIMIT 60) || exit 2
parity_limit=$(setting GPU_PROOF_PARITY_LIMIT 300) || exit 2
for count in steps checkpoint_every ddim_samples ddpm_samples sample_batch grid; do
  [ "${!count}" -gt 0 ] || die "GPU_PROOF_${count^^} must be at least 1"
done
python=${PYTHON:-python3}

# Paths given are taken from the current folder; the commands run in the repository's root.
(cd "$root" && [ -f "$config" ]) || die "GPU_PROOF_CONFIG $config: no such file in $root"
out=$(realpath -m "$out") || exit 2
if [ -n "${GPU_PROOF_WORKDIR:-}" ]; then
  workdir=$(realpath -m "$GPU_PROOF_WORKDIR") || exit 2
  case "$workdir/" in
    "$out/"*) die "GPU_PROOF_WORKDIR $workdir lies inside the output folder $out; the" \
                  "checkpoints belong elsewhere" ;;
  esac
fi
outputs=(command.log metrics.jsonl samples.png evaluation_ddim.json reverse.png
         evaluation_ddpm.json parity/parity.json parity/loss_curves.png)
present=()
for name in "${outputs[@]}"; do
  [ -e "$out/$name" ] && present+=("$name")
done
if [ "${#present[@]}" -gt 0 ]; then
  [ "$overwrite" = 1 ] || die "$out already holds ${present[*]}; set" \
    "GPU_PROOF_OVERWRITE=1 to replace them, or name another output folder"
  (cd "$out" && rm -f "${present[@]}") || die "cannot delete the old files in $out"
fi
mkdir -p "$out" || die "cannot create the output folder $out"
workdir=${workdir:-$(mktemp -d "${TMPDIR:-/tmp}/ddpm_jax_gpu_proof.XXXXXX")} || exit 2
cd "$root" || exit 2
scratch=$workdir/gpu_proof
mkdir -p "$scratch" || exit 2
export PYTHONUNBUFFERED=1
# One XLA compilation cache beside the run: a resumed run loads its train step from it.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$scratch/xla_cache}
log=$out/command.log
start_time=$SECONDS
deadline=$(( SECONDS + total_limit ))
{ echo "gpu_proof.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '(no git)')," \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ); the run in $workdir"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; } | tee "$log"

# The Python that runs every step, checked before the first: the modules the steps import
# (installed from .whl/ where the machine lacks them; scripts/gpu_python.sh).
modules=(ddpm_jax.train ddpm_jax.sample ddpm_jax.evaluate)
[ "$parity" = 1 ] && modules+=(torch reference_torch)
source scripts/gpu_python.sh
gpu_python "$python" "$scratch/site" "${modules[@]}" > "$scratch/python.log" \
  2> "$scratch/python.err"
code=$?
tee -a "$log" < "$scratch/python.log"
if [ "$code" -ne 0 ]; then
  tee -a "$log" < "$scratch/python.err" >&2
  exit 2
fi

status=0
run_step() {  # run_step NAME LIMIT_S GRACE_S command...: runs it, logs it; its exit status.
  local name=$1 limit=$2 grace=$3 left begin began code seconds ended
  shift 3
  left=$(( deadline - SECONDS ))
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped, $left s left of the total limit ($total_limit s)" |
      tee -a "$log"
    status=1
    return 125
  fi
  echo "== $name (limit $limit s)"
  began=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  begin=$(date +%s.%N)
  timeout -k "$grace" "$limit" "$@" > "$scratch/$name.log" 2>&1
  code=$?
  seconds=$(awk -v a="$begin" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  ended="== $name: exit $code after $seconds s"
  case $code in
    124) ended+=" (time limit)" ;;
    137) ended+=" (time limit; killed $grace s after it)" ;;
  esac
  {
    echo "== $name: start $began, limit $limit s"
    printf '$'; printf ' %q' "$@"; echo
    # The output's last 40 lines, a progress bar's redraws reduced to the last one.
    tr '\r' '\n' < "$scratch/$name.log" | awk 'NF' | awk '
      /[0-9]+%\|/ { bar = $0; next }
      { if (bar != "") print bar; bar = ""; print }
      END { if (bar != "") print bar }' | tail -n 40
    echo "$ended"
  } >> "$log"
  tr '\r' '\n' < "$scratch/$name.log" | grep -E '^(UNet|Trained|Stopped|sampled|error)' | \
    tail -n 3
  echo "$ended"
  [ "$code" -eq 0 ] || status=1
  return "$code"
}
latest_checkpoint() {  # The newest step in the workdir's checkpoints/, or nothing.
  find "$workdir/checkpoints" -mindepth 1 -maxdepth 1 -type d -regex '.*/[0-9]+' \
    -printf '%f\n' 2>/dev/null | sort -n | tail -n 1
}
evaluate() {  # evaluate SAMPLER: scores its npz into evaluation_SAMPLER.json.
  local result
  run_step "evaluate_$1" "$eval_limit" 10 "$python" -m ddpm_jax.evaluate \
    --samples "$scratch/$1.npz" || return
  # The measures are the output's last JSON line.
  result=$(grep '^{"' "$scratch/evaluate_$1.log" | tail -n 1)
  if [ -n "$result" ]; then
    echo "$result" > "$out/evaluation_$1.json"
  else
    echo "== evaluate_$1: no JSON line in its output" | tee -a "$log"
    status=1
  fi
}

# The metrics lines this run's training adds come after these (a resumed workdir has some).
logged_before=$(cat "$workdir/metrics.jsonl" 2>/dev/null | wc -l)
run_step train "$train_limit" 60 "$python" -m ddpm_jax.train --config "$config" \
  --workdir "$workdir" --config.data.source=bundled --config.model.dtype="$dtype" \
  --config.num_train_steps="$steps" --config.checkpoint_every_steps="$checkpoint_every" \
  "${train_flags[@]}"
[ -s "$workdir/metrics.jsonl" ] && cp "$workdir/metrics.jsonl" "$out/metrics.jsonl"
reached=$(latest_checkpoint)
echo "steps reached: ${reached:-none} of $steps (the last checkpoint)" | tee -a "$log"
[ "${reached:-0}" -ge "$steps" ] || status=1
if [ -n "$reached" ]; then
  if run_step sample_ddim "$sample_limit" 10 "$python" -m ddpm_jax.sample \
      --workdir "$workdir" --sampler ddim --num_steps "$ddim_steps" "${ddim_flags[@]}" \
      --num_samples "$ddim_samples" --seed "$seed" \
      --batch_size $(( ddim_samples < sample_batch ? ddim_samples : sample_batch )) \
      --npz "$scratch/ddim.npz" --out "$scratch/ddim.png" --overwrite; then
    run_step grid "$eval_limit" 10 "$python" -c 'import sys, numpy as np
from ddpm_jax import images
f = np.load(sys.argv[1])
images.save_grid(sys.argv[2], f["images"][:int(sys.argv[3])], str(f["data_range"]))' \
      "$scratch/ddim.npz" "$out/samples.png" "$grid"
    evaluate ddim
  fi
  run_step sample_ddpm "$sample_limit" 10 "$python" -m ddpm_jax.sample \
    --workdir "$workdir" --sampler ddpm --num_samples "$ddpm_samples" --seed "$seed" \
    --batch_size $(( ddpm_samples < sample_batch ? ddpm_samples : sample_batch )) \
    --npz "$scratch/ddpm.npz" --out "$scratch/ddpm.png" --reverse_strip "$out/reverse.png" \
    --overwrite && evaluate ddpm
else
  echo "== no checkpoint to sample: the steps after training are skipped" | tee -a "$log"
fi
if [ "$parity" = 1 ]; then
  run_step parity "$parity_limit" 10 "$python" scripts/train_parity.py --config "$config" \
    --num_train_steps "$parity_steps" --out "$out/parity" --config.data.source=bundled
fi

{
  echo "== summary"
  echo "steps reached: ${reached:-none} of $steps; the run: $workdir"
  "$python" - "$out" "$workdir/metrics.jsonl" "$logged_before" <<'EOF'
import json, pathlib, sys
# The loop's own speed, from this run's metrics lines: the first is logged after the
# compilation, so first to last is the whole loop at work (data, logging, checkpoints).
path = pathlib.Path(sys.argv[2])
lines = path.read_text().splitlines()[int(sys.argv[3]):] if path.is_file() else []
records = [r for r in map(json.loads, lines) if "time" in r and "step" in r]
if len(records) >= 2 and records[-1]["step"] > records[0]["step"]:
  first, last = records[0], records[-1]
  per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
  print(f"train loop: steps {first['step']}..{last['step']} at {1e3 * per_step:.2f} ms a step "
        f"(70,275 steps: {70275 * per_step / 60:.1f} min)")
else:
  print("train loop: fewer than two metrics lines from this run; not timed")
for name in ("ddim", "ddpm"):
  path = pathlib.Path(sys.argv[1]) / f"evaluation_{name}.json"
  if not path.is_file():
    print(f"{name}: no evaluation")
    continue
  r = json.loads(path.read_text())
  print(f"{name}: {r['num_samples']} images, frac_confident {r['frac_confident']:.4f}, "
        f"mean_confidence {r['mean_confidence']:.4f}, FD {r['frechet_distance']:.2f}, "
        f"class_kl {r['class_kl']:.4f}")
EOF
  echo "total: $(( SECONDS - start_time )) s, exit $status"
} | tee -a "$log"
exit $status
