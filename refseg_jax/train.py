"""The training loop: `train_and_evaluate(config, workdir)`.

One jit-compiled train step over a config-defined `jax.sharding.Mesh`
(`refseg_jax.sharding`): batches are split over every mesh axis, large
parameters sharded over the FSDP axis; each host feeds only its own slice
of the data. The same code runs on one CPU, a GPU box and a multi-host TPU
pod (after `jax.distributed.initialize()`, which `refseg_jax.main` calls
when asked). What is trained is `config.task` (`refseg_jax.tasks`): the
loop knows models, losses and responses only through it.

What `workdir` ends up holding:

    checkpoints/, best/   train states and best params (`checkpointing`)
    overlays/             predictions drawn over images at each evaluation
    config.json, results.json, eval_history.json   (`results`)
    events.out.tfevents*  TensorBoard scalars and overlays (clu writers)

A resumed run continues from the latest checkpoint at the same step, each
host at the input position the checkpoint saved, so N steps + resume + N
steps equal 2N uninterrupted steps; on any mesh (orbax reshards); and only
if the config still trains the same thing (`config_lib.check_resume`).
Only process 0 writes files other than checkpoints. SIGTERM (preemption)
saves a checkpoint at the current step and returns cleanly; a non-finite
loss or gradient stops the run with an error naming the step before any
later checkpoint is written (or, with `config.skip_nonfinite_updates`,
that step's update is skipped).
"""

from __future__ import annotations

import fractions
import math
import time
from typing import Any, Mapping, Sequence

from absl import logging
from clu import metric_writers
from clu.data import dataset_iterator
from clu import periodic_actions
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image

from refseg_jax import checkpointing
from refseg_jax import config_lib
from refseg_jax import host_memory
from refseg_jax import optimizer
from refseg_jax import results
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train_state
from refseg_jax import visualize
from refseg_jax.data import build
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator as evaluator_lib
from refseg_jax.tasks import base

Batch = Mapping[str, jax.Array]


# --------------------------------------------------------------- train step

def loss_and_grads(task: base.Task, params: Any, batch_stats: Any,
                   batch: Batch, step: jax.Array):
  """((total loss, (its terms, updated batch stats)), gradients) of one
  training forward pass of `task` on `batch` at `step` (its rngs folded
  from the step, as `Task.train_rngs` draws them)."""
  def compute_loss(params):
    outputs, updates = task.forward(
        {'params': params, 'batch_stats': batch_stats}, batch, train=True,
        rngs=task.train_rngs(step), mutable=['batch_stats'])
    total, terms = task.loss(outputs, batch, step)
    return total, (terms, updates)

  return jax.value_and_grad(compute_loss, has_aux=True)(params)


def make_train_step(config: ml_collections.ConfigDict, task: base.Task,
                    mesh: jax.sharding.Mesh, state_shardings: Any):
  """The jitted `(state, batch) -> (state, metrics)`; state is donated.

  Metrics (loss, its terms, gradient norm, learning rate) come back
  replicated. The rng keys are folded from the seed and the step
  (`Task.train_rngs`), so a resumed run draws the same ones. With
  `config.skip_nonfinite_updates`, a step whose loss or gradient is not
  finite only advances the step count, and reports `skipped_updates` = 1.
  """
  schedule = optimizer.make(config.total_steps, **config.optimizer).schedule

  def step_fn(state: train_state.TrainState, batch: Batch):
    batch = task.pseudo_label(
        jax.lax.stop_gradient(state.eval_variables()), batch, state.step)
    (total, (terms, updates)), grads = loss_and_grads(
        task, state.params, state.batch_stats, batch, state.step)
    grad_norm = optax.tree.norm(grads)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates.get('batch_stats', {}))
    step_metrics = {'loss': total, **terms, 'grad_norm': grad_norm,
                    'learning_rate': schedule(state.step)}
    if config.skip_nonfinite_updates:
      # Over the whole state, not only the optimiser's updates (as
      # optax.apply_if_finite would): the batch statistics and the EMA of
      # a non-finite step are not finite either.
      finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
      new_state = jax.tree.map(
          lambda new, old: jnp.where(finite, new, old), new_state,
          state.replace(step=new_state.step))
      step_metrics['skipped_updates'] = 1.0 - finite.astype(jnp.float32)
    return new_state, step_metrics

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0)


