"""The training system: configs, optimizer, sharded steps, checkpoints.

Steps on different meshes and hosts are compared on the same global batches
(`train_batches`); the end-to-end tests run `train_and_evaluate` or the
`refseg_jax.main` command on the tiny ref_shapes.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from refseg_jax import config_lib
from refseg_jax import results as results_lib
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax import train_state
from refseg_jax.data import pipeline

REPO = pathlib.Path(__file__).parents[1]
FULL_CONFIG = str(REPO / 'configs' / 'full.py')
NUM_STEPS = 3


def tiny_train_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """configs/full.py's 64 px variant reading `data_dir`, short runs."""
  config = config_lib.load(f'{FULL_CONFIG}:data=ref_shapes_tiny')
  config.data.data_dir = data_dir
  config.data.prepare = False
  config.batch_size = 16  # 8 images (2 expressions each) over 8 devices.
  config.total_steps = 8
  config.optimizer.warmup_steps = 2
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  config.eval.every_steps = 1000
  config.eval.batch_size = 64
  config.eval.final_splits = ('validation',)
  config.eval.num_overlays = 4
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def train_config(tiny_data_dir):
  return tiny_train_config(tiny_data_dir)


@pytest.fixture(scope='module')
def train_batches(train_config):
  """NUM_STEPS global batches of the tiny training data, on the host."""
  ds = pipeline.train_dataset(train_config.data, 'full',
                              train_config.batch_size, seed=0)
  return list(ds.take(NUM_STEPS).as_numpy_iterator())


def run_steps(config, mesh, batches):
  """Losses and final params of training on `batches` over `mesh`."""
  task = tasks.build(config, 43)
  state, shardings = train_state.create(config, task, mesh)
  step = train.make_train_step(config, task, mesh, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  losses = []
  for batch in batches:
    state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params), state


def test_unknown_variant_or_key_is_a_clear_error(tiny_data_dir, tmp_path):
  with pytest.raises(ValueError, match="data variant 'coco'.*ref_shapes"):
    config_lib.load(f'{FULL_CONFIG}:data=coco')
  with pytest.raises(ValueError, match="Unknown config argument 'size'"):
    config_lib.load(f'{FULL_CONFIG}:size=3')
  config = tiny_train_config(tiny_data_dir)
  with pytest.raises(AttributeError, match='learning_rte'):
    config.optimizer.learning_rte = 1.0
  # The command line refuses an unknown override, naming it.
  result = subprocess.run(
      _main_command(tmp_path, tiny_data_dir, '--config.totl_steps=3'),
      capture_output=True, text=True, env=subprocess_env(), check=False)
  assert result.returncode != 0
  assert 'Did you mean "total_steps" instead of "totl_steps"' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()
  # A value of the wrong type, in Python and on the command line.
  with pytest.raises(TypeError, match='total_steps'):
    config.total_steps = 'three'
  result = subprocess.run(
      _main_command(tmp_path, tiny_data_dir, '--config.total_steps=three'),
      capture_output=True, text=True, env=subprocess_env(), check=False)
  assert result.returncode != 0
  assert "config.total_steps" in result.stderr and 'three' in result.stderr
  assert not list(tmp_path.iterdir())


