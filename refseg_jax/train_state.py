"""The train state: created straight into its shardings, pretrained modules
loaded into it.

`create(config, task, mesh)` is what training, evaluation and conversion
share: the optimiser of `config.optimizer`, the task's initialisation run
under `jax.jit` with the parameter shardings of the config's mesh (FSDP over
`config.fsdp_axis`), and the encoders `config.model_init` names.
"""

from __future__ import annotations

from typing import Any

from flax import traverse_util
from flax.training import train_state
import jax
import ml_collections

from refseg_jax import optimizer
from refseg_jax import sharding
from refseg_jax.models import convert
from refseg_jax.tasks import base


class TrainState(train_state.TrainState):
  """Step, params, optimizer state, and the BatchNorm running statistics."""
  batch_stats: Any = None


def _load_model_init(config: ml_collections.ConfigDict, state: TrainState,
                     shardings: Any) -> TrainState:
  """`state` with the pretrained modules `config.model_init` names.

  `refseg_jax.models.convert` reads and checks them (a shape mismatch is an
  error naming the tensor); every host reads the files and places its own
  shards.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  loaded = {}
  for name, converted in convert.load_modules(config.model_init,
                                              variables).items():
    for (collection, *rest), value in traverse_util.flatten_dict(
        converted.variables).items():
      loaded[(collection, name, *rest)] = value

  def pick(path, current, target_sharding):
    value = loaded.get(tuple(k.key for k in path))
    if value is None:
      return current
    return jax.make_array_from_callback(value.shape, target_sharding,
                                        lambda index: value[index])

  variables = jax.tree_util.tree_map_with_path(
      pick, variables,
      {'params': shardings.params, 'batch_stats': shardings.batch_stats})
  return state.replace(**variables)


def initialiser(config: ml_collections.ConfigDict, task: base.Task):
  """`rng -> TrainState`: the task's fresh variables and the optimiser."""
  tx = optimizer.make(config.total_steps, **config.optimizer).tx

  def init(rng: jax.Array) -> TrainState:
    variables = task.init_variables(rng)
    return TrainState.create(apply_fn=task.model.apply,
                             params=variables['params'],
                             batch_stats=variables.get('batch_stats', {}),
                             tx=tx)

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
