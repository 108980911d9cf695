# `make demo` trains and samples the tiny config on the bundled digits (CPU, no network);
# `make test` runs the whole suite. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
DEMO_COND_DIR ?= runs/demo-cond
# Classifier-free guidance of the demo-cond samples (1: the plain conditional model); 3
# drew the asked digit most often on the demo's budget (RESULTS.md, "Draw a chosen digit").
DEMO_COND_GUIDANCE ?= 3
# glibc hands XLA's per-step scratch buffer (~190 MB for the demo, above malloc's mmap threshold)
# back to the kernel after every step, and the next step faults it in again, 4 KiB at a
# time. Transparent huge pages for malloc's mmaps cut those faults ~80x and the tiny
# config's train step by ~10-20 % on 2 cores (BENCHMARKS.md). Ignored by glibc < 2.35.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install lock test test-fast demo demo-cond bench gpu-wheels clean

install: $(STAMP)

# torch is pinned and installed first: the local CPU wheel, not a multi-GB CUDA build. The
# rest at the versions of constraints.txt, which the suite and the recorded figures used.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,tfds]'
	touch $(STAMP)

# Rewrites constraints.txt's list (its comment header kept) from what .venv holds now.
lock: $(STAMP)
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v '^torch=='; } \
	  > constraints.txt.new
	mv constraints.txt.new constraints.txt

# Two pytest workers: most tests wait on subprocesses or single-threaded work, so two at a
# time keep both cores busy (the 4-minute kill test runs beside the rest): 20-30 minutes on
# 2 cores (README). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# The CPU demo: train the tiny config on the bundled digits, then sample and evaluate. The
# samples are autoguided as the run's config says (configs/mnist_tiny.py: by its EMA at step
# 1500, weight 5, at t >= 100; RESULTS.md, "Autoguidance").
# Re-running resumes the finished run (nothing to train) and rewrites the same samples.
demo: $(STAMP)
	$(PY) -m ddpm_jax.train --config configs/mnist_tiny.py --workdir $(DEMO_DIR)
	$(PY) -m ddpm_jax.sample --workdir $(DEMO_DIR) --sampler ddim --num_steps 50 --eta 1 --clip_denoised \
	  --num_samples 256 --seed 0 --out $(DEMO_DIR)/samples.png --npz $(DEMO_DIR)/samples.npz \
	  --reverse_strip $(DEMO_DIR)/reverse.png --overwrite
	$(PY) -m ddpm_jax.evaluate --samples $(DEMO_DIR)/samples.npz > $(DEMO_DIR)/evaluation.txt
	$(PY) -m ddpm_jax.plot --workdir $(DEMO_DIR) --out $(DEMO_DIR)/loss.png --overwrite
	cat $(DEMO_DIR)/evaluation.txt
	@echo "Pictures: $(DEMO_DIR)/samples.png (256 samples), $(DEMO_DIR)/reverse.png (the reverse process), $(DEMO_DIR)/loss.png (the loss curve)"

# The tiny config made class-conditional (configs/mnist_tiny_cond.py): ten samples of each
# digit, sampled as the demo's, in a grid of one row per digit, and their evaluation with
# label_accuracy (the fraction the classifier reads as the digit asked for).
demo-cond: $(STAMP)
	$(PY) -m ddpm_jax.train --config configs/mnist_tiny_cond.py --workdir $(DEMO_COND_DIR)
	$(PY) -m ddpm_jax.sample --workdir $(DEMO_COND_DIR) --sampler ddim --num_steps 50 --eta 1 --clip_denoised \
	  --labels 0,1,2,3,4,5,6,7,8,9 --num_samples 100 --guidance_scale $(DEMO_COND_GUIDANCE) --seed 0 \
	  --out $(DEMO_COND_DIR)/digits.png --npz $(DEMO_COND_DIR)/samples.npz --overwrite
	$(PY) -m ddpm_jax.evaluate --samples $(DEMO_COND_DIR)/samples.npz > $(DEMO_COND_DIR)/evaluation.txt
	cat $(DEMO_COND_DIR)/evaluation.txt
	@echo "Pictures: $(DEMO_COND_DIR)/digits.png (10 rows, row d the digit d); samples $(DEMO_COND_DIR)/samples.npz; measures $(DEMO_COND_DIR)/evaluation.txt"

bench: $(STAMP)
	$(PY) scripts/bench.py --config configs/mnist_tiny.py --json bench_cpu.json --sample_timed_steps 20

# The wheels of what a GPU machine's Python may lack (ml_collections, pure Python, at
# constraints.txt's version), for scripts/gpu_proof.sh and gpu_bench.sh to install there
# from .whl/ when it does: bring .whl/ along to a machine without network.
gpu-wheels: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
	  $$(grep -i '^ml[-_]collections==' constraints.txt)

clean:
	rm -rf $(VENV) build *.egg-info
