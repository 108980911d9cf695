"""The train step with its state in the layouts XLA picks against the same step row-major.

  python benchmarks/experiments/row_major.py --config configs/mnist.py --batch 64 \
      [--dtype float32] [--json row_major.json] [--reps 5 --warmup 2 --min_rep_s 1]

A past experiment of ``scripts/bench.py``'s breakdown (its ``--xla_layouts`` and
``breakdown.jax.xla_layouts``), kept as the record of what ran and runnable against the
current API. JAX lays every array out row-major unless told otherwise, and a GPU's
convolutions want their kernels in another order, so a row-major step transposes the
kernels of the params, both Adam moments and the EMA on every step.
``ddpm_jax.train.compile_train_step`` compiles the step with ``Layout.AUTO`` for the state
instead, and keeps it in the layouts XLA picks; this counts the state arrays XLA lays out
other than row-major and, where there are any, times both steps in one process, with the
copy kernels each program holds. On a CPU XLA keeps every array row-major: the two
steps are one program, timed once. What it found is in README.md beside this file.
"""

from __future__ import annotations

import sys
from typing import Any

import _common  # pylint: disable=g-bad-import-order  # Sets the import paths.

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import jax
from jax.experimental.layout import Format

from ddpm_jax import profiling, train
from ddpm_jax.errors import run_cli


def is_row_major(array: Any, layout_format: Format) -> bool:
  """Whether ``layout_format`` lays ``array`` out as JAX does by default (row-major)."""
  return tuple(layout_format.layout.major_to_minor) == tuple(range(array.ndim))


def step_row(compiled: jax.stages.Compiled, state: Any, formats: Any, x: jax.Array, fv) -> dict:
  """The compiled step timed on a copy of ``state`` in ``formats``: ms, img/s, copies."""
  seconds = _common.time_step(compiled, state, formats, x, fv)
  return dict(step_ms=1e3 * seconds, img_per_s=x.shape[0] / seconds,
              xla_copies=profiling.copy_instructions(compiled.as_text()))


def main(argv: list[str] | None = None) -> int:
  config, fv, state, x = _common.setup(sys.argv if argv is None else argv)
  mesh = x.sharding.mesh
  compiled, chosen = train.compile_train_step(config, mesh, state, x)
  leaves = jax.tree.leaves(state)
  relaid = [a for a, f in zip(leaves, jax.tree.leaves(chosen)) if not is_row_major(a, f)]
  doc = dict(batch=fv.batch, dtype=config.model.dtype, leaves=len(leaves),
             relaid_leaves=len(relaid), relaid_bytes=sum(a.nbytes for a in relaid),
             xla_layouts=step_row(compiled, state, chosen, x, fv))
  print(f"{config.model.dtype} step at batch {fv.batch}: {len(relaid)} of {len(leaves)} state "
        f"arrays ({doc['relaid_bytes'] / 2**20:.0f} MiB) in layouts other than row-major")
  rows = [("layouts XLA picks", doc["xla_layouts"])]
  if relaid:
    row_major = train.row_major_formats(state)
    compiled, _ = train.compile_train_step(config, mesh, state, x, formats=row_major)
    doc["row_major"] = step_row(compiled, state, row_major, x, fv)
    rows.append(("all row-major", doc["row_major"]))
  else:
    print("(the two steps are one program: timed once)")
  print("| state | ms/step | img/s | copy kernels | MiB they write |\n|---|---|---|---|---|")
  for name, row in rows:
    print(f"| {name} | {row['step_ms']:.2f} | {row['img_per_s']:.1f} | "
          f"{row['xla_copies']['count']} | {row['xla_copies']['bytes'] / 2**20:.0f} |")
  _common.finish(doc, fv)
  return 0


if __name__ == "__main__":
  run_cli(main)
