"""torch and the original model (``reference_torch``), each None when torch is missing.

The bench needs both to measure anything, but reading a JSON document (``report``,
``scripts/bench_merge.py``) does not; :func:`bench.run.main` turns a missing torch into a
one-line error.
"""

# pylint: disable=g-import-not-at-top,unused-import
try:
  import torch
  import reference_torch as R
except ImportError:
  torch = R = None
