"""The loss plot of a run: drawn from metrics.jsonl, refusing bad input before writing."""

import json

import numpy as np
import pytest
from PIL import Image

from ddpm_jax import plot
from ddpm_jax.errors import UserError


def _run(tmp_path, records):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  return workdir


def test_the_loss_plot_is_a_picture_of_the_runs_lines(tmp_path, capsys):
  records = [dict(step=s, loss=1.0 / s, lr=1e-3 * min(1, s / 50), img_per_s=10.0, time=0.0)
             for s in range(25, 2525, 25)]
  workdir = _run(tmp_path, records)
  out = workdir / "loss.png"
  assert plot.main(["--workdir", str(workdir), "--out", str(out)]) == 0
  assert f"wrote {out}" in capsys.readouterr().out
  with Image.open(out) as png:
    assert png.size == (640, 360)
    pixels = np.asarray(png.convert("RGB")).astype(int)
  # Both curves are drawn: matplotlib's default blue and orange lines.
  def has(color):
    return (np.abs(pixels - np.array(color)).sum(-1) < 60).sum() > 200
  assert has((31, 119, 180)) and has((255, 127, 14))
  with pytest.raises(UserError, match="exists; pass --overwrite"):
    plot.main(["--workdir", str(workdir), "--out", str(out)])
  assert plot.main(["--workdir", str(workdir), "--out", str(out), "--overwrite"]) == 0


def test_the_loss_plot_refuses_a_run_without_metrics(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    plot.main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "a.png")])
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="has no metrics.jsonl: train first"):
    plot.main(["--workdir", str(tmp_path / "empty"), "--out", str(tmp_path / "a.png")])
  workdir = _run(tmp_path, [dict(step=1, loss=float("nan"), lr=1e-3)])
  with pytest.raises(UserError, match="holds no finite loss"):
    plot.main(["--workdir", str(workdir), "--out", str(tmp_path / "a.png")])
  assert not (tmp_path / "a.png").exists()
