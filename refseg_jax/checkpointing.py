"""Checkpoints (orbax) and preemption.

    WORKDIR/checkpoints/<step>/   what a run resumes from, three items:
        state/                    the train state
        config/                   the config that trained it (JSON)
        data/process_I-of-N.*     each host's position in its input pipeline
                                  (if `config.data.checkpoint_iterator`)
    WORKDIR/best/<step>/          params of the best `config.eval.best_split`
                                  mIoU (the variables evaluation applies)

`restore_variables` reads either for evaluation and prediction.

Orbax writes each step into a temporary directory and renames it into
place when complete, so a killed run never leaves a partial checkpoint that
looks complete. SIGTERM (one host) or JAX's preemption sync point (several
hosts) asks the loop to save the current step and stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Any, Mapping

from absl import logging
from clu.data import dataset_iterator
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp


def managers(workdir: epath.Path, config: ml_collections.ConfigDict
             ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """(latest train states, best params) managers of `workdir`."""
  # cleanup_tmp_directories: a run killed while saving leaves the save's
  # temporary directory; the next run removes it.
  latest = ocp.CheckpointManager(
      workdir / 'checkpoints',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True,
          cleanup_tmp_directories=True))
  best = ocp.CheckpointManager(
      workdir / 'best',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=_best_mIoU, best_mode='max',
          create=True, cleanup_tmp_directories=True))
  return latest, best


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  return manager.directory / str(step)  # Orbax's default step naming.


def _host_file(directory: epath.Path) -> epath.Path:
  return directory / f'process_{jax.process_index()}-of-{jax.process_count()}'


class _InputPositionHandler(ocp.CheckpointHandler):
  """Saves and restores each host's clu `TfDatasetIterator` (tf.data's own
  iterator checkpoint: the shuffle buffer and where each file is read),
  one file per process, as grain's orbax handler does for its iterators.

  Synchronous: a tf.data iterator must be saved before it moves on.
  """

  def save(self, directory: epath.Path, args: 'InputPositionSave') -> None:
    directory.mkdir(parents=True, exist_ok=True)
    args.iterator.save(_host_file(directory))

  def restore(self, directory: epath.Path, args: 'InputPositionRestore'
              ) -> dataset_iterator.TfDatasetIterator:
    args.iterator.restore(_host_file(directory))
    return args.iterator


@ocp.args.register_with_handler(_InputPositionHandler, for_save=True)
@dataclasses.dataclass
class InputPositionSave(ocp.args.CheckpointArgs):
  iterator: dataset_iterator.TfDatasetIterator


@ocp.args.register_with_handler(_InputPositionHandler, for_restore=True)
@dataclasses.dataclass
class InputPositionRestore(ocp.args.CheckpointArgs):
  iterator: dataset_iterator.TfDatasetIterator


def has_input_position(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` holds this host's input position (not when
  saved without it or by another number of hosts)."""
  path = _host_file(_step_dir(manager, step) / 'data')
  return path.with_name(path.name + '.index').exists()


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The config (as a dict) that checkpoint `step` was trained with.

  Raises:
    ValueError: the checkpoint has none (written before checkpoints held
      their config), naming it.
  """
  if not (_step_dir(manager, step) / 'config').exists():
    raise ValueError(
        f'{_step_dir(manager, step)} holds no config (written by an '
        'older refseg_jax): it cannot be checked, so it is not resumed. '
        'Start in a new --workdir.')
  return manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore())).config


def restore_state(manager: ocp.CheckpointManager, step: int,
                  state_shapes: Any, state_shardings: Any,
                  iterator: dataset_iterator.TfDatasetIterator | None = None
                  ) -> Any:
  """The train state of checkpoint `step`, placed in `state_shardings`
  (which may be another mesh's than the saved one's).

  Args:
    manager: of WORKDIR/checkpoints.
    step: the step to restore.
    state_shapes: the train state or its shapes (`jax.eval_shape`).
    state_shardings: where its arrays go.
    iterator: if given, moved to this host's saved input position
      (`has_input_position` must hold).
  """
  items = {'state': ocp.args.StandardRestore(
      _abstract(state_shapes, state_shardings))}
  if iterator is not None:
    items['data'] = InputPositionRestore(iterator)
  with _reading(manager, step):
    return manager.restore(step, args=ocp.args.Composite(**items)).state


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int):
  """Re-raises a failure to read checkpoint `step` naming its directory and
  what the user can do (orbax's own error names a file deep inside it)."""
  try:
    yield
  except (ValueError, OSError) as error:
    others = sorted(set(manager.all_steps()) - {step})
    reason = str(error).split('[tensorstore_spec')[0].strip()
    raise ValueError(
        f'Checkpoint {_step_dir(manager, step)} cannot be read: corrupt, '
        f'incomplete, or not this model\'s state ({reason[:400]}). If it is '
        f'damaged, delete it to use another step of {manager.directory} '
        f'({others or "none left"}), or start a new --workdir.') from error


def _best_mIoU(metrics: Mapping[str, float]) -> float:
  return metrics['mIoU']


def _read_manager(directory: epath.Path, **options: Any
                  ) -> ocp.CheckpointManager | None:
  """A read-only manager of `directory`; None if it holds no checkpoint."""
  if not directory.exists():
    return None
  # Read-only: a reader must not clean up the temporary directory of a
  # save that a running training has in flight. (Its defaults set to what
  # read_only implies, which orbax otherwise warns about.)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          read_only=True, save_interval_steps=0, create=False, **options))
  if manager.latest_step() is None:
    manager.close()
    return None
  return manager


def restore_variables(workdir: epath.Path, checkpoint: str, state: Any,
                      state_shardings: Any) -> tuple[dict[str, Any], str, int]:
  """The evaluation variables (params or their average, batch statistics)
  of one of `workdir`'s checkpoints, laid out as `state.eval_variables()`.

  Args:
    workdir: a training workdir (or one `refseg_jax.models.convert` made).
    checkpoint: 'best' (WORKDIR/best: the best scored variables, or those
      `refseg_jax.models.convert --workdir` wrote; a run not evaluated yet
      falls back to 'latest' with a warning), 'latest', or a step number of
      WORKDIR/checkpoints.
    state: the train state, or its shapes.
    state_shardings: its shardings.

  Returns:
    (variables, 'best' or 'latest' or 'step', the step restored).

  Raises:
    FileNotFoundError: `workdir` has no checkpoint (naming the directory).
    ValueError: an unknown choice, or a step the workdir does not hold
      (listing those it does).
  """
  if checkpoint not in ('best', 'latest') and not checkpoint.isdigit():
    raise ValueError(f'--checkpoint={checkpoint!r}: expected best, latest or '
                     'a step number.')
  if checkpoint == 'best':
    best = _read_manager(workdir / 'best', best_fn=_best_mIoU,
                         best_mode='max')
    if best is not None:
      with best:
        step = best.best_step()
        if step is None:  # Unscored: the variables `convert --workdir` wrote.
          step = best.latest_step()
        with _reading(best, step):
          variables = best.restore(step, args=ocp.args.StandardRestore(
              _abstract(state.eval_variables(),
                        state_shardings.eval_variables())))
      return variables, 'best', step
    logging.warning('%s has no best checkpoint (it is written at '
                    'evaluations); using the latest train state.', workdir)
  latest = _read_manager(workdir / 'checkpoints')
  if latest is None:
    raise FileNotFoundError(
        f'No checkpoint in {workdir / "checkpoints"}: train with '
        '`python -m refseg_jax.main` or convert weights with '
        '`python -m refseg_jax.models.convert --workdir=...` first.')
  with latest:
    step = latest.latest_step() if not checkpoint.isdigit() else int(
        checkpoint)
    if step not in latest.all_steps():
      raise ValueError(f'{workdir / "checkpoints"} has no step {step}; it '
                       f'holds steps {sorted(latest.all_steps())}.')
    restored = restore_state(latest, step, state, state_shardings)
  return (restored.eval_variables(),
          'step' if checkpoint.isdigit() else 'latest', step)


def save_state(manager: ocp.CheckpointManager, step: int, state: Any,
               config: ml_collections.ConfigDict,
               iterator: dataset_iterator.TfDatasetIterator | None = None
               ) -> None:
  """Saves the train state at `step` (even off the save interval), with the
  config and, if given, this host's input position."""
  items = {'state': ocp.args.StandardSave(state),
           'config': ocp.args.JsonSave(config.to_dict())}
  if iterator is not None:
    items['data'] = InputPositionSave(iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def save_best(manager: ocp.CheckpointManager, step: int, state: Any,
              metrics: Mapping[str, float]) -> None:
  """Keeps the evaluated variables (params, or their average, and batch
  statistics) if `metrics['mIoU']` is the best so far.

  A step already kept is left as it is: a run killed after this save but
  before its train state's evaluates that step again on resuming, to the
  same variables and scores.
  """
  if step in manager.all_steps():
    return
  manager.save(step, args=ocp.args.StandardSave(state.eval_variables()),
               metrics=dict(metrics))


class PreemptionWatcher:
  """Says when to save and stop: SIGTERM on one host; the pod-wide sync
  point (JAX's preemption service) when several hosts run."""

  def __init__(self):
    self._requested = threading.Event()
    self._multihost = jax.process_count() > 1
    # Only the main thread may set handlers (a notebook may train in another
    # thread; it then has no preemption handling).
    self._handler = (not self._multihost and
                     threading.current_thread() is threading.main_thread())
    if self._handler:
      signal.signal(signal.SIGTERM, lambda *_: self._requested.set())

  def should_stop(self, step: int, manager: ocp.CheckpointManager) -> bool:
    if self._multihost:
      return manager.reached_preemption(step)
    return self._requested.is_set()

  def close(self) -> None:
    if self._handler:
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
