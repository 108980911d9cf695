"""Merges the JSON of several ``scripts/bench.py`` runs on one device into one document.

  python scripts/bench_merge.py --json bench_gpu.json OUT/bench_train64.json \
      OUT/bench_sample64.json OUT/bench_train256.json OUT/bench_sample256.json

For measurements split into parts (``--parts``, ``--batch_sizes``), as
``scripts/gpu_bench.sh`` does: the rows are concatenated, each run's JAX/torch ratios
taken within that run, MFU recomputed from the model's FLOPs, the performance issue's
targets taken over all of them, and the tables printed as ``bench.py`` prints them. Each
sampling row keeps its speed-up over the original's loop timed in its own run, and each
loop-program row its ratios to the single step of its own run. The runs must share the
device and the model.
"""

from __future__ import annotations

import json
import os
import sys

# scripts/ for the package ``bench`` and the repository for ``ddpm_jax``.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from bench import flops, report
from ddpm_jax import files
from ddpm_jax.errors import ArgumentParser, UserError, run_cli


def read(path: str) -> dict:
  try:
    with open(path) as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read {path} as a bench JSON document: {e}") from e
  if not isinstance(doc, dict) or not {"device", "config", "train", "sampling"} <= set(doc):
    raise UserError(f"{path} is not a scripts/bench.py JSON document")
  return doc


def merge_documents(docs: list[dict], names: list[str]) -> dict:
  """One document from runs on the same device kind and model."""
  first = docs[0]
  for doc, name in zip(docs[1:], names[1:]):
    for key, what in ((("device", "kind"), "device"), (("config",), "model")):
      a, b = first, doc
      for k in key:
        a, b = a[k], b[k]
      if a != b:
        raise UserError(f"{name} was measured on another {what} than {names[0]}; merge only "
                        "runs of one device and one model")
  train = [r for doc in docs for r in doc["train"]]
  sampling = [r for doc in docs for r in doc["sampling"]]
  # MFU again, from the model's FLOPs (documents of before that rule took XLA's count).
  flops.add_mfu(train, first["flops"]["analytic_train_flops_per_img"], first["device"]["kind"],
                first["device"]["platform"] == "gpu")
  # Each run's JAX rows against the torch rows of the same run, never of another.
  ratios = [r for doc in docs for r in report.train_ratios(doc["train"])]
  # The loop program's rows keep their ratios, each taken within its own run.
  loop_program = [r for doc in docs for r in doc.get("loop_program", [])]
  breakdowns = [doc["breakdown"] for doc in docs if doc["breakdown"]["jax"]]
  seeds = [doc["flops"]["seed_unet"] for doc in docs if doc["flops"]["seed_unet"]]
  applicable = all(doc["targets_applicable"] for doc in docs)
  return dict(
      first, command=" ; ".join(doc["command"] for doc in docs), merged_from=names,
      complete=all(doc.get("complete", True) for doc in docs),
      device=dict(first["device"], load_average_end=docs[-1]["device"]["load_average_end"]),
      settings=dict(first["settings"],
                    batch_sizes=sorted({b for d in docs for b in d["settings"]["batch_sizes"]}),
                    parts=sorted({p for d in docs for p in d["settings"].get("parts", [])})),
      flops=dict(first["flops"], seed_unet=seeds[0] if seeds else None),
      train=train, train_ratios=ratios, loop_program=loop_program, sampling=sampling,
      parity=[r for doc in docs for r in doc.get("parity", [])],
      breakdown=breakdowns[0] if breakdowns else dict(first["breakdown"], jax=None, torch=None),
      targets_applicable=applicable,
      targets=report.evaluate_targets(train, ratios, sampling, applicable))


def main(argv: list[str] | None = None) -> int:
  parser = ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("inputs", nargs="+", help="bench.py JSON files")
  parser.add_argument("--json", required=True, help="where the merged document goes")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if os.path.abspath(args.json) in map(os.path.abspath, args.inputs):
    raise UserError(f"--json {args.json} is one of the inputs; write the merge elsewhere")
  doc = merge_documents([read(p) for p in args.inputs], args.inputs)
  files.write_text_atomic(args.json, json.dumps(doc, indent=1))
  print(report.report(doc))
  print(f"\nwrote {args.json}" + ("" if doc["complete"] else
                                " (some runs were cut short: their missing rows are absent)"))
  return 0


if __name__ == "__main__":
  run_cli(main)
