"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One jit-compiled train step and one eval step over a config-defined
`jax.sharding.Mesh` (`refseg_jax.sharding`): batches are split over every
mesh axis, large parameters sharded over the FSDP axis; each host feeds
only its own slice of the data. The same code runs on one CPU, a GPU box
and a multi-host TPU pod (after `jax.distributed.initialize()`, which
`refseg_jax.main` calls when asked).

What `workdir` ends up holding:

    checkpoints/<step>/   latest train states (orbax), resumed from
    best/<step>/          params of the best `config.eval.best_split` mIoU
    overlays/             predictions drawn over images at each evaluation
    config.json           the config the run used
    results.json          final evaluation, {split: {metric: value}, "step": N}
    eval_history.json     every evaluation, [{"step", "split", metric: value}]
    events.out.tfevents*  TensorBoard scalars and overlays (clu writers)

A resumed run continues from the latest checkpoint at the same step on the
same data order (the pipeline skips the batches already seen), so N steps
+ resume + N steps equal 2N uninterrupted steps. SIGTERM (preemption) saves
a checkpoint at the current step and returns cleanly; a non-finite loss
stops the run with an error naming the step.
"""

from __future__ import annotations

import functools
import json
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax.linen as nn
from flax import traverse_util
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from PIL import Image

from refseg_jax import losses
from refseg_jax import sharding
from refseg_jax import visualize
from refseg_jax.data import build
from refseg_jax.data import pipeline
from refseg_jax.evaluation import metrics as res_metrics
from refseg_jax.models import convert
from refseg_jax.models import pks
from refseg_jax.models import sag

Batch = Mapping[str, jax.Array]
# Eval fields that stay on the host (strings, or only needed for pictures).
_HOST_ONLY_FIELDS = ('sentence',)


class TrainState(train_state.TrainState):
  """Step, params, optimizer state, and the BatchNorm running statistics."""
  batch_stats: Any = None


MODELS = {'pks': pks.PKS, 'sag': sag.SaG}


def create_model(model_config: ml_collections.ConfigDict,
                 vocab_size: int) -> nn.Module:
  """The flax model `config.model.name` names, with the config's fields."""
  if model_config.name not in MODELS:
    raise ValueError(f'Unknown config.model.name {model_config.name!r}; '
                     f'known: {sorted(MODELS)}.')
  fields = {k: v for k, v in model_config.items() if k != 'name'}
  fields['dtype'] = jnp.dtype(fields['dtype'])
  return MODELS[model_config.name](vocab_size=vocab_size, **fields)


def _train_call(model: nn.Module, batch: Batch) -> dict[str, Any]:
  """What the model's training forward pass takes besides the inputs:
  PKS reads the kernel at the centre click, SaG scores every pair."""
  if isinstance(model, pks.PKS):
    return {'centre': batch['clicks'][:, 0]}
  return {'all_pairs': True}


def _response(model: nn.Module, outputs: Mapping[str, jax.Array],
              size: int) -> jax.Array:
  """[B, size, size] map thresholded at 0 (see `make_eval_step`)."""
  if isinstance(model, pks.PKS):
    logits = outputs['mask_logits']
    return jax.image.resize(logits, (logits.shape[0], size, size), 'bilinear')
  return sag.response_map(outputs['mask'], size)


def learning_rate_schedule(opt_config: ml_collections.ConfigDict,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to a fraction of the peak.

  A warm-up longer than half the run (a short smoke run with the default
  warm-up) is cut to half the run.
  """
  peak = opt_config.learning_rate
  warmup = min(opt_config.warmup_steps, total_steps // 2)
  if warmup < opt_config.warmup_steps:
    logging.warning('Warm-up cut from %d to %d steps (half of the run).',
                    opt_config.warmup_steps, warmup)
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup, max(total_steps, 1),
      end_value=peak * opt_config.end_learning_rate_fraction)


def _module_labels(params: Any, multiplied: frozenset[str]) -> Any:
  """Each parameter's top-level module name if it has a multiplier."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key if path[0].key in multiplied else 'rest',
      params)


