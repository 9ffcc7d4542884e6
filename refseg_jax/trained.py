"""A trained workdir, ready to use: `load(workdir, checkpoint)`.

What evaluation (`refseg_jax.evaluate`), prediction (`refseg_jax.predict`)
and the notebooks share: the config the run saved (`WORKDIR/config.json`),
the task and tokenizer it names, and the variables of one checkpoint
('best', 'latest' or a step; `checkpointing.restore_variables`), placed on
a mesh. A workdir that `refseg_jax.models.convert --workdir` wrote from
imported weights loads the same way.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath
import jax
import ml_collections
import transformers

from refseg_jax import checkpointing
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train_state
from refseg_jax.data import pipeline
from refseg_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class Trained:
  """One checkpoint of a workdir, with what it takes to run it.

  Attributes:
    workdir: the workdir.
    config: its saved config.
    task: the task the config names.
    tokenizer: the config's tokenizer.
    mesh: the mesh the variables are placed on.
    variables: the evaluation variables ('params', 'batch_stats').
    variable_shardings: their shardings.
    checkpoint: 'best', 'latest' or 'step': what was restored.
    step: the training step of the checkpoint.
  """
  workdir: epath.Path
  config: ml_collections.ConfigDict
  task: base.Task
  tokenizer: transformers.PreTrainedTokenizerFast
  mesh: jax.sharding.Mesh
  variables: dict[str, Any]
  variable_shardings: Any
  checkpoint: str
  step: int


def load_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir` (its config.json)."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise FileNotFoundError(
        f'{path} does not exist: {workdir} is not a training workdir '
        '(`refseg_jax.main` writes config.json when a run starts).')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def single_device_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The config's mesh axes, each of size 1, on this host's first device
  (prediction: one image at a time)."""
  return sharding.make_mesh([(name, 1) for name, _ in config.mesh],
                            devices=jax.local_devices()[:1])


def load(workdir: str | epath.Path, checkpoint: str = 'best',
         mesh: jax.sharding.Mesh | None = None) -> Trained:
  """Restores one checkpoint of `workdir` with the config it was trained
  with.

  Args:
    workdir: a training workdir (local or gs://).
    checkpoint: 'best', 'latest' or a step number (see
      `checkpointing.restore_variables`).
    mesh: where to place the variables; default: the config's mesh over
      every device.

  Raises:
    FileNotFoundError: no config.json or no checkpoint (naming the path).
    ValueError: the saved config no longer builds a model with this code
      (naming config.json and the cause), or a bad checkpoint choice.
  """
  workdir = epath.Path(workdir)
  config = load_config(workdir)
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  try:
    task = tasks.build(config, tokenizer.vocab_size)
    shapes, state_shardings = train_state.shapes_and_shardings(config, task,
                                                               mesh)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(
        f'The config in {workdir / "config.json"} no longer loads with this '
        f'code ({type(e).__name__}: {e}). Retrain, or edit config.json to '
        'the current configs/ fields.') from e
  variables, kind, step = checkpointing.restore_variables(
      workdir, checkpoint, shapes, state_shardings)
  return Trained(workdir=workdir, config=config, task=task,
                 tokenizer=tokenizer, mesh=mesh, variables=variables,
                 variable_shardings=state_shardings.eval_variables(),
                 checkpoint=kind, step=step)
