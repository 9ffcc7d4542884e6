"""The task registry: `config.task` names a model under one supervision.

    pks_full    PKS trained on masks            (tasks/pks_full.py)
    pks_click   PKS trained on clicks           (tasks/pks_click.py)
    pks_mixed   PKS trained on a per-example mix of masks, clicks and text
                only, with a teacher's pseudo-labels (tasks/pks_mixed.py)
    sag_text    Shatter and Gather on text only (tasks/sag_text.py)

Each is a `refseg_jax.tasks.base.Task`: the training loop, evaluation,
benchmarks and prediction reach models, losses and responses only through
it. A new task is a module with a `Task` subclass, added here.
"""

from __future__ import annotations

import ml_collections

from refseg_jax.tasks import base
from refseg_jax.tasks import pks_click
from refseg_jax.tasks import pks_full
from refseg_jax.tasks import pks_mixed
from refseg_jax.tasks import sag_text

TASKS: dict[str, type[base.Task]] = {
    'pks_full': pks_full.PKSFull,
    'pks_click': pks_click.PKSClick,
    'pks_mixed': pks_mixed.PKSMixed,
    'sag_text': sag_text.SaGText,
}


def get(name: str) -> type[base.Task]:
  """The task class registered as `name`; a ValueError lists the known."""
  if name not in TASKS:
    raise ValueError(f'Unknown config.task {name!r}; known: {sorted(TASKS)}.')
  return TASKS[name]


def build(config: ml_collections.ConfigDict, vocab_size: int) -> base.Task:
  """The task `config.task` names, its model built from `config.model`."""
  return get(config.task)(config, vocab_size)
