"""Trains, samples and scores variants of a config, one row each: the measurements behind
RESULTS.md's recipe and sampler tables.

  python scripts/recipe_sweep.py --config configs/mnist_tiny.py --out results/recipe-sweep \\
      --variants base,v,v_min_snr --seeds 0,1
  python scripts/recipe_sweep.py --config configs/mnist_tiny.py --out results/recipe-sweep \\
      --variants v_min_snr --seeds 0 --samplers ddim50_eta1_clip,dpmpp2m20,ddpm1000

Each run is ``python -m ddpm_jax.train`` with the variant's overrides in
``OUT/runs/<variant>-s<seed>``, then ``ddpm_jax.sample`` and ``ddpm_jax.evaluate`` for each
sampler; a row is appended to ``OUT/results.jsonl`` (variant, seed, sampler, overrides,
training time and img/s, the evaluate JSON, sampling time). Rows already there are not
run again, so the same command continues an interrupted sweep. ``--table`` prints the
rows as a markdown table (means over seeds, with each seed's value).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent

# Overrides of the config, by variant name. "base" is the config as it is; "eps" the
# original's objective (configs/mnist_tiny.py predicts x0).
VARIANTS = {
    "base": [],
    "eps": ["--config.objective=eps"],
    "x0": ["--config.objective=x0"],
    "v": ["--config.objective=v"],
    "min_snr": ["--config.loss_weighting=min_snr"],
    "v_min_snr": ["--config.objective=v", "--config.loss_weighting=min_snr"],
    "x0_min_snr": ["--config.objective=x0", "--config.loss_weighting=min_snr"],
    "cosine": ["--config.schedule.kind=cosine"],
    "sigmoid": ["--config.schedule.kind=sigmoid"],
    "v_min_snr_cosine": ["--config.objective=v", "--config.loss_weighting=min_snr",
                         "--config.schedule.kind=cosine"],
    "ema_warmup": ["--config.ema_warmup=True", "--config.ema_decay=0.999"],
    "v_min_snr_ema_warmup": ["--config.objective=v", "--config.loss_weighting=min_snr",
                             "--config.ema_warmup=True", "--config.ema_decay=0.999"],
    "ema_0.99": ["--config.ema_decay=0.99"],
    "ema_0.999": ["--config.ema_decay=0.999"],
    "steps_3000": ["--config.num_train_steps=3000"],
    "lr_2e-3": ["--config.learning_rate=2e-3"],
    "lr_5e-3": ["--config.learning_rate=5e-3"],
    "batch_32": ["--config.batch_size=32", "--config.num_train_steps=1250"],
    "batch_8": ["--config.batch_size=8", "--config.num_train_steps=5000"],
    "wider": ["--config.model.channels=(16,32,64,128,128,96)", "--config.model.num_groups=8",
              "--config.model.num_heads=4"],
    # configs/mnist_tiny_cond.py: sample it with the cond_* samplers, which ask for digits.
    "cond": ["--config.model.num_classes=10"],
}

_DIGITS = ["--labels", "0,1,2,3,4,5,6,7,8,9"]

# Sampler settings, by name: ddpm_jax.sample flags, each spelled out (not left to the CLI's
# defaults), so that a name means the same sampler whatever the defaults become.
SAMPLERS = {
    "ddim50_eta1_clip": ["--sampler", "ddim", "--num_steps", "50", "--eta", "1",
                         "--clip_denoised"],
    "ddim50_eta1": ["--sampler", "ddim", "--num_steps", "50", "--eta", "1", "--no_clip_denoised"],
    "ddim50": ["--sampler", "ddim", "--num_steps", "50", "--eta", "0", "--no_clip_denoised"],
    "ddim50_clip": ["--sampler", "ddim", "--num_steps", "50", "--eta", "0", "--clip_denoised"],
    "ddim100_eta1_clip": ["--sampler", "ddim", "--num_steps", "100", "--eta", "1",
                          "--clip_denoised"],
    "dpmpp2m10": ["--sampler", "dpmpp2m", "--num_steps", "10"],
    "dpmpp2m20": ["--sampler", "dpmpp2m", "--num_steps", "20"],
    "dpmpp2m50": ["--sampler", "dpmpp2m", "--num_steps", "50"],
    "dpmpp2m20_clip": ["--sampler", "dpmpp2m", "--num_steps", "20", "--clip_denoised"],
    "dpmpp2m20_logsnr": ["--sampler", "dpmpp2m", "--num_steps", "20", "--spacing", "logsnr"],
    "ddpm1000": ["--sampler", "ddpm"],
    # DDPM-1000 with each predicted x0 clipped to the data's range (the DDPM paper's sampler).
    "ddim1000_eta1_clip": ["--sampler", "ddim", "--num_steps", "1000", "--eta", "1",
                           "--clip_denoised"],
    "default": [],
    # Autoguidance by the run's EMA at an earlier step (its checkpoints must keep that step),
    # at every update (no suffix) or only at the updates of steps t >= T (_tT).
    **{f"ddim50_eta1_clip_ag{step}_w{w}" + (f"_t{t}" if t else ""): [
        "--sampler", "ddim", "--num_steps", "50", "--eta", "1", "--clip_denoised",
        "--autoguide_step", str(step), "--autoguide_scale", w, "--autoguide_min_t", str(t)]
       for step in (500, 1000, 1500, 2000) for w in ("2", "3", "4", "5", "6")
       for t in (0, 100, 200, 400)},
    **{f"cond_ddim50_eta1_clip_w{w}": ["--sampler", "ddim", "--num_steps", "50", "--eta", "1",
                                       "--clip_denoised", *_DIGITS, "--guidance_scale", w]
       for w in ("0", "1", "1.5", "2", "3", "5")},
}

# A config may ask for autoguidance by default (configs/mnist_tiny.py): the samplers named
# without it sample without it.
SAMPLERS = {name: flags if name == "default" or "--autoguide_step" in flags
            else [*flags, "--no_autoguide"] for name, flags in SAMPLERS.items()}

MEASURES = ("frac_confident", "mean_confidence", "frechet_distance", "class_kl")


def _run(argv: list[str], log: pathlib.Path) -> float:
  """Runs ``argv`` in the repository, appending its output to ``log``; returns seconds."""
  start = time.perf_counter()
  with open(log, "a") as f:
    f.write("$ " + " ".join(argv) + "\n")
    f.flush()
    done = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if done.returncode:
    sys.exit(f"error: {' '.join(argv[:4])} ... failed (exit {done.returncode}); see {log}")
  return time.perf_counter() - start


def _done(results: pathlib.Path) -> set[tuple[str, int, str]]:
  if not results.is_file():
    return set()
  rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()]
  return {(r["variant"], r["seed"], r["sampler"]) for r in rows}


def sweep(args: argparse.Namespace) -> None:
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results, log = out / "results.jsonl", out / "sweep.log"
  done = _done(results)
  python = sys.executable
  for variant in args.variants:
    for seed in args.seeds:
      todo = [s for s in args.samplers if (variant, seed, s) not in done]
      if not todo:
        continue
      workdir = out / "runs" / f"{variant}-s{seed}"
      train_s = _run([python, "-m", "ddpm_jax.train", "--config", args.config,
                      f"--workdir={workdir}", f"--config.seed={seed}", *VARIANTS[variant],
                      *args.overrides], log)
      metrics = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
      img_per_s = float(np.median([m["img_per_s"] for m in metrics[1:]] or [0.0]))
      for sampler in todo:
        npz = workdir / f"samples_{sampler}.npz"
        sample_s = _run([python, "-m", "ddpm_jax.sample", "--workdir", str(workdir),
                         *SAMPLERS[sampler], "--num_samples", str(args.num_samples), "--seed",
                         str(args.sample_seed), "--out", str(workdir / f"samples_{sampler}.png"),
                         "--npz", str(npz), "--overwrite"], log)
        evaluation = subprocess.run([python, "-m", "ddpm_jax.evaluate", "--samples", str(npz)],
                                    cwd=REPO, capture_output=True, text=True, check=True)
        row = dict(variant=variant, seed=seed, sampler=sampler, config=args.config,
                   overrides=VARIANTS[variant] + args.overrides, train_s=round(train_s, 1),
                   train_img_per_s=round(img_per_s, 1), final_loss=metrics[-1]["loss"],
                   sample_s=round(sample_s, 1),
                   evaluation=json.loads(evaluation.stdout.strip().splitlines()[-1]))
        with open(results, "a") as f:
          f.write(json.dumps(row) + "\n")
        e = row["evaluation"]
        print(f"{variant} seed {seed} {sampler}: {100 * e['frac_confident']:.1f} % confident, "
              f"FD {e['frechet_distance']:.1f} (train {train_s:.0f} s)", flush=True)


def table(results: pathlib.Path) -> str:
  """The rows of ``results`` as markdown: one line per (variant, overrides, sampler), seeds
  averaged. A variant's name is kept when the config under it changes (``x0`` on the eps
  recipe, then on the x0 one), so rows group by the overrides they ran with too."""
  rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()]
  groups: dict[tuple[str, tuple[str, ...], str], list[dict]] = {}
  for r in rows:
    groups.setdefault((r["variant"], tuple(r["overrides"]), r["sampler"]), []).append(r)
  labelled = any("label_accuracy" in r["evaluation"] for r in rows)
  lines = ["| variant | overrides | sampler | seeds | ≥ 0.9 confident | mean confidence | FD "
           "| class KL " + ("| label accuracy " if labelled else "") + "| train img/s |",
           "|---|---|---|---|---|---|---|---|" + ("---|" if labelled else "") + "---|"]
  for (variant, overrides, sampler), group in groups.items():
    def cell(key, scale=1.0, spec=".1f"):
      values = [scale * g["evaluation"][key] for g in group]
      each = " / ".join(format(v, spec) for v in values)
      return f"{np.mean(values):{spec}} ({each})" if len(values) > 1 else each
    accuracy = ""
    if labelled:
      accuracy = (f"{cell('label_accuracy', 100)} % | "
                  if all("label_accuracy" in g["evaluation"] for g in group) else "– | ")
    spelled = " ".join(o.removeprefix("--config.") for o in overrides)
    lines.append(f"| {variant} | {spelled} | {sampler} | {len(group)} | "
                 f"{cell('frac_confident', 100)} % | "
                 f"{cell('mean_confidence', 1, '.3f')} | {cell('frechet_distance')} | "
                 f"{cell('class_kl', 1, '.2f')} | {accuracy}"
                 f"{np.mean([g['train_img_per_s'] for g in group]):.0f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/mnist_tiny.py")
  parser.add_argument("--out", required=True)
  parser.add_argument("--variants", default="base",
                      help=f"comma-separated, of: {', '.join(VARIANTS)}")
  parser.add_argument("--seeds", default="0", help="training seeds, comma-separated")
  parser.add_argument("--samplers", default="ddim50_eta1_clip",
                      help=f"comma-separated, of: {', '.join(SAMPLERS)}")
  parser.add_argument("--num_samples", type=int, default=256)
  parser.add_argument("--sample_seed", type=int, default=0)
  parser.add_argument("--table", action="store_true", help="print OUT's table and stop")
  parser.add_argument("overrides", nargs="*", help="more --config.KEY=VALUE for every run")
  args = parser.parse_args(argv)
  if args.table:
    print(table(pathlib.Path(args.out) / "results.jsonl"))
    return 0
  args.variants = args.variants.split(",")
  args.samplers = args.samplers.split(",")
  args.seeds = [int(s) for s in args.seeds.split(",")]
  unknown = [v for v in args.variants if v not in VARIANTS] + [
      s for s in args.samplers if s not in SAMPLERS]
  if unknown:
    parser.error(f"unknown variant or sampler: {', '.join(unknown)}")
  os.environ.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  sweep(args)
  print(table(pathlib.Path(args.out) / "results.jsonl"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
