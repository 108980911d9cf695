"""The training state — params, Adam state, EMA params, step, rng — how a config builds it,
and its one update.

As in google-research/vdm, one small pytree carries everything a step changes, and the
update that applies the gradients also moves the EMA tree, so a jitted step with the
state donated touches each buffer once. The state is built here from a config (fresh,
abstract for a restore, or from the original's checkpoint), so that storage
(``checkpoint``) and the trainer (``train``) both import it and not each other.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ddpm_jax.model import build_unet
from ddpm_jax.schedule import Schedule, build_schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  ema_params: Any
  rng: jax.Array


def learning_rate_schedule(learning_rate: float, warmup_steps: int = 0, decay_steps: int = 0
                           ) -> float | optax.Schedule:
  """The rate by step: constant (the original), after a linear warm-up from 0 over
  ``warmup_steps``, and with ``decay_steps > 0`` a cosine decay to 0 at step
  ``decay_steps`` (warm-up included)."""
  if decay_steps > 0:
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, decay_steps,
                                              end_value=0.0)
  if warmup_steps > 0:
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return learning_rate


# Adam's first-moment decay, torch.optim.Adam's default as the original trains with.
ADAM_B1 = 0.9


def make_optimizer(learning_rate: float, warmup_steps: int = 0, grad_clip_norm: float = 0.0,
                   b1: float = ADAM_B1, b2: float = 0.999, eps: float = 1e-8,
                   decay_steps: int = 0) -> optax.GradientTransformation:
  """Adam as the original (``torch.optim.Adam`` defaults), with optional warm-up, cosine
  decay (:func:`learning_rate_schedule`) and clipping.

  ``grad_clip_norm > 0`` clips the global gradient norm. Warm-up, decay and clipping are
  off in the original's settings.
  """
  adam = optax.adam(learning_rate_schedule(learning_rate, warmup_steps, decay_steps),
                    b1=b1, b2=b2, eps=eps)
  if grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adam)
  return adam


def learning_rate_at(count: int, learning_rate: float, warmup_steps: int = 0,
                     decay_steps: int = 0) -> float:
  """The rate of ``make_optimizer``'s update number ``count + 1``, in Python floats.

  optax's schedules read the count before the update increments it: the update that takes
  the state from step ``count`` to step ``count + 1`` applies this rate.
  """
  if warmup_steps > 0 and count < warmup_steps:
    return learning_rate * count / warmup_steps
  if decay_steps > 0:
    progress = (min(count - warmup_steps, decay_steps - warmup_steps)
                / (decay_steps - warmup_steps))
    return learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
  return learning_rate


def _is_adam(node: Any) -> bool:
  """An Adam state: optax's, or as orbax reads one back without a target (a dict)."""
  return isinstance(node, optax.ScaleByAdamState) or (
      isinstance(node, dict) and set(node) == {"count", "mu", "nu"})


def adam_states(opt_state: Any) -> list[Any]:
  """The Adam states (count, mu, nu) in an optimizer state, in tree order."""
  return [n for n in jax.tree.leaves(opt_state, is_leaf=_is_adam) if _is_adam(n)]


def stored_opt_state_target(stored: Any, abstract_opt_state: Any) -> Any:
  """What to restore a checkpoint's ``opt_state`` into, whatever optimizer chain wrote it.

  ``stored`` is its tree as the checkpoint describes it (array metadata leaves, dicts and
  lists for optax's named tuples); ``abstract_opt_state`` is the current optimizer's
  abstract state. The stored Adam state takes the shapes, dtypes and shardings of the
  current one, any other array (a schedule's count) those of its count. Raises
  ``ValueError`` unless the checkpoint holds exactly one Adam state.
  """
  found = adam_states(stored)
  if len(found) != 1:
    raise ValueError(f"the checkpoint's opt_state holds {len(found)} Adam states (count, mu, "
                     "nu), not one")
  (adam,) = adam_states(abstract_opt_state)

  def target(node):
    if _is_adam(node):
      return {"count": adam.count, "mu": adam.mu, "nu": adam.nu}
    return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=adam.count.sharding)
  return jax.tree.map(target, stored, is_leaf=_is_adam)


def fit_opt_state(stored: Any, opt_state: Any) -> Any:
  """``opt_state``'s tree (an optimizer's state, or its abstract) holding the Adam state of
  ``stored``, a checkpoint's opt_state restored into :func:`stored_opt_state_target`.

  Adam's moments and count carry over from whatever optimizer chain wrote the checkpoint
  (clipping, warm-up and decay hold no other state); a schedule's count is a copy of
  Adam's, so the rate goes on from the step the run reached.
  """
  (adam,) = adam_states(stored)
  adam = optax.ScaleByAdamState(**adam) if isinstance(adam, dict) else adam
  known = (optax.ScaleByAdamState, optax.ScaleByScheduleState, optax.EmptyState)

  def fit(node):
    if isinstance(node, optax.ScaleByAdamState):
      return adam
    if isinstance(node, optax.ScaleByScheduleState):
      # Its own buffer: the train step donates every leaf of the state.
      return node._replace(count=jax.device_put(adam.count, adam.count.sharding,
                                                may_alias=False))
    if isinstance(node, optax.EmptyState):
      return node
    raise TypeError(f"cannot carry a {type(node).__name__} over from a checkpoint; "
                    "fit_opt_state knows only the states of make_optimizer")
  return jax.tree.map(fit, opt_state, is_leaf=lambda n: isinstance(n, known))


