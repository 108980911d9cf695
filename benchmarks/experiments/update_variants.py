"""The optimizer + EMA update written three ways, alone and inside the train step.

  python benchmarks/experiments/update_variants.py --config configs/mnist.py --batch 64 \
      [--json update_variants.json] [--reps 5 --warmup 2 --min_rep_s 1]

A past experiment of ``scripts/bench.py``'s breakdown (its ``--variant_steps`` and
``breakdown.jax.update_variants``), kept as the record of what ran and runnable against
the current API. A profile of the float32 step on an H100 put optax's Adam and the
tree-mapped EMA well above what their memory traffic needs, so the same update was
written as one fused function mapped over the leaves and as the whole tree concatenated
into one vector, to see whether either form is faster; a form would earn its place in
``ddpm_jax`` only by measurement on a GPU. What it found is in README.md beside this file.

First it checks that the three forms compute the same state after three updates (an EMA
decay of 0.9, so the EMA moves well above float32's rounding); then it times each update
alone, with the GB/s of its least memory traffic (:data:`UPDATE_PASSES` x the parameter
bytes), and the whole train step with each update in it, the state in the layouts XLA
picks as the loop keeps it. All at a constant rate: the forms write out plain Adam, so a
config's warm-up, decay or clipping is replaced by it (:func:`constant_rate`).
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Callable

import _common  # pylint: disable=g-bad-import-order  # Sets the import paths.

# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import diffusion, train
from ddpm_jax.errors import run_cli
from ddpm_jax.model import build_unet
from ddpm_jax.train_state import (TrainState, adam_states, apply_gradients, fit_opt_state,
                                  make_schedule, make_tx)

UPDATE_VARIANTS = ("optax", "one map per leaf", "flat")
# Arrays each parameter's update reads (param, grad, mu, nu, EMA) and writes (param, mu,
# nu, EMA), at least.
UPDATE_PASSES = 9


def _adam_ema(p, g, mu, nu, ema, *, lr, c1, c2, b1, b2, eps, ema_decay):
  """optax.adam's update (bias corrections ``c1``/``c2`` of the incremented count) and the
  EMA toward the new params, on one array: ``(p, mu, nu, ema)`` after the step."""
  mu = (1 - b1) * g + b1 * mu
  nu = (1 - b2) * (g ** 2) + b2 * nu
  p = p + -lr * ((mu / c1) / (jnp.sqrt(nu / c2) + eps))
  return p, mu, nu, ema + (1.0 - ema_decay) * (p - ema)


def update_variant(config: ml_collections.ConfigDict, variant: str) -> Callable:
  """``update(state, grads) -> state`` of ``config``'s constant-rate Adam (no warm-up,
  decay or clipping) and EMA: optax's as the train step runs it, one fused function mapped
  over the leaves, or the whole tree as one concatenated vector."""
  tx = make_tx(config)
  if variant == "optax":
    return functools.partial(apply_gradients, tx=tx, ema_decay=config.ema_decay)
  b1, b2, eps = 0.9, 0.999, 1e-8  # make_optimizer's, torch.optim.Adam's defaults.

  def update(state: TrainState, grads: Any) -> TrainState:
    (adam,) = adam_states(state.opt_state)
    count = optax.safe_increment(adam.count)
    step = functools.partial(_adam_ema, lr=config.learning_rate, c1=1 - b1 ** count,
                             c2=1 - b2 ** count, b1=b1, b2=b2, eps=eps,
                             ema_decay=config.ema_decay)
    trees = (state.params, grads, adam.mu, adam.nu, state.ema_params)
    if variant == "one map per leaf":
      out = jax.tree.map(step, *trees)
      params, mu, nu, ema = (jax.tree.map(lambda o, i=i: o[i], out,
                                          is_leaf=lambda o: isinstance(o, tuple))
                             for i in range(4))
    else:
      leaves, treedef = jax.tree.flatten(state.params)
      ends = np.cumsum([leaf.size for leaf in leaves])[:-1].tolist()
      flat = (jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)]) for t in trees)
      params, mu, nu, ema = (
          treedef.unflatten([a.reshape(leaf.shape) for a, leaf in zip(jnp.split(v, ends), leaves)])
          for v in step(*flat))
    opt_state = fit_opt_state(adam._replace(count=count, mu=mu, nu=nu), state.opt_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema)
  return update


def constant_rate(config: ml_collections.ConfigDict, state: TrainState
                  ) -> tuple[ml_collections.ConfigDict, TrainState]:
  """A copy of ``config`` whose Adam is the one :func:`update_variant` writes out (no
  warm-up, decay, clipping or EMA warm-up), and ``state`` with that Adam's fresh optimizer
  state (``config``'s own may hold a schedule's or clipping's)."""
  config = copy.deepcopy(config)
  config.lr_schedule, config.warmup_steps, config.grad_clip_norm = "constant", 0, 0.0
  if "ema_warmup" in config:
    config.ema_warmup = False
  # Every leaf where the params are: a leaf elsewhere would make a second call of a jitted
  # update compile again, for the first call's output shardings.
  fresh = jax.device_put(
      TrainState(step=state.step, params=state.params,
                 opt_state=make_tx(config).init(state.params),
                 ema_params=state.ema_params, rng=state.rng),
      jax.tree.leaves(state.params)[0].sharding)
  return config, fresh


def step_with(config: ml_collections.ConfigDict, update: Callable) -> Callable:
  """``ddpm_jax.train.train_step`` with ``config``'s loss, model and schedule, and
  ``update`` in place of its optimizer and EMA update."""
  return functools.partial(
      train.train_step, loss_fn=functools.partial(diffusion.loss, **train.loss_options(config)),
      apply_fn=build_unet(config.model).apply, schedule=make_schedule(config), update=update,
      skip_nonfinite=config.nan_policy == "skip")


def compile_in_xla_layouts(step: Callable, state: TrainState, x: jax.Array
                           ) -> tuple[jax.stages.Compiled, Any]:
  """``step`` jitted with its state donated and kept in the layouts XLA picks, as
  ``ddpm_jax.train.compile_train_step`` compiles the loop's own step: the program and the
  state's formats."""
  mesh = x.sharding.mesh
  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state)

  def compile_with(formats):
    return jax.jit(step, in_shardings=(formats, NamedSharding(mesh, P("data"))),
                   out_shardings=(formats, replicated),
                   donate_argnums=(0,)).lower(abstract, x).compile()

  try:
    compiled = compile_with(Format(Layout.AUTO, replicated))
  except (ValueError, NotImplementedError, jax.errors.JaxRuntimeError):
    formats = train.row_major_formats(abstract)  # A backend that cannot choose layouts.
    return compile_with(formats), formats
  (formats, _), _ = compiled.input_formats
  returned, _ = compiled.output_formats
  if any(f.layout != g.layout for f, g in zip(jax.tree.leaves(formats),
                                              jax.tree.leaves(returned))):
    compiled = compile_with(formats)  # A step that loops gives back what it takes.
  return compiled, formats


