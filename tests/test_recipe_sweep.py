"""``scripts/recipe_sweep.py --table``: rows of one variant, seed and sampler average over
seeds, and a variant whose overrides changed (the same name on another recipe) gets a line
of its own instead of being averaged with the old rows."""

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _script():
  spec = importlib.util.spec_from_file_location("recipe_sweep",
                                                ROOT / "scripts" / "recipe_sweep.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _row(variant, seed, overrides, confident, fd):
  return dict(variant=variant, seed=seed, sampler="ddim50_eta1_clip", overrides=overrides,
              train_img_per_s=70.0, evaluation=dict(frac_confident=confident,
                                                    mean_confidence=0.8,
                                                    frechet_distance=fd, class_kl=0.1))


def test_the_table_averages_seeds_and_keeps_apart_a_variant_run_on_another_recipe(tmp_path):
  rows = [_row("sigmoid", 0, ["--config.schedule.kind=sigmoid", "--config.objective=eps"],
               0.40, 300.0),
          _row("sigmoid", 1, ["--config.schedule.kind=sigmoid", "--config.objective=eps"],
               0.50, 200.0),
          _row("sigmoid", 0, ["--config.schedule.kind=sigmoid"], 0.625, 150.0)]
  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in rows))
  lines = _script().table(results).splitlines()[2:]
  assert lines == [
      "| sigmoid | schedule.kind=sigmoid objective=eps | ddim50_eta1_clip | 2 | "
      "45.0 (40.0 / 50.0) % | 0.800 (0.800 / 0.800) | 250.0 (300.0 / 200.0) | "
      "0.10 (0.10 / 0.10) | 70 |",
      "| sigmoid | schedule.kind=sigmoid | ddim50_eta1_clip | 1 | 62.5 % | 0.800 | 150.0 | "
      "0.10 | 70 |"]
