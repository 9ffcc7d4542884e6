"""Several hosts: `launch/loopback.sh` runs two processes joined by
jax.distributed over loopback, as the hosts of a pod are (each reads its own
shard of the data; process 0 prepares the data and writes the files).
(One global batch over two processes: test_sharding.py.)
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow as tf
import tensorflow_datasets as tfds

from refseg_jax import sharding
from refseg_jax.data import pipeline
from test_train import FULL_CONFIG
from test_train import free_port
from test_train import REPO
from test_train import run_steps
from test_train import subprocess_env
from test_train import tiny_train_config


def host_batches(config, process_count: int, num_steps: int):
  """The global batches of `num_steps` steps when `process_count` hosts each
  read their own shard: every field is the hosts' rows in host order."""
  hosts = [list(pipeline.train_dataset(
      config.data, 'full', config.batch_size, config.seed, i,
      process_count).take(num_steps).as_numpy_iterator())
           for i in range(process_count)]
  return [{key: np.concatenate([batch[key] for batch in step_batches])
           for key in step_batches[0]} for step_batches in zip(*hosts)]


def logged_scalars(workdir: pathlib.Path, tag: str) -> dict[int, float]:
  """{step: value} of a scalar of the workdir's TensorBoard events."""
  events = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0}).Reload()
  return {event.step: float(tf.make_ndarray(event.tensor_proto))
          for event in events.Tensors(tag)}


# Long enough to cross the warm-up; short enough that the two processes'
# other reduction order has not yet grown above 1e-5 (it does by ~step 9).
LOOPBACK_STEPS = 8


@pytest.fixture(scope='module')
def loopback_run(tmp_path_factory):
  """`launch/loopback.sh`: two processes x 4 CPU devices, joined by
  jax.distributed, train LOOPBACK_STEPS steps into a fresh data dir (which
  process 0 builds). Returns (workdir, data dir, the two processes' logs)."""
  root = tmp_path_factory.mktemp('loopback')
  workdir, data_dir = root / 'run', root / 'tfds'
  env = dict(subprocess_env(), PORT=free_port(),
             PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                   os.environ['PATH']]))
  result = subprocess.run(
      ['bash', str(REPO / 'launch' / 'loopback.sh'),
       f'{FULL_CONFIG}:data=ref_shapes_tiny', str(workdir),
       f'--config.data.data_dir={data_dir}', '--config.batch_size=16',
       f'--config.total_steps={LOOPBACK_STEPS}', '--config.log_every_steps=1',
       '--config.optimizer.warmup_steps=2', '--config.eval.final_splits=()'],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  logs = [pathlib.Path(f'{workdir}.process{i}.log').read_text()
          for i in range(2)]
  assert result.returncode == 0, result.stdout + '\n'.join(logs)
  return workdir, str(data_dir), logs


def test_loopback_prepares_the_data_once_and_only_process_0_writes(
    loopback_run):
  workdir, data_dir, (log0, log1) = loopback_run
  assert 'Building ref_shapes/tiny' in log0
  assert 'Waiting for process 0 to prepare ref_shapes/tiny' in log1
  assert 'Generating dataset' not in log1 and 'Building' not in log1
  assert tfds.builder('ref_shapes/tiny', data_dir=data_dir).is_prepared()
  # One TensorBoard file (process 0's); results of the run's last step.
  assert len(list(workdir.glob('events.out.tfevents*'))) == 1
  assert json.loads((workdir / 'results.json').read_text())['step'] == (
      LOOPBACK_STEPS)
  # Each host saved its own input position with the checkpoint.
  data = workdir / 'checkpoints' / str(LOOPBACK_STEPS) / 'data'
  assert {p.name for p in data.glob('*.index')} == {
      'process_0-of-2.index', 'process_1-of-2.index'}


def test_loopback_losses_equal_one_process_on_the_same_global_batches(
    loopback_run):
  """The two processes' losses (each host reading its own shard) equal one
  process's on the global batches those shards make, step by step."""
  workdir, data_dir, _ = loopback_run
  config = tiny_train_config(data_dir, total_steps=LOOPBACK_STEPS)
  batches = host_batches(config, 2, LOOPBACK_STEPS)
  expected, _, _ = run_steps(config, sharding.make_mesh(config.mesh), batches)
  losses = logged_scalars(workdir, 'train/loss')
  assert sorted(losses) == list(range(1, LOOPBACK_STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], expected,
                             rtol=1e-5)