def _compile(train_step, state, batch: Batch, writer, step: int):
  """Compiles the train step ahead of time, logging how long it took."""
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  host_memory.release_freed()  # What the compiler freed, before the steps.
  writer.write_scalars(step, {'compile_time_s': seconds})
  logging.info('Train step compiled in %.1f s.', seconds)
  return compiled


# ------------------------------------------------------------------ logging

class _TrainWindow:
  """Train metrics since the last log line, and their throughput."""

  def __init__(self, batch_size: int, skip_nonfinite: bool):
    self._batch_size = batch_size
    self._skip_nonfinite = skip_nonfinite
    self.restart()

  def restart(self) -> None:
    self._steps, self._metrics, self._start = [], [], time.perf_counter()
    self._checked = 0  # Steps of the window already checked.

  def add(self, step: int, step_metrics: Mapping[str, jax.Array]) -> None:
    self._steps.append(step)
    self._metrics.append(step_metrics)

  def check_finite(self) -> None:
    """Raises if a step of the window had a non-finite loss or gradient
    (and `skip_nonfinite` is off). Called only where the loop logs, saves
    or evaluates, so the host waits for the device there, not every step.

    Raises:
      FloatingPointError: naming the first such step and its loss terms.
    """
    if self._skip_nonfinite:
      return
    new = slice(self._checked, None)
    self._checked = len(self._metrics)
    for step, values in zip(self._steps[new],
                            jax.device_get(self._metrics[new])):
      if not (np.isfinite(values['loss']) and
              np.isfinite(values['grad_norm'])):
        terms = {k: float(v) for k, v in values.items()}
        raise FloatingPointError(
            f'Non-finite loss or gradient at step {step}: {terms}. Stopping; '
            'the latest checkpoint is from before it: lower the learning '
            'rate or check the data, then resume (or set '
            'config.skip_nonfinite_updates).')

  def write(self, writer, step: int) -> None:
    """Writes the window's means and examples/s, and starts a new one."""
    if not self._metrics:
      return
    means = jax.tree.map(lambda *x: float(np.mean(x)),
                         *jax.device_get(self._metrics))
    if means.get('skipped_updates'):
      logging.warning('Skipped %d non-finite updates in steps %d-%d.',
                      round(means['skipped_updates'] * len(self._metrics)),
                      self._steps[0], self._steps[-1])
    elapsed = time.perf_counter() - self._start
    means['examples_per_sec'] = len(self._metrics) * self._batch_size / elapsed
    means['step_time_ms'] = 1e3 * elapsed / len(self._metrics)
    writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
    self.restart()


def _log_eval(writer, step: int, split: str, values: Mapping[str, float],
              picture: Image.Image | None, workdir: epath.Path) -> None:
  """Scalars and overlays to TensorBoard; history and PNG on process 0."""
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
  logging.info('step %d %s: %s', step, split, ', '.join(
      f'{k} {v:.4g}' for k, v in values.items()))
  if jax.process_index() > 0:
    return
  results.append_history(workdir / 'eval_history.json',
                         {'step': step, 'split': split, **values})
  if picture is not None:
    writer.write_images(step, {f'{split}/overlays': np.asarray(picture)[None]})
    visualize.write_png(picture,
                        workdir / 'overlays' / f'{split}_step{step:06d}.png')


# --------------------------------------------------------------- evaluation

def _evaluate(evaluator: evaluator_lib.Evaluator, state, step: int,
              splits: Sequence[str], writer, workdir: epath.Path,
              best: ocp.CheckpointManager, best_split: str
              ) -> dict[str, dict[str, float]]:
  """Evaluates and logs `splits`; keeps the params if `best_split` improved."""
  scores = {}
  for split in splits:
    logging.info('Evaluating step %d on %s.', step, split)
    scores[split], picture = evaluator.evaluate(state.eval_variables(), split)
    _log_eval(writer, step, split, scores[split], picture, workdir)
  if best_split in scores:
    checkpointing.save_best(best, step, state, scores[best_split])
  return scores