def make_optimizer(opt_config: ml_collections.ConfigDict,
                   total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with per-module learning rates.

  Weight decay applies to matrices and conv kernels only (not to biases or
  normalisation scales). Modules named in `opt_config.lr_multipliers`
  (top-level names such as 'backbone', 'text') train at that multiple of
  the schedule.
  """
  schedule = learning_rate_schedule(opt_config, total_steps)
  multipliers = dict(opt_config.lr_multipliers)

  def adamw(multiplier: float) -> optax.GradientTransformation:
    return optax.adamw(
        lambda step: schedule(step) * multiplier, b1=opt_config.b1,
        b2=opt_config.b2, weight_decay=opt_config.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))

  transforms = {name: adamw(m) for name, m in multipliers.items()}
  transforms['rest'] = adamw(1.0)
  return optax.chain(
      optax.clip_by_global_norm(opt_config.grad_clip_norm),
      optax.multi_transform(transforms, functools.partial(
          _module_labels, multiplied=frozenset(multipliers))))


def _dummy_inputs(config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
  size, length = config.data.image_size, config.data.max_text_len
  return (jnp.zeros((1, size, size, 3), jnp.uint8),
          jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))


def init_variables(config: ml_collections.ConfigDict, model: nn.Module,
                   rng: jax.Array) -> dict[str, Any]:
  """`model`'s freshly initialised variables for `config`'s input shapes."""
  return model.init({'params': rng, 'slots': rng}, *_dummy_inputs(config),
                    train=False)


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


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, Any]:
  """Initialises the train state directly into its shardings.

  The modules `config.model_init` names then take their pretrained weights.

  Returns:
    (state, state shardings): parameters of at least `config.fsdp_min_size`
    elements are sharded over `config.fsdp_axis`, the rest replicated.
  """
  tx = make_optimizer(config.optimizer, config.total_steps)

  def init(rng: jax.Array) -> TrainState:
    variables = init_variables(config, model, rng)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables.get('batch_stats', {}),
                             tx=tx)

  rng = jax.random.key(config.seed)
  shapes = jax.eval_shape(init, rng)
  shardings = sharding.param_shardings(shapes, mesh, config.fsdp_axis or None,
                                       config.fsdp_min_size)
  state = jax.jit(init, out_shardings=shardings)(rng)
  return _load_model_init(config, state, shardings), shardings


def loss_function(config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """(model outputs, batch, step) -> (total, terms) for `config.supervision`."""
  loss = config.loss
  if config.supervision == 'full':
    full = functools.partial(
        losses.full_supervision_loss, sigma=loss.heatmap_sigma,
        weights={k: loss[k] for k in losses.DEFAULT_WEIGHTS})
    return lambda outputs, batch, step: full(outputs, batch)
  if config.supervision == 'click':
    return functools.partial(
        losses.click_supervision_loss, sigma=loss.heatmap_sigma,
        weights={k: loss[k] for k in losses.CLICK_DEFAULT_WEIGHTS},
        pairwise_size=loss.pairwise_size,
        pairwise_dilation=loss.pairwise_dilation,
        colour_threshold=loss.colour_threshold,
        pairwise_warmup_steps=loss.pairwise_warmup_steps)
  if config.supervision == 'text':
    return functools.partial(
        losses.text_supervision_loss,
        weights={k: loss[k] for k in losses.TEXT_DEFAULT_WEIGHTS},
        mask_same_image=loss.mask_same_image,
        warmup_steps=loss.warmup_steps)
  raise ValueError(f'Unknown config.supervision {config.supervision!r}; '
                   "known: ['click', 'full', 'text'].")


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    mesh: jax.sharding.Mesh, state_shardings: Any):
  """The jitted `(state, batch) -> (state, metrics)`; state is donated.

  Metrics (loss, its terms, gradient norm, learning rate) come back
  replicated. The dropout (and SaG's slot) keys are folded from the seed
  and the step, so a resumed run draws the same ones.
  """
  loss_fn = loss_function(config)
  schedule = learning_rate_schedule(config.optimizer, config.total_steps)
  dropout_root = jax.random.key(config.seed + 1)
  slots_root = jax.random.key(config.seed + 2)

  def step_fn(state: TrainState, batch: Batch):
    rngs = {'dropout': jax.random.fold_in(dropout_root, state.step),
            'slots': jax.random.fold_in(slots_root, state.step)}

    def compute_loss(params):
      outputs, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats},
          batch['image'], batch['text_tokens'], batch['text_mask'],
          train=True, rngs=rngs, mutable=['batch_stats'],
          **_train_call(model, batch))
      total, terms = loss_fn(outputs, batch, state.step)
      return total, (terms, updates)

    (total, (terms, updates)), grads = jax.value_and_grad(
        compute_loss, has_aux=True)(state.params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates.get('batch_stats', {}))
    step_metrics = {'loss': total, **terms,
                    'grad_norm': optax.tree.norm(grads),
                    'learning_rate': schedule(state.step)}
    return new_state, step_metrics

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0)


def eval_slot_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The one key SaG's slots are drawn with at every evaluation."""
  return jax.random.key(config.seed + 3)


def make_eval_step(config: ml_collections.ConfigDict, model: nn.Module,
                   mesh: jax.sharding.Mesh, state_shardings: Any):
  """The jitted `(state, batch) -> (RESMetrics, response [B, S, S])`.

  The response is thresholded at 0: PKS's mask logits (kernel read at the
  heatmap peak, as at inference) bilinearly upsampled to the canvas; SaG's
  min-max normalised mask - 0.5. SaG's slots are drawn with one fixed key
  (from the seed), so an evaluation is reproducible and every checkpoint
  is scored on the same draw.
  """
  size = config.data.image_size
  slots = eval_slot_key(config)

  def step_fn(state: TrainState, batch: Batch):
    outputs = model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats},
        batch['image'], batch['text_tokens'], batch['text_mask'], train=False,
        rngs={'slots': slots})
    response = _response(model, outputs, size)
    batch_metrics = res_metrics.RESMetrics.from_model_output(
        response, batch['eval_mask'], batch['orig_size'],
        batch['content_size'], batch['valid'])
    return batch_metrics, response

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(replicated, batch_sharding))


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


