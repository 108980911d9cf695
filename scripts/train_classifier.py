"""Trains the small CNN behind ``ddpm_jax.evaluate``'s sample-quality measures.

Trains on the bundled MNIST subset (or on the four IDX files in ``--idx_dir``) with random
shifts and outlier exposure (Hendrycks et al., 2019: generated non-digits are pushed towards
a uniform softmax, so that confidence means "looks like a digit"). Reports accuracy on the
held-out test split after each epoch (the last epoch's weights are kept, no selection on
it) and writes the weights (``ddpm_jax/assets/classifier.msgpack``) and a JSON record
(``classifier.json``) next to them:

  python scripts/train_classifier.py --seed 0

Same seed, same data, same machine: same weights.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import shlex
import sys
import time
from typing import Any, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import data
from ddpm_jax import evaluate
from ddpm_jax.errors import UserError, run_cli


class _ArgumentParser(argparse.ArgumentParser):
  """An argparse parser whose errors are :class:`UserError` (one line, exit status 2)."""

  def error(self, message: str):
    raise UserError(message)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = _ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  parser.add_argument("--max_shift", type=int, default=2, help="random shift, in pixels")
  parser.add_argument(
      "--outlier_weight", type=float, default=0.5,
      help="weight of the outlier-exposure loss (uniform predictions on non-digits); 0: off",
  )
  parser.add_argument("--idx_dir", default=None, help="train on MNIST IDX files in this folder")
  parser.add_argument("--out", default=str(evaluate.CLASSIFIER_PATH), help="weights file")
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0 or args.max_shift < 0:
    raise UserError("--epochs and --batch_size must be >= 1, --learning_rate > 0, --max_shift >= 0")
  if args.outlier_weight < 0:
    raise UserError(f"--outlier_weight must be >= 0, got {args.outlier_weight}")
  if args.idx_dir and not pathlib.Path(args.idx_dir).is_dir():
    raise UserError(f"--idx_dir {args.idx_dir} is not a folder; give the MNIST IDX files' folder")
  return args


def load_split(idx_dir: str | None, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns images ``[N, 32, 32, 1]`` in [0, 1] and int32 labels ``[N]``."""
  images, labels = data.load_idx(idx_dir, split) if idx_dir else data.load_bundled(split)
  return np.asarray(data.preprocess(images), np.float32), np.asarray(labels, np.int32)


def random_shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
  """Shifts each image by up to ``max_shift`` pixels along each axis, filling with zeros."""
  if max_shift == 0:
    return images
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * max_shift + 1)
  crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
  return jax.vmap(crop)(padded, offsets)