# --------------------------------------------------------------------- loop

def _check_writable(workdir: epath.Path) -> None:
  """Makes `workdir` and writes a file there: a workdir that cannot be
  written fails now, not after the data, the compilation and the first
  checkpoint interval.

  Raises:
    OSError: naming the workdir.
  """
  probe = workdir / f'.write_test.process_{jax.process_index()}'
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as error:
    raise OSError(f'Cannot write to the workdir {workdir}: {error}') from error


def resolve_total_steps(config: ml_collections.ConfigDict,
                        num_train_expressions: int) -> int:
  """The run's length in steps: `config.total_steps`, or from its epochs.

  Args:
    config: a training config; `config.total_epochs` (None or absent: use
      `config.total_steps`) and `config.batch_size` are read.
    num_train_expressions: expressions in the whole training split (all
      hosts), e.g. `pipeline.count_expressions(config.data, 'train')`.

  Returns:
    total_epochs * ceil(num_train_expressions / batch_size), rounded up,
    when `config.total_epochs` is set (an epoch is as many steps as the
    official SaG loader's: its last, partial batch counts), else
    `config.total_steps`.

  Raises:
    ValueError: `total_epochs` set but not positive.
  """
  epochs = config.get('total_epochs')
  if epochs is None:
    return config.total_steps
  if not epochs > 0:
    raise ValueError(f'config.total_epochs must be positive; got {epochs}.')
  steps_per_epoch = math.ceil(num_train_expressions / config.batch_size)
  # Exact arithmetic on the decimal the user wrote: in floats, 0.1 epochs
  # of 10 steps are 1.0000000000000002 steps, which would round up to 2.
  return math.ceil(fractions.Fraction(repr(float(epochs))) * steps_per_epoch)