def initial_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """The state at step 0 for ``params``; the EMA starts as a copy of them (timm's ModelEmaV3)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.array, params), rng=rng)


def make_schedule(config: ml_collections.ConfigDict) -> Schedule:
  """The noise schedule of ``config.schedule`` (a workdir written before ``kind`` existed
  trained with the linear one)."""
  return build_schedule(**config.schedule)


def lr_decay_steps(config: ml_collections.ConfigDict) -> int:
  """The step where a cosine ``lr_schedule`` reaches 0 (the run's last), else 0 (no decay).

  Read with a default: a workdir written before the key existed trained at a constant rate.
  """
  return config.num_train_steps if config.get("lr_schedule", "constant") == "cosine" else 0


def make_tx(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """``config``'s optimizer: :func:`make_optimizer` with its rate, warm-up, decay, clipping."""
  return make_optimizer(config.learning_rate, config.warmup_steps, config.grad_clip_norm,
                        decay_steps=lr_decay_steps(config))


def _init_state(config: ml_collections.ConfigDict) -> TrainState:
  model = build_unet(config.model)
  rng = jax.random.PRNGKey(config.seed)
  size, channels = config.data.image_size, config.data.channels
  params = model.init(jax.random.fold_in(rng, -1 % 2**31),
                      jnp.zeros((1, size, size, channels), jnp.float32),
                      jnp.zeros((1,), jnp.int32))["params"]
  return initial_state(params, make_tx(config), rng)


def create_train_state(config: ml_collections.ConfigDict,
                       sharding: jax.sharding.Sharding | None = None) -> TrainState:
  """A fresh train state for ``config`` (params from ``config.seed``), on ``sharding``."""
  device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
  # The init runs once, and XLA's CPU backend spends most of its compilation optimizing
  # the ~1,000 small random-number kernels: LLVM at -O1 compiles it in well under half the
  # time, to the same bits (-O0 changes some in the last place). Other backends keep
  # their defaults.
  options = {"xla_backend_optimization_level": 1} if device.platform == "cpu" else None
  return jax.jit(functools.partial(_init_state, config), out_shardings=sharding,
                 compiler_options=options)()


def abstract_train_state(config: ml_collections.ConfigDict) -> TrainState:
  """Shapes and dtypes of ``config``'s train state, for restoring a checkpoint."""
  return jax.eval_shape(functools.partial(_init_state, config))


def state_from_torch(config: ml_collections.ConfigDict, params: Any, ema_params: Any,
                     adam: optax.ScaleByAdamState,
                     sharding: jax.sharding.Sharding | None = None) -> TrainState:
  """The train state that the original's checkpoint holds, given its weights, EMA and Adam
  state as Flax trees (``convert.load_torch_training_state``): the step is Adam's count
  (the warm-up schedule's count too), the key ``config``'s seed; on ``sharding``."""
  count = adam.count

  def restored(s):
    if isinstance(s, optax.ScaleByAdamState):
      return adam
    if isinstance(s, optax.ScaleByScheduleState):
      return s._replace(count=count)
    return s

  opt_state = jax.tree.map(restored, make_tx(config).init(params),
                           is_leaf=lambda s: isinstance(s, (optax.ScaleByAdamState,
                                                            optax.ScaleByScheduleState)))
  state = TrainState(step=count, params=params, opt_state=opt_state, ema_params=ema_params,
                     rng=jax.random.PRNGKey(config.seed))
  # One buffer per leaf: the step count appears three times, and the step donates them all.
  return jax.device_put(jax.tree.map(jnp.array, state), sharding)


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
  """``ema + (1 - decay) * (params - ema)``: ModelEmaV3's lerp, i.e. decay*ema + (1-decay)*p."""
  weight = 1.0 - decay
  return jax.tree.map(lambda e, p: e + weight * (p - e), ema_params, params)


def ema_decay_at(step: jax.Array, ema_decay: float, warmup: bool = False) -> float | jax.Array:
  """The EMA decay of the update that takes the state from ``step`` to ``step + 1``.

  The original's is constant. With ``warmup`` it ramps up as ``min(ema_decay, (1 + step) /
  (10 + step))`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``): the EMA
  follows the weights closely at first and averages over ever more steps, so that in a
  run of a few thousand steps it is not dominated by the random init.
  """
  if not warmup:
    return ema_decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + step) / (10.0 + step))


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation,
                    ema_decay: float, ema_warmup: bool = False) -> TrainState:
  """Adam on the params, then the EMA toward the new params, then step + 1."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay, ema_warmup)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_update(state.ema_params, params, decay))