def test_a_workdir_that_cannot_be_written_fails_first(train_config, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  workdir = blocker / 'workdir'
  with pytest.raises(OSError, match=f'Cannot write to the workdir {workdir}'):
    train.train_and_evaluate(train_config, str(workdir))
  assert blocker.read_text() == '' and list(tmp_path.iterdir()) == [blocker]


@pytest.fixture(scope='module')
def one_device_run(train_config, train_batches):
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  return run_steps(train_config, mesh, train_batches)


@pytest.mark.parametrize('axes', [[('data', 8)], [('data', 4), ('fsdp', 2)]])
def test_meshes_match_one_device(train_config, train_batches, one_device_run,
                                 axes):
  """Same losses and params, up to float32 reduction order: 1e-5 relative
  on the losses, 1e-2 of the learning rate on the params. (Adam's first
  steps move every weight by about the learning rate whatever its gradient's
  size, so reduction-order noise on a near-zero gradient shows up at that
  scale: measured up to 1.1e-4 of it on one CPU, and on an AMD EPYC up to
  2.1e-3 for one element, a rarely seen token's embedding, and 3.6e-4 for
  every other.)"""
  config = train_config.copy_and_resolve_references()
  if len(axes) == 2:
    config.fsdp_axis = 'fsdp'
    config.fsdp_min_size = 2**10
  mesh = sharding.make_mesh(axes)
  losses, params, state = run_steps(config, mesh, train_batches)
  expected_losses, expected_params, _ = one_device_run
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  atol = 1e-2 * config.optimizer.learning_rate
  def check(path, a, b):
    name = jax.tree_util.keystr(path)
    # An attention key's bias adds the same logit to every key of a query,
    # which the softmax cancels: its true gradient is exactly 0, so Adam
    # scales pure rounding noise up to steps; nothing to compare.
    if "['key']['bias']" not in name:
      np.testing.assert_allclose(a, b, atol=atol, err_msg=name)

  jax.tree_util.tree_map_with_path(check, params, expected_params)
  if len(axes) == 2:  # The big kernels really are split over 'fsdp'.
    kernel = state.params['kernel_out']['kernel']
    assert 'fsdp' in kernel.sharding.spec
    assert kernel.addressable_shards[0].data.size == kernel.size // 2


def test_ema_averages_the_params_without_changing_training(
    train_config, train_batches, one_device_run):
  """The average follows `min(decay, (1 + t) / (10 + t))` from the initial
  params, the training itself is unchanged, and evaluation uses it."""
  config = train_config.copy_and_resolve_references()
  config.ema_decay = 0.15  # Below the ramp from step 1 on: both rules act.
  mesh = sharding.make_mesh([('data', 1)], jax.devices()[:1])
  task = tasks.build(config, 43)
  state, shardings = train_state.create(config, task, mesh)
  step = train.make_train_step(config, task, mesh, shardings)
  expected = jax.device_get(state.params)
  for t, batch in enumerate(train_batches):
    state, _ = step(state, sharding.global_batch(
        batch, sharding.batch_sharding(mesh)))
    decay = min(0.15, (1 + t) / (10 + t))  # 0.1, then 0.15, 0.15.
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                            expected, jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               jax.device_get(state.ema_params), expected)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               one_device_run[1])
  assert state.eval_variables()['params'] is state.ema_params
  assert (state.replace(ema_params=None).eval_variables()['params']
          is state.params)
  with pytest.raises(ValueError, match='ema_decay must be in'):
    config.ema_decay = 1.0
    train_state.shapes_and_shardings(config, task, mesh)


def free_port() -> str:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return str(s.getsockname()[1])


def subprocess_env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=str(REPO))


def _restore_params(workdir: pathlib.Path, step: int):
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  return restored['params'], int(restored['step'])


def _main_command(workdir, data_dir, *overrides: str) -> list[str]:
  return [sys.executable, '-m', 'refseg_jax.main',
          f'--config={FULL_CONFIG}:data=ref_shapes_tiny',
          f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
          '--config.data.prepare=False', '--config.batch_size=16',
          '--config.optimizer.warmup_steps=2',
          '--config.eval.final_splits=validation', *overrides]


def _start_main_until_checkpoint(workdir: pathlib.Path, data_dir: str,
                                 every: int, *overrides: str,
                                 timeout: float = 240) -> subprocess.Popen:
  """Starts the main command, checkpointing every `every` steps, and
  returns it running once its first checkpoint is complete."""
  process = subprocess.Popen(
      _main_command(workdir, data_dir,
                    f'--config.checkpoint_every_steps={every}', *overrides),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=subprocess_env())
  # Orbax renames a checkpoint into place once it is complete.
  path, deadline = workdir / 'checkpoints' / str(every), time.time() + timeout
  while not path.exists():
    if process.poll() is not None:
      raise AssertionError(f'Exited before {path}:\n{process.stdout.read()}')
    if time.time() > deadline:
      process.kill()
      raise AssertionError(f'No {path} after {timeout} s.')
    time.sleep(0.05)
  return process