def _check_finite(step: int, step_metrics: Mapping[str, jax.Array]) -> None:
  loss = float(step_metrics['loss'])
  if not np.isfinite(loss):
    terms = {k: float(v) for k, v in step_metrics.items()}
    raise FloatingPointError(
        f'Non-finite loss {loss} at step {step} (terms: {terms}); stopping. '
        'The last checkpoint before it is intact: lower the learning rate or '
        'check the data, then resume.')


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _host_batches(ds) -> Iterator[dict[str, np.ndarray]]:
  return iter(ds.as_numpy_iterator())


def device_fields(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The fields of a host batch that go to the devices (no strings)."""
  return {k: v for k, v in batch.items() if k not in _HOST_ONLY_FIELDS}


def overlay_grid(batch: Mapping[str, np.ndarray], response: np.ndarray,
                 count: int) -> Image.Image | None:
  """Predicted (red) and true (green) masks over the first valid examples.

  Args:
    batch: host-local eval batch (canvas images, original-size masks).
    response: host-local [b, S, S] canvas responses (> 0 = referent).
    count: how many panels at most.

  Returns:
    A captioned grid (expression and IoU under each), None if no example.
  """
  panels = []
  for i in np.flatnonzero(batch['valid'])[:count]:
    (h, w), (orig_h, orig_w) = batch['content_size'][i], batch['orig_size'][i]
    true = Image.fromarray(batch['eval_mask'][i, :orig_h, :orig_w] * 255)
    true = np.asarray(true.resize((w, h), Image.NEAREST)) > 0
    pred = response[i, :h, :w] > 0
    iou = (pred & true).sum() / max((pred | true).sum(), 1)
    picture = visualize.overlay(
        batch['image'][i, :h, :w],
        [(true, visualize.TRUE_COLOUR), (pred, visualize.PREDICTED_COLOUR)],
        dim=0.6)
    panels.append((picture, f'{batch["sentence"][i].decode()} '
                            f'(IoU {100 * iou:.0f})'))
  if not panels:
    return None
  return visualize.captioned_grid(panels, columns=min(4, len(panels)))


class Evaluator:
  """Scores a train state on eval splits, and draws a few predictions."""

  def __init__(self, config: ml_collections.ConfigDict, model: nn.Module,
               mesh: jax.sharding.Mesh, state_shardings: Any):
    self._config = config
    self._mesh = mesh
    self._step_fn = make_eval_step(config, model, mesh, state_shardings)
    self._sharding = sharding.batch_sharding(mesh)
    self._num_batches: dict[str, int] = {}

  def evaluate(self, state: TrainState, split: str
               ) -> tuple[dict[str, float], Image.Image | None]:
    """(metrics of `split`, overlay picture of its first batch)."""
    config = self._config
    if split not in self._num_batches:
      self._num_batches[split] = pipeline.num_eval_batches(
          config.data, split, config.eval.batch_size)
    ds = pipeline.eval_dataset(
        config.data, split, config.eval.batch_size, self._num_batches[split],
        jax.process_index(), jax.process_count())
    total, picture = res_metrics.RESMetrics.empty(), None
    for batch in _host_batches(ds):
      batch_metrics, response = self._step_fn(
          state, sharding.global_batch(device_fields(batch), self._sharding))
      total = total.merge(batch_metrics)
      if picture is None and config.eval.num_overlays:
        local = multihost_utils.global_array_to_host_local_array(
            response, self._mesh, self._sharding.spec)
        picture = overlay_grid(batch, np.asarray(local),
                               config.eval.num_overlays)
    return total.compute(), picture


def _write_json(path: epath.Path, value: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=2))
  tmp.replace(path)


def _append_history(path: epath.Path, entry: Mapping[str, Any]) -> None:
  """Adds `entry` to the JSON list at `path` (rewritten whole: gs:// files
  cannot be appended to)."""
  history = json.loads(path.read_text()) if path.exists() else []
  _write_json(path, history + [dict(entry)])


def _checkpoint_managers(workdir: epath.Path, config: ml_collections.ConfigDict
                         ) -> tuple[ocp.CheckpointManager,
                                    ocp.CheckpointManager]:
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


def _restore(manager: ocp.CheckpointManager, state: TrainState,
             state_shardings: Any) -> TrainState:
  """The manager's latest checkpoint, laid out as `state` and its shardings."""
  return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
      _abstract(state, state_shardings)))


