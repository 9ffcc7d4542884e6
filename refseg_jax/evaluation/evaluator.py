"""Scoring a model's variables on evaluation splits: `Evaluator`.

One jitted step per batch runs the task's inference forward pass, takes its
response map (`refseg_jax.tasks.base.Task.response_map`) and accumulates
`RESMetrics` at the original resolution; batches are sharded over the mesh
like training batches, each host reading its own slice. The first batch's
predictions are drawn over the images.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from PIL import Image

from refseg_jax import sharding
from refseg_jax import visualize
from refseg_jax.data import pipeline
from refseg_jax.evaluation import metrics as res_metrics
from refseg_jax.tasks import base

# Eval fields that stay on the host (strings, or only needed for pictures).
HOST_ONLY_FIELDS = ('sentence',)


def device_fields(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The fields of a host batch that go to the devices (no strings)."""
  return {k: v for k, v in batch.items() if k not in HOST_ONLY_FIELDS}


def make_eval_step(task: base.Task, mesh: jax.sharding.Mesh,
                   variable_shardings: Any):
  """The jitted `(variables, batch) -> (RESMetrics, response [B, S, S])`.

  `variables` are what the model is applied with (a train state's
  `eval_variables()`, or a restored best checkpoint). The response is the
  task's, thresholded at 0, drawn with the task's fixed evaluation keys, so
  an evaluation is reproducible.
  """
  size = task.config.data.image_size

  def step_fn(variables, batch):
    outputs = task.forward(variables, batch, train=False,
                           rngs=task.eval_rngs())
    response = task.response_map(outputs, size, batch['content_size'])
    batch_metrics = res_metrics.RESMetrics.from_model_output(
        response, batch['eval_mask'], batch['orig_size'],
        batch['content_size'], batch['valid'])
    return batch_metrics, response

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(variable_shardings, batch_sharding),
                 out_shardings=(replicated, batch_sharding))


class Evaluator:
  """Scores a model's variables on eval splits, and draws a few predictions.

  Constructed with the variables' shardings (`state_shardings.
  eval_variables()`); `evaluate` takes the variables themselves.
  """

  def __init__(self, config: ml_collections.ConfigDict, task: base.Task,
               mesh: jax.sharding.Mesh, variable_shardings: Any):
    self._config = config
    self._mesh = mesh
    self._step_fn = make_eval_step(task, mesh, variable_shardings)
    self._sharding = sharding.batch_sharding(mesh)
    self._num_batches: dict[str, int] = {}

  def evaluate(self, variables: Any, split: str
               ) -> tuple[dict[str, float], Image.Image | None]:
    """(metrics of `split`, overlay picture of its first batch: the same
    examples at every evaluation)."""
    config = self._config
    if split not in self._num_batches:
      self._num_batches[split] = pipeline.num_eval_batches(
          config.data, split, config.eval.batch_size)
    ds = pipeline.eval_dataset(
        config.data, split, config.eval.batch_size, self._num_batches[split],
        jax.process_index(), jax.process_count())
    total, picture = res_metrics.RESMetrics.empty(), None
    for batch in ds.as_numpy_iterator():
      batch_metrics, response = self._step_fn(
          variables,
          sharding.global_batch(device_fields(batch), self._sharding))
      total = total.merge(batch_metrics)
      if picture is None and config.eval.num_overlays:
        local = multihost_utils.global_array_to_host_local_array(
            response, self._mesh, self._sharding.spec)
        picture = visualize.overlay_grid(batch, np.asarray(local),
                                         config.eval.num_overlays)
    return total.compute(), picture
