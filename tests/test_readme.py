"""The README's Python example runs as written, on a small trained run, and gives what it
says: samples in the run's range, the original's loss and its gradient, and the run's EMA
weights back from the original's checkpoint format."""

import pathlib
import re

import jax
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import convert
from ddpm_jax.checkpoint import load_run
from ddpm_jax.train import train_and_evaluate
from tests.conftest import micro_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python_example() -> str:
  readme = (ROOT / "README.md").read_text()
  section = readme.split("### From Python", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_python_example_runs_as_written(tmp_path, monkeypatch):
  train_and_evaluate(micro_config(num_train_steps=2), str(tmp_path / "runs" / "demo"))
  (tmp_path / "checkpoints").mkdir()
  assert convert.main(["--workdir", str(tmp_path / "runs" / "demo"),
                       "--out", str(tmp_path / "checkpoints" / "ddpm_checkpoint")]) == 0
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(_python_example(), "README.md", "exec"), namespace)  # pylint: disable=exec-used

  _, params, ema_params = load_run(tmp_path / "runs" / "demo")
  assert namespace["x"].shape == (16, 32, 32, 1) and namespace["frames"].shape[:2] == (10, 16)
  assert np.isfinite(np.asarray(namespace["x"])).all()
  with Image.open(tmp_path / "grid.png") as grid:
    assert grid.size[0] == grid.size[1] > 4 * 32
  assert namespace["batch"].shape == (8, 32, 32, 1)
  assert 0.0 < float(namespace["loss"]) < 10.0
  grads = namespace["grads"]
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # Out to the original's format and back: the run's EMA weights, bit for bit.
  assert jax.tree.structure(namespace["torch_ema"]) == jax.tree.structure(ema_params)
  for a, b in zip(jax.tree.leaves(namespace["torch_ema"]), jax.tree.leaves(ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
