"""Checkpoints (orbax) and preemption.

    WORKDIR/checkpoints/<step>/   the latest train states, resumed from
    WORKDIR/best/<step>/          params of the best `config.eval.best_split`
                                  mIoU

Orbax writes each step into a temporary directory and renames it into
place when complete, so a killed run never leaves a partial checkpoint that
looks complete. SIGTERM (one host) or JAX's preemption sync point (several
hosts) asks the loop to save the current step and stop.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Mapping

from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp


def managers(workdir: epath.Path, config: ml_collections.ConfigDict
             ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
  """(latest train states, best params) managers of `workdir`."""
  latest = ocp.CheckpointManager(
      workdir / 'checkpoints',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True))
  best = ocp.CheckpointManager(
      workdir / 'best',
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: m['mIoU'], best_mode='max',
          create=True))
  return latest, best


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def restore(manager: ocp.CheckpointManager, state: Any,
            state_shardings: Any) -> Any:
  """The manager's latest checkpoint, laid out as `state` (a train state or
  its shapes) and its shardings."""
  return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
      _abstract(state, state_shardings)))


def restore_latest(workdir: epath.Path, state: Any,
                   state_shardings: Any) -> Any | None:
  """`workdir`'s latest checkpoint (None if it has none), laid out as
  `state` and its shardings."""
  if not (workdir / 'checkpoints').exists():
    return None
  with ocp.CheckpointManager(workdir / 'checkpoints') as latest:
    if latest.latest_step() is None:
      return None
    return restore(latest, state, state_shardings)


def save_state(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves the whole train state at `step` (even off the save interval)."""
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def save_best(manager: ocp.CheckpointManager, step: int, state: Any,
              metrics: Mapping[str, float]) -> None:
  """Keeps the evaluated variables (params, or their average, and batch
  statistics) if `metrics['mIoU']` is the best so far."""
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