def test_run_writes_results_overlays_and_best(tiny_full_run):
  results = json.loads((tiny_full_run / 'results.json').read_text())
  assert results['step'] == 8
  assert set(results) == {'validation', 'step', 'provenance'}
  # What produced it: the seed, the config (as config.json holds it), the
  # code and library versions, the hardware.
  config = ml_collections.ConfigDict(
      json.loads((tiny_full_run / 'config.json').read_text()))
  provenance = results['provenance']
  assert provenance['seed'] == config.seed == 0
  assert provenance['config_sha256'] == results_lib.config_hash(config)
  assert provenance['versions']['jax'] == jax.__version__
  assert provenance['versions']['flax'] == flax.__version__
  assert set(provenance['versions']) >= {'jaxlib', 'optax', 'numpy'}
  assert provenance['device_kind'] == jax.devices()[0].device_kind
  assert provenance['cpu_model'] == results_lib.cpu_model() != ''
  if (REPO / '.git').exists():  # A checkout: the commit that ran.
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    assert provenance['git_commit'].split('+')[0] == head
  validation = results['validation']
  assert validation['num_expressions'] == 160  # Every tiny expression.
  for key in ('mIoU', 'oIoU', 'prec@0.5', 'prec@0.9', 'PointM'):
    assert 0.0 <= validation[key] <= 1.0
  assert validation['prec@0.5'] >= validation['prec@0.9']
  assert (tiny_full_run / 'overlays' / 'validation_step000008.png').exists()
  with ocp.CheckpointManager(tiny_full_run / 'best') as best:
    assert best.best_step() == 8
  _, step = _restore_params(tiny_full_run, 8)
  assert step == 8


def test_sigterm_saves_a_restorable_checkpoint_and_exits(tmp_path,
                                                         train_config):
  workdir = tmp_path / 'preempted'
  # The tiny run's own 8 steps (its compiled steps are in JAX's cache): the
  # signal, sent when step 2's checkpoint is complete, arrives well before
  # step 8's evaluation ends.
  process = _start_main_until_checkpoint(
      workdir, train_config.data.data_dir, 2, '--config.total_steps=8')
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output
  assert 'Preempted: saved step' in output
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    last = manager.latest_step()
  assert 2 <= last < 8
  _, step = _restore_params(workdir, last)
  assert step == last


def _nan_boxes_at_step(monkeypatch, step: int) -> None:
  """Makes the boxes of the training batch of `step` (1-based) NaN."""
  original = pipeline.train_dataset

  def poisoned(*args, **kwargs):
    return original(*args, **kwargs).enumerate(start=1).map(
        lambda i, batch: dict(batch, box=tf.where(
            i == step, batch['box'] * float('nan'), batch['box'])))

  monkeypatch.setattr(pipeline, 'train_dataset', poisoned)


def _saved_state(workdir: pathlib.Path, step: int):
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state


# Checkpoints every step, so that a step's update shows in its checkpoint
# (the tiny run's 8 steps: its train step is in the compilation cache).
EVERY_STEP = {'checkpoint_every_steps': 1, 'keep_checkpoints': 8}


def test_non_finite_loss_stops_naming_the_step(tiny_data_dir, tmp_path,
                                               monkeypatch):
  _nan_boxes_at_step(monkeypatch, 2)
  config = tiny_train_config(tiny_data_dir, **EVERY_STEP)
  with pytest.raises(FloatingPointError,
                     match=r'Non-finite loss or gradient at step 2: .*box'):
    train.train_and_evaluate(config, str(tmp_path))
  # The last good checkpoint stays the latest.
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    assert manager.all_steps() == [1]


def test_non_finite_update_can_be_skipped(tiny_data_dir, tmp_path,
                                          monkeypatch):
  _nan_boxes_at_step(monkeypatch, 2)
  # Three steps, no evaluation: the skipped step and one after it.
  config = tiny_train_config(tiny_data_dir, skip_nonfinite_updates=True,
                             total_steps=3, **{'eval.final_splits': ()},
                             **EVERY_STEP)
  train.train_and_evaluate(config, str(tmp_path))
  before, skipped, after = (_saved_state(tmp_path, step) for step in (1, 2, 3))
  assert (int(before['step']), int(skipped['step'])) == (1, 2)
  # Step 2 changed nothing but the step count; step 3 trained on.
  for name in ('params', 'opt_state', 'batch_stats', 'ema_params'):
    jax.tree.map(np.testing.assert_array_equal, skipped[name], before[name])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         after['params'], skipped['params'])
  assert any(jax.tree.leaves(changed))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after['params']))
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['step'] == 3