def restore_latest(workdir: epath.Path, state: TrainState,
                   state_shardings: Any) -> TrainState | None:
  """`workdir`'s latest checkpoint (None if it has none), laid out as
  `state` and its shardings."""
  if not (workdir / 'checkpoints').exists():
    return None
  with ocp.CheckpointManager(workdir / 'checkpoints') as latest:
    if latest.latest_step() is None:
      return None
    return _restore(latest, state, state_shardings)


def _log_eval(writer, step: int, split: str, values: Mapping[str, float],
              picture: Image.Image | None, workdir: epath.Path) -> None:
  writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
  logging.info('step %d %s: %s', step, split, ', '.join(
      f'{k} {v:.4g}' for k, v in values.items()))
  if jax.process_index() == 0:
    _append_history(workdir / 'eval_history.json',
                    {'step': step, 'split': split, **values})
  if picture is not None and jax.process_index() == 0:
    writer.write_images(step, {f'{split}/overlays': np.asarray(picture)[None]})
    directory = workdir / 'overlays'
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f'{split}_step{step:06d}.png').open('wb') as f:
      picture.save(f, format='PNG')


class _TrainWindow:
  """Train metrics since the last log line, and their throughput."""

  def __init__(self, batch_size: int):
    self._batch_size = batch_size
    self.restart()

  def restart(self) -> None:
    self._metrics, self._start = [], time.perf_counter()

  def add(self, step_metrics: Mapping[str, jax.Array]) -> None:
    self._metrics.append(step_metrics)

  def write(self, writer, step: int) -> None:
    """Writes the window's means and examples/s, and starts a new one."""
    if not self._metrics:
      return
    means = jax.tree.map(lambda *x: float(np.mean(x)),
                         *jax.device_get(self._metrics))
    elapsed = time.perf_counter() - self._start
    means['examples_per_sec'] = len(self._metrics) * self._batch_size / elapsed
    means['step_time_ms'] = 1e3 * elapsed / len(self._metrics)
    writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
    self.restart()