def _start_or_resume(config: ml_collections.ConfigDict, task: base.Task,
                     mesh: jax.sharding.Mesh, latest: ocp.CheckpointManager,
                     accept_config_changes: Sequence[str]
                     ) -> tuple[train_state.TrainState, Any,
                                dataset_iterator.TfDatasetIterator]:
  """(train state, its shardings, this host's batches): fresh, or from the
  latest checkpoint.

  A resumed state is read straight into this mesh's shardings (any mesh:
  orbax reshards), without initialising or reading pretrained weights, and
  only after its config was checked against `config`. The batches continue
  where the checkpoint left them; a checkpoint without this host's input
  position (saved without it, or by another number of hosts) is continued
  by skipping the batches already trained on.
  """
  step = latest.latest_step()
  if step is None:
    state, shardings = train_state.create(config, task, mesh)
  else:
    changes = config_lib.check_resume(
        checkpointing.saved_config(latest, step), config,
        accept_config_changes, where=f'{latest.directory}/{step}')
    for key, (old, new) in changes.items():
      logging.warning('Resuming with config %s = %r (the checkpoint has %r).',
                      key, new, old)
    state, shardings = train_state.shapes_and_shardings(config, task, mesh)
  restore_input = False
  if step is not None and config.data.checkpoint_iterator:
    restore_input = checkpointing.has_input_position(latest, step)
    if not restore_input:
      logging.warning('%s/%d holds no input position for process %d of %d: '
                      'skipping %d batches instead.', latest.directory, step,
                      jax.process_index(), jax.process_count(), step)
  batches = dataset_iterator.TfDatasetIterator(
      pipeline.train_dataset(
          config.data, task.supervision, config.batch_size, config.seed,
          jax.process_index(), jax.process_count(),
          skip_batches=0 if step is None or restore_input else step),
      checkpoint=config.data.checkpoint_iterator)
  if step is not None:
    state = checkpointing.restore_state(
        latest, step, state, shardings, batches if restore_input else None)
    logging.info('Resumed from %s at step %d.', latest.directory, step)
  return state, shardings, batches


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       accept_config_changes: Sequence[str] = ()
                       ) -> train_state.TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Args:
    config: a training config (`configs/*.py`). If `config.total_epochs`
      is set, `config.total_steps` is overwritten with its steps
      (`resolve_total_steps`) at the start; `config.eval.every_steps` is
      left as it is.
    workdir: a local or remote (e.g. gs://) directory, shared by all hosts.
    accept_config_changes: config keys that may differ from the resumed
      checkpoint's config although they change the training
      (`config_lib.check_resume`).

  Returns:
    The final (or, after SIGTERM, the last saved) train state.
  """
  workdir = epath.Path(workdir)
  _check_writable(workdir)
  if config.data.prepare:
    build.build_on_first_host(config.data.name, config.data.data_dir)
  if config.get('total_epochs') is not None:
    # Before anything reads total_steps (the optimiser's schedule, the
    # loop, the resume check): the checkpoints then save the resolved
    # value, and an unchanged config resolves to it again on resuming.
    # Every host counts the whole split, so all agree.
    num_expressions = pipeline.count_expressions(config.data, 'train')
    config.total_steps = resolve_total_steps(config, num_expressions)
    logging.info('total_steps = %d (%g epochs of %d expressions / %d).',
                 config.total_steps, config.total_epochs, num_expressions,
                 config.batch_size)
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  task = tasks.build(config, tokenizer.vocab_size)
  latest, best = checkpointing.managers(workdir, config)
  state, state_shardings, batches = _start_or_resume(
      config, task, mesh, latest, accept_config_changes)
  start_step = int(state.step)
  if start_step >= config.total_steps:
    logging.info('%s is already trained to step %d; nothing to do.',
                 workdir, start_step)
    latest.close()
    best.close()
    return state

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0)
  # At the start: the code and config that run (the tree may change later).
  provenance = results.provenance(config)
  if jax.process_index() == 0:
    results.write_json(workdir / 'config.json', config.to_dict())
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Task %s; mesh %s; %d parameters; %d devices over %d hosts.',
               config.task, dict(mesh.shape), num_params, jax.device_count(),
               jax.process_count())

  batch_sharding = sharding.batch_sharding(mesh)
  train_step = make_train_step(config, task, mesh, state_shardings)
  evaluator = evaluator_lib.Evaluator(config, task, mesh,
                                      state_shardings.eval_variables())
  report = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer,
      every_steps=config.log_every_steps)
  watcher = checkpointing.PreemptionWatcher()
  saved_input = batches if config.data.checkpoint_iterator else None

  try:
    window = _TrainWindow(config.batch_size, config.skip_nonfinite_updates)
    for step in range(start_step + 1, config.total_steps + 1):
      batch = sharding.global_batch(next(batches), batch_sharding)
      if step == start_step + 1:
        train_step = _compile(train_step, state, batch, writer, step)
        window.restart()
      state, step_metrics = train_step(state, batch)
      window.add(step, step_metrics)
      report(step)
      is_last = step == config.total_steps
      if is_last or step % config.log_every_steps == 0:
        window.check_finite()
        window.write(writer, step)

      if is_last or step % config.eval.every_steps == 0:
        window.check_finite()
        splits = config.eval.final_splits if is_last else config.eval.splits
        scores = _evaluate(evaluator, state, step, splits, writer, workdir,
                           best, config.eval.best_split)
        if is_last and jax.process_index() == 0:
          results.write_json(workdir / 'results.json', {
              **scores, 'step': step, 'provenance': provenance})
        window.restart()  # Evaluation is not train time.

      if is_last or step % config.checkpoint_every_steps == 0:
        window.check_finite()
        checkpointing.save_state(latest, step, state, config, saved_input)
      elif watcher.should_stop(step, latest):
        window.check_finite()
        checkpointing.save_state(latest, step, state, config, saved_input)
        logging.warning('Preempted: saved step %d in %s; exiting.', step,
                        latest.directory)
        break
  finally:
    watcher.close()
    latest.close()  # Waits for the saves in flight.
    best.close()
    writer.close()
  return state