def make_outliers(digits: jax.Array, key: jax.Array) -> jax.Array:
  """Non-digit images made from a batch of digits, for outlier exposure.

  Each image is, at random, one of: sparse uniform noise, a digit with its pixels shuffled,
  a jigsaw of 8x8 patches of the batch's digits (stroke fragments), or smooth blobs.
  """
  batch, height, width, channels = digits.shape
  keys = jax.random.split(key, 7)
  density = jax.random.uniform(keys[0], (batch, 1, 1, 1), minval=0.05, maxval=0.6)
  on = jax.random.uniform(keys[1], digits.shape) < density
  noise = jnp.where(on, jax.random.uniform(keys[2], digits.shape), 0.0)
  flat = digits.reshape(batch, -1)
  pixels = jax.random.permutation(keys[3], flat, axis=1, independent=True).reshape(digits.shape)
  grid = (batch, height // 8, 8, width // 8, 8, channels)
  patches = digits.reshape(grid).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 8, 8, channels)
  patches = jax.random.permutation(keys[4], patches)
  jigsaw = patches.reshape(grid[0], grid[1], grid[3], 8, 8, channels).transpose(0, 1, 3, 2, 4, 5)
  coarse = jax.random.uniform(keys[5], (batch, height // 5, width // 5, channels))
  smooth = jax.image.resize(coarse, digits.shape, "cubic")
  blobs = jnp.clip(4.0 * (smooth - 0.6) + 0.5, 0.0, 1.0)
  kind = jax.random.randint(keys[6], (batch, 1, 1, 1), 0, 4)
  return jnp.select(
      [kind == 0, kind == 1, kind == 2], [noise, pixels, jigsaw.reshape(digits.shape)], blobs
  )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def train_step(
    module: evaluate.Classifier,
    optimizer: optax.GradientTransformation,
    max_shift: int,
    outlier_weight: float,
    params: Any,
    opt_state: Any,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
) -> tuple[Any, Any, jax.Array]:
  """One Adam step on a randomly shifted batch of digits and half as many outliers.

  The loss is the cross-entropy of the digits plus ``outlier_weight`` times the
  cross-entropy of the outliers' predictions to the uniform distribution.
  """
  shift_key, outlier_key = jax.random.split(key)
  images = random_shift(images, shift_key, max_shift)
  num_digits = images.shape[0]
  if outlier_weight:
    images = jnp.concatenate([images, make_outliers(images[:num_digits // 2], outlier_key)])

  def loss_fn(params):
    _, logits = module.apply({"params": params}, images)
    digit_logits, outlier_logits = logits[:num_digits], logits[num_digits:]
    loss = optax.softmax_cross_entropy_with_integer_labels(digit_logits, labels).mean()
    if outlier_weight:
      uniform_loss = jax.nn.logsumexp(outlier_logits, axis=1) - outlier_logits.mean(axis=1)
      loss += outlier_weight * uniform_loss.mean()
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def train(args: argparse.Namespace, command: str) -> dict[str, Any]:
  """Trains, evaluates and saves the classifier; returns the JSON record."""
  train_images, train_labels = load_split(args.idx_dir, "train")
  test_images, test_labels = load_split(args.idx_dir, "test")
  steps_per_epoch = len(train_images) // args.batch_size
  if steps_per_epoch == 0:
    raise UserError(f"only {len(train_images)} training images for --batch_size {args.batch_size}")

  module = evaluate.Classifier()
  init_key, step_key = jax.random.split(jax.random.key(args.seed))
  params = module.init(init_key, jnp.zeros((1, *evaluate.IMAGE_SHAPE)))["params"]
  schedule = optax.cosine_decay_schedule(args.learning_rate, args.epochs * steps_per_epoch)
  optimizer = optax.adam(schedule)
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(args.seed)

  start = time.perf_counter()
  step = 0
  for epoch in range(args.epochs):
    order = rng.permutation(len(train_images))
    losses = []
    for i in range(steps_per_epoch):
      batch = order[i * args.batch_size:(i + 1) * args.batch_size]
      params, opt_state, loss = train_step(
          module, optimizer, args.max_shift, args.outlier_weight, params, opt_state,
          train_images[batch], train_labels[batch], jax.random.fold_in(step_key, step),
      )
      losses.append(loss)
      step += 1
    _, probs = evaluate.features_and_probs(test_images, (module, params))
    accuracy = float(np.mean(probs.argmax(axis=1) == test_labels))
    print(
        f"epoch {epoch + 1}/{args.epochs}: loss {float(jnp.mean(jnp.stack(losses))):.4f}, "
        f"test accuracy {accuracy:.4f}, {time.perf_counter() - start:.0f} s",
        flush=True,
    )
  seconds = time.perf_counter() - start

  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(flax.serialization.to_bytes(jax.device_get(params)))
  record = {
      "test_accuracy": accuracy,
      "num_test": len(test_images),
      "num_train": len(train_images),
      "data": f"idx:{args.idx_dir}" if args.idx_dir else "bundled: assets/mnist_bundled.npz",
      "seed": args.seed,
      "epochs": args.epochs,
      "batch_size": args.batch_size,
      "learning_rate": args.learning_rate,
      "max_shift": args.max_shift,
      "outlier_weight": args.outlier_weight,
      "num_params": sum(int(np.size(x)) for x in jax.tree.leaves(params)),
      "train_seconds": round(seconds, 1),
      "command": command,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
  }
  out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
  print(f"wrote {out} and {out.with_suffix('.json')}")
  return record


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  train(parse_args(argv), shlex.join(["python", "scripts/train_classifier.py", *argv]))
  return 0


if __name__ == "__main__":
  run_cli(main)