def _compile(train_step, state: TrainState, batch: Batch, writer,
             step: int):
  """Compiles the train step ahead of time, logging how long it took."""
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  seconds = time.perf_counter() - start
  writer.write_scalars(step, {'compile_time_s': seconds})
  logging.info('Train step compiled in %.1f s.', seconds)
  return compiled


def _evaluate(evaluator: Evaluator, state: TrainState, step: int,
              splits: Sequence[str], writer, workdir: epath.Path,
              best: ocp.CheckpointManager, best_split: str
              ) -> dict[str, dict[str, float]]:
  """Evaluates and logs `splits`; keeps the params if `best_split` improved."""
  results = {}
  for split in splits:
    results[split], picture = evaluator.evaluate(state, split)
    _log_eval(writer, step, split, results[split], picture, workdir)
  if best_split in results:
    best.save(step, args=ocp.args.StandardSave(
        {'params': state.params, 'batch_stats': state.batch_stats}),
              metrics=results[best_split])
  return results


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Args:
    config: a training config (`configs/*.py`).
    workdir: a local or remote (e.g. gs://) directory, shared by all hosts.

  Returns:
    The final (or, after SIGTERM, the last saved) train state.
  """
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.data.prepare:
    build.build(config.data.name, config.data.data_dir)
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  model = create_model(config.model, tokenizer.vocab_size)
  state, state_shardings = create_train_state(config, model, mesh)
  latest, best = _checkpoint_managers(workdir, config)
  if latest.latest_step() is not None:
    state = _restore(latest, state, state_shardings)
    logging.info('Resumed from %s at step %d.', latest.directory,
                 int(state.step))
  start_step = int(state.step)
  if start_step >= config.total_steps:
    logging.info('%s is already trained to step %d; nothing to do.',
                 workdir, start_step)
    latest.close()
    best.close()
    return state

  writer = metric_writers.create_default_writer(
      str(workdir), just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    _write_json(workdir / 'config.json', config.to_dict())
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Mesh %s; %d parameters; %d devices over %d hosts.',
               dict(mesh.shape), num_params, jax.device_count(),
               jax.process_count())

  batches = _host_batches(pipeline.train_dataset(
      config.data, config.supervision, config.batch_size, config.seed,
      jax.process_index(), jax.process_count(), skip_batches=start_step))
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = make_train_step(config, model, mesh, state_shardings)
  evaluator = Evaluator(config, model, mesh, state_shardings)
  report = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, writer=writer,
      every_steps=config.log_every_steps)
  watcher = PreemptionWatcher()

  def save(step: int) -> None:
    latest.save(step, args=ocp.args.StandardSave(state), force=True)

  try:
    pending, window = None, _TrainWindow(config.batch_size)
    for step in range(start_step + 1, config.total_steps + 1):
      batch = sharding.global_batch(next(batches), batch_sharding)
      if step == start_step + 1:
        train_step = _compile(train_step, state, batch, writer, step)
        window.restart()
      state, step_metrics = train_step(state, batch)
      # Checking the previous step's loss keeps the host one step ahead.
      if pending is not None:
        _check_finite(*pending)
      pending = (step, step_metrics)
      window.add(step_metrics)
      report(step)
      is_last = step == config.total_steps
      if is_last or step % config.log_every_steps == 0:
        _check_finite(*pending)
        window.write(writer, step)

      if is_last or step % config.eval.every_steps == 0:
        _check_finite(*pending)
        splits = config.eval.final_splits if is_last else config.eval.splits
        results = _evaluate(evaluator, state, step, splits, writer, workdir,
                            best, config.eval.best_split)
        if is_last and jax.process_index() == 0:
          _write_json(workdir / 'results.json', {**results, 'step': step})
        window.restart()  # Evaluation is not train time.

      if is_last or step % config.checkpoint_every_steps == 0:
        _check_finite(*pending)
        save(step)
      elif watcher.should_stop(step, latest):
        _check_finite(*pending)
        save(step)
        logging.warning('Preempted: saved step %d in %s; exiting.', step,
                        latest.directory)
        break
  finally:
    watcher.close()
    latest.close()  # Waits for the saves in flight.
    best.close()
    writer.close()
  return state