def check_variants_agree(config: ml_collections.ConfigDict, state: TrainState) -> float:
  """Raises unless every form gives optax's state after three updates with random
  gradients (EMA decay 0.9); returns the largest relative difference found."""
  config = copy.deepcopy(config)
  config.ema_decay = 0.9
  config, initial = constant_rate(config, state)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  grads = [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape), initial.params)
           for k in keys]
  states = {}
  for variant in UPDATE_VARIANTS:
    update, current = jax.jit(update_variant(config, variant)), initial
    for g in grads:
      current = update(current, g)
    states[variant] = jax.device_get(current)
  worst = 0.0
  for variant in UPDATE_VARIANTS[1:]:
    for got, want in zip(jax.tree.leaves(states[variant]), jax.tree.leaves(states["optax"])):
      np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8, err_msg=variant)
      scale = max(float(np.abs(want).max()), 1e-30)
      worst = max(worst, float(np.abs(np.asarray(got) - want).max()) / scale)
  return worst


def time_update_variants(config: ml_collections.ConfigDict, state: TrainState, fv
                         ) -> list[dict]:
  """Each of :data:`UPDATE_VARIANTS` jitted and timed alone on a copy of ``state``, with
  the GB/s of its least memory traffic."""
  config, fresh = constant_rate(config, state)
  traffic = UPDATE_PASSES * sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(state.params))
  grads = jax.tree.map(jnp.ones_like, state.params)
  rows = []
  for variant in UPDATE_VARIANTS:
    update = jax.jit(update_variant(config, variant), donate_argnums=(0,))
    current = jax.tree.map(lambda a: a.copy(), fresh)

    def run(update=update):
      nonlocal current
      current = update(current, grads)
      return current

    seconds = _common.median_s(run, fv)
    rows.append(dict(variant=variant, ms=1e3 * seconds, gb_per_s=traffic / seconds / 1e9))
  return rows


def time_variant_steps(config: ml_collections.ConfigDict, state: TrainState, x: jax.Array,
                       fv) -> dict[str, float]:
  """The whole train step with each of :data:`UPDATE_VARIANTS` as its update (constant
  rate), its state in the layouts XLA picks: ms a step by variant. Alone, the updates may
  be bound by the host's dispatch of their many arrays; inside the step only the kernels
  count."""
  config, state = constant_rate(config, state)
  steps = {}
  for variant in UPDATE_VARIANTS:
    compiled, formats = compile_in_xla_layouts(step_with(config, update_variant(config, variant)),
                                               state, x)
    steps[variant] = 1e3 * _common.time_step(compiled, state, formats, x, fv)
  return steps


def main(argv: list[str] | None = None) -> int:
  config, fv, state, x = _common.setup(sys.argv if argv is None else argv)
  worst = check_variants_agree(config, state)
  print(f"the three forms agree after three updates (largest difference {worst:.1e} of a "
        "leaf's largest entry)", flush=True)
  alone = time_update_variants(config, state, fv)
  steps = time_variant_steps(config, state, x, fv)
  print(f"{config.model.dtype} step at batch {fv.batch}, constant-rate Adam + EMA; GB/s of "
        f"the least traffic ({UPDATE_PASSES} x the parameter bytes):")
  print("| update | ms alone | GB/s | step ms |\n|---|---|---|---|")
  for row in alone:
    print(f"| {row['variant']} | {row['ms']:.2f} | {row['gb_per_s']:.0f} | "
          f"{steps[row['variant']]:.2f} |")
  _common.finish(dict(batch=fv.batch, dtype=config.model.dtype, largest_difference=worst,
                      update_variants=[dict(r, step_ms=steps[r["variant"]]) for r in alone]),
                 fv)
  return 0


if __name__ == "__main__":
  run_cli(main)
