"""The train state: created straight into its shardings, pretrained modules
loaded into it.

`create(config, task, mesh)` is what training, evaluation and conversion
share: the optimiser of `config.optimizer`, the task's initialisation run
under `jax.jit` with the parameter shardings of the config's mesh (FSDP over
`config.fsdp_axis`), and the encoders `config.model_init` names.
"""

from __future__ import annotations

from typing import Any

from flax import struct
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import optax

from refseg_jax import optimizer
from refseg_jax import sharding
from refseg_jax.models import convert
from refseg_jax.tasks import base


class TrainState(train_state.TrainState):
  """Step, params, optimizer state, the BatchNorm running statistics, and an
  exponential moving average of the params when `ema_decay` > 0.

  Evaluation and the best checkpoint use `eval_variables()`: the average if
  there is one. Its decay ramps up as `min(ema_decay, (1 + t) / (10 + t))`
  (TensorFlow's `ExponentialMovingAverage(num_updates=t)`), so the average
  forgets the random initialisation within the first steps.
  """
  batch_stats: Any = None
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> 'TrainState':
    """The optimiser's update, then the params' average."""
    new = super().apply_gradients(grads=grads, **kwargs)
    if self.ema_params is None:
      return new
    decay = jnp.minimum(self.ema_decay, (1.0 + self.step) / (10.0 + self.step))
    return new.replace(ema_params=optax.incremental_update(
        new.params, self.ema_params, step_size=1.0 - decay))

  def eval_variables(self) -> dict[str, Any]:
    """What evaluation and prediction apply the model with."""
    params = self.params if self.ema_params is None else self.ema_params
    return {'params': params, 'batch_stats': self.batch_stats}


def _load_model_init(config: ml_collections.ConfigDict, state: TrainState,
                     shardings: Any) -> TrainState:
  """`state` with the pretrained modules `config.model_init` names.

  `refseg_jax.models.convert` reads and checks them (a shape mismatch is an
  error naming the tensor); every host reads the files and places its own
  shards.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  loaded = convert.load_model_tensors(config.model_init, variables)

  def pick_from(collection: str):
    def pick(path, current, target_sharding):
      value = loaded.get((collection, *(k.key for k in path)))
      if value is None:
        return current
      return jax.make_array_from_callback(value.shape, target_sharding,
                                          lambda index: value[index])
    return pick

  variables = {
      collection: jax.tree_util.tree_map_with_path(
          pick_from(collection), current, getattr(shardings, collection))
      for collection, current in variables.items()}
  if state.ema_params is not None:  # The average starts from them too.
    variables['ema_params'] = jax.tree_util.tree_map_with_path(
        pick_from('params'), state.ema_params, shardings.ema_params)
  return state.replace(**variables)


def initialiser(config: ml_collections.ConfigDict, task: base.Task):
  """`rng -> TrainState`: the task's fresh variables, the optimiser, and
  the params' average if `config.ema_decay` > 0."""
  tx = optimizer.make(config.total_steps, **config.optimizer).tx
  if not 0.0 <= config.ema_decay < 1.0:
    raise ValueError(f'config.ema_decay must be in [0, 1); got '
                     f'{config.ema_decay}.')

  def init(rng: jax.Array) -> TrainState:
    variables = task.init_variables(rng)
    params = variables['params']
    return TrainState.create(
        apply_fn=task.model.apply, params=params,
        batch_stats=variables.get('batch_stats', {}), tx=tx,
        ema_params=params if config.ema_decay else None,
        ema_decay=config.ema_decay)

  return init


def _shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               shapes: Any) -> Any:
  return sharding.param_shardings(shapes, mesh, config.fsdp_axis or None,
                                  config.fsdp_min_size)


def shapes_and_shardings(config: ml_collections.ConfigDict, task: base.Task,
                         mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(abstract train state, its shardings), without computing anything."""
  shapes = jax.eval_shape(initialiser(config, task),
                          jax.random.key(config.seed))
  return shapes, _shardings(config, mesh, shapes)


def create(config: ml_collections.ConfigDict, task: base.Task,
           mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """Initialises the train state directly into its shardings.

  The modules `config.model_init` names then take their pretrained weights.

  Returns:
    (state, state shardings): parameters of at least `config.fsdp_min_size`
    elements are sharded over `config.fsdp_axis`, the rest replicated.
  """
  # One initialiser for the shapes and the state: the shardings' tree
  # carries the optimiser as metadata, which must be the state's own.
  init, rng = initialiser(config, task), jax.random.key(config.seed)
  shardings = _shardings(config, mesh, jax.eval_shape(init, rng))
  state = jax.jit(init, out_shardings=shardings)(rng)
  return _load_model_init(config, state, shardings), shardings
