"""Benchmarks the JAX train step and samplers against the PyTorch original, on one device.

  python scripts/bench.py --config configs/mnist.py --json bench.json
  python scripts/bench.py --config configs/mnist_tiny.py --json bench.json --quick

In one process, on one device (the first GPU when both JAX and torch see one, else the
CPU), with the same architecture, batch and float32 weights on both sides:

* train step img/s: ``ddpm_jax.train.compile_train_step`` (jitted; Adam + EMA; the state
  in the layouts XLA picks) per compute dtype, against ``reference_torch.train_step`` (the
  original's eager step; Adam + EMA) and the same step with the model under
  ``torch.compile``; on a CPU of several cores also the float32 step with the batch split
  over one JAX device per core (what ``python -m ddpm_jax.train`` runs there); beside it,
  the training loop's own program
  (``train.compile_train_steps``) at k steps a call (``--loop_steps_per_call``);
* sampling img/s: the batched DDPM and DDIM scans of ``ddpm_jax.sampling`` against the
  original's one-image-at-a-time loop (``reference_torch.sample``);
* memory, FLOPs per image (XLA's cost analysis and an analytic count), MFU on a GPU
  (of the analytic count), a forward / backward / optimizer+EMA breakdown of the float32
  step, and that step's op time by phase and UNet layer in a jax.profiler trace
  (``ddpm_jax.profiling``);
* parity: the same weights in both frameworks, and how far JAX's output, loss and
  gradients are from the original's on this device, at the timed precision (JAX's
  default; TF32 on a recent GPU), at full float32 and per JAX compute dtype.

Warm-up calls are not timed; each figure is the median of ``--reps`` repetitions, with
``jax.block_until_ready`` / ``torch.cuda.synchronize`` before every clock read. Every
figure goes to ``--json``; a summary table goes to stdout. Config overrides use
``--config.KEY=VALUE`` (e.g. ``--config.model.dropout_rate=0``). See BENCHMARKS.md.

The code is the package ``scripts/bench/`` beside this file (``bench.run.main``); one-off
experiments that used to run here are in ``benchmarks/experiments/``.
"""

import os
import sys

# One device: the first GPU. JAX must not take most of the GPU's memory up front, since
# torch allocates in the same process. Set before the package brings in JAX.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
# scripts/ for the package ``bench`` (a package wins over this file of the same name on
# import), the repository for ``ddpm_jax`` and ``reference_torch`` when they are not
# installed (e.g. on a GPU machine running a plain checkout).
for _path in (os.path.dirname(_SCRIPTS), _SCRIPTS):
  if _path not in sys.path:
    sys.path.insert(0, _path)

# pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_jax import cli

# On a CPU, one JAX device per core, as `python -m ddpm_jax.train` splits the host: the
# rows on one device use the first, and a row of the float32 step with the batch split
# over all of them is the CPU demo's loop. A GPU run ignores the CPU's devices.
cli.use_cpu_cores(cli.available_cores())

from bench.run import main
from ddpm_jax.errors import run_cli

if __name__ == "__main__":
  run_cli(main)
