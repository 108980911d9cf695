"""The bench behind ``scripts/bench.py``, one module per idea.

* :mod:`bench.settings`: the command line's flags and what they ask to measure;
* :mod:`bench.timing`: timing calls, the devices, memory;
* :mod:`bench.flops`: FLOPs per image, peak FLOP/s and MFU;
* :mod:`bench.jax_rows`: ``ddpm_jax``'s train step, the loop's k-step program, the
  samplers and the step's breakdown;
* :mod:`bench.torch_rows`: the original's (``reference_torch``) step, eager and under
  ``torch.compile``, its breakdown and its sampler;
* :mod:`bench.parity`: JAX's output, loss and gradients against the original's;
* :mod:`bench.report`: the JSON document, the performance issue's targets, the tables;
* :mod:`bench.run`: every measurement in order, and ``main``.

Importing the package imports nothing heavy: ``scripts/bench.py`` sets the process's
environment before the modules bring in JAX and torch. One-off experiments that once
lived here are in ``benchmarks/experiments/``.
"""
