"""A run's loss curve: ``python -m ddpm_jax.plot --workdir DIR --out DIR/loss.png``
[``--overwrite``].

The loss of each ``metrics.jsonl`` line (the mean over the steps since the previous one,
after a resume the later line of a step; ``checkpoint.read_metrics``) on a log axis, and
the learning rate of each line on a second axis, so that a warm-up, a decay or a spike
shows where it happened.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ddpm_jax import checkpoint, files
from ddpm_jax.errors import ArgumentParser, UserError, run_cli


def save_loss_plot(path: str | os.PathLike, records: Sequence[dict], title: str = "") -> None:
  """Writes the loss (log scale) and learning rate of ``records`` (``metrics.jsonl``
  lines with ``step``, ``loss`` and ``lr``) to the PNG at ``path``, atomically."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = np.array([r["step"] for r in records])
  loss = np.array([r["loss"] for r in records], float)
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
  ax.plot(steps, loss, color="tab:blue", lw=1.2, label="loss")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (mean since the previous line)", color="tab:blue")
  ax.grid(True, which="both", alpha=0.3)
  if all("lr" in r for r in records):
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=1.0)
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    lr_ax.set_ylim(bottom=0)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  try:
    files.write_atomic(path, lambda f: fig.savefig(f, format="png"))
  finally:
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = ArgumentParser(prog="python -m ddpm_jax.plot",
                          description="The loss curve and learning rate of a training run.")
  parser.add_argument("--workdir", required=True, help="a training run's directory")
  parser.add_argument("--out", required=True, help="the PNG to write, e.g. DIR/loss.png")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  files.check_outputs([args.out], args.overwrite)
  if not os.path.isdir(args.workdir):
    raise UserError(f"workdir {args.workdir} does not exist")
  if not os.path.isfile(os.path.join(args.workdir, checkpoint.METRICS_FILE)):
    raise UserError(f"{args.workdir} has no {checkpoint.METRICS_FILE}: train first")
  records = [r for r in checkpoint.read_metrics(args.workdir) if np.isfinite(r["loss"])]
  if not records:
    raise UserError(f"{args.workdir}/{checkpoint.METRICS_FILE} holds no finite loss yet")
  save_loss_plot(args.out, records, title=os.path.basename(os.path.normpath(args.workdir)))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  run_cli(main)
