"""Resuming that can be trusted: the input position, the mesh, the config.

(Kill-and-resume end to end, bit for bit, is in test_soak.py.)
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from clu.data import dataset_iterator

from refseg_jax import checkpointing
from refseg_jax import config_lib
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax import train_state
from refseg_jax.data import pipeline
from test_train import tiny_train_config

BATCH = 8


def _batches(data_config, skip: int = 0):
  return dataset_iterator.TfDatasetIterator(
      pipeline.train_dataset(data_config, 'full', BATCH, seed=3,
                             skip_batches=skip), checkpoint=True)


def _assert_same_batches(got, expected):
  assert len(got) == len(expected)
  for batch, want in zip(got, expected):
    assert batch.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(batch[key], want[key], err_msg=key)


def _tiny_state():
  value = jax.numpy.arange(4.0)
  return {'x': value}, {'x': value.sharding}


def test_a_restored_input_position_yields_the_uninterrupted_batches(
    tiny_config, tiny_data_dir, tmp_path):
  uninterrupted = _batches(tiny_config)
  expected = [next(uninterrupted) for _ in range(6)]

  interrupted = _batches(tiny_config)
  _assert_same_batches([next(interrupted) for _ in range(3)], expected[:3])
  state, shardings = _tiny_state()
  config = tiny_train_config(tiny_data_dir)
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    checkpointing.save_state(manager, 3, state, config, interrupted)
    checkpointing.save_state(manager, 4, state, config)  # Without.
    assert checkpointing.has_input_position(manager, 3)
    assert not checkpointing.has_input_position(manager, 4)
    # A new iterator (a new process) moved to the saved position.
    resumed = _batches(tiny_config)
    restored = checkpointing.restore_state(manager, 3, state, shardings,
                                           resumed)
    assert config_lib.flatten(checkpointing.saved_config(manager, 3)) == (
        config_lib.flatten(config.to_dict()))
  np.testing.assert_array_equal(restored['x'], state['x'])
  _assert_same_batches([next(resumed) for _ in range(3)], expected[3:])
  # The fallback for a checkpoint without it: skipping gives them too.
  skipped = _batches(tiny_config, skip=3)
  _assert_same_batches([next(skipped) for _ in range(3)], expected[3:])


def test_resume_on_another_mesh_restores_the_same_state(tiny_data_dir,
                                                        tmp_path,
                                                        monkeypatch):
  """Saved from 8 devices with FSDP, resumed onto 4 devices, data
  parallel: the same values, in the new mesh's shardings, read straight
  from the checkpoint (neither initialised nor read from pretrained
  weights first)."""
  config = tiny_train_config(tiny_data_dir)
  config.mesh = [('data', 4), ('fsdp', 2)]
  config.fsdp_axis, config.fsdp_min_size = 'fsdp', 1024
  task = tasks.build(config, 43)
  shapes, saved_shardings = train_state.shapes_and_shardings(
      config, task, sharding.make_mesh(config.mesh))
  assert any('fsdp' in s.spec for s in jax.tree.leaves(saved_shardings.params))
  # Distinct values in every array (nothing to compile, unlike an init).
  rng = np.random.default_rng(0)
  state = jax.tree.map(
      lambda shape, where: jax.device_put(
          rng.standard_normal(shape.shape).astype(shape.dtype), where),
      shapes, saved_shardings)
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    checkpointing.save_state(manager, 5, state, config)

  config.mesh, config.fsdp_axis = [('data', 4)], ''
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])

  def must_not_initialise(*args, **kwargs):
    raise AssertionError('A resumed run initialised the train state.')

  monkeypatch.setattr(train_state, 'create', must_not_initialise)
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    # pylint: disable-next=protected-access
    restored, shardings, _ = train._start_or_resume(
        config, task, mesh, manager, accept_config_changes=())
  for name in ('step', 'params', 'opt_state', 'batch_stats'):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(getattr(restored, name)),
                 jax.device_get(getattr(state, name)))
    for array, target in zip(jax.tree.leaves(getattr(restored, name)),
                             jax.tree.leaves(getattr(shardings, name))):
      assert array.sharding == target
      assert len(array.sharding.device_set) == 4


def test_a_changed_config_key_is_refused_by_name(tiny_data_dir, tmp_path):
  """Resuming with another learning rate fails before anything runs, naming
  the key, the values and the flag that accepts it; logging and layout
  changes pass."""
  saved = tiny_train_config(tiny_data_dir)
  state, _ = _tiny_state()
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    checkpointing.save_state(manager, 4, state, saved)

  changed = tiny_train_config(tiny_data_dir)
  changed.optimizer.learning_rate = 0.5
  changed.log_every_steps = 1
  with pytest.raises(ValueError, match=(
      r"optimizer\.learning_rate: 0\.002 -> 0\.5.*"
      r"--accept_config_change=optimizer\.learning_rate")) as error:
    train.train_and_evaluate(changed, str(tmp_path))
  assert 'log_every_steps' not in str(error.value)
  assert not (tmp_path / 'config.json').exists()

  assert config_lib.check_resume(
      saved.to_dict(), changed, ['optimizer.learning_rate']) == {
          'log_every_steps': (4, 1), 'optimizer.learning_rate': (0.002, 0.5)}
  layout = tiny_train_config(tiny_data_dir)
  layout.mesh, layout.fsdp_axis = [('data', 2), ('fsdp', -1)], 'fsdp'
  layout.eval.every_steps, layout.data.data_dir = 7, '/elsewhere'
  assert set(config_lib.check_resume(saved.to_dict(), layout)) == {
      'mesh', 'fsdp_axis', 'eval.every_steps', 'data.data_dir'}
  for key, value in (('seed', 1), ('batch_size', 32),
                     ('data.shuffle_buffer', 8), ('model.dim', 16),
                     ('total_steps', 9)):
    other = tiny_train_config(tiny_data_dir, **{key: value})
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
      config_lib.check_resume(saved.to_dict(), other)


def test_a_checkpoint_without_its_config_is_not_resumed(tiny_data_dir,
                                                         tmp_path):
  state, _ = _tiny_state()
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    manager.save(2, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state)))
  with pytest.raises(ValueError, match=r'checkpoints/2 holds no config'):
    train.train_and_evaluate(tiny_train_config(tiny_data_dir), str(tmp_path))


def test_a_corrupt_checkpoint_step_is_refused_by_name(tmp_path):
  state, shardings = _tiny_state()
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    for step in (2, 4):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state)))
  # Half of every array file of step 4, as a full disk might leave it.
  for path in (tmp_path / 'checkpoints' / '4' / 'state' / 'd').iterdir():
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  before = sorted(p for p in tmp_path.rglob('*'))
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    with pytest.raises(ValueError, match=(
        r'Checkpoint .*checkpoints/4 cannot be read: corrupt, incomplete.*'
        r'delete it to use another step of .*\(\[2\]\)')):
      checkpointing.restore_state(manager, 4, state, shardings)
    # The other step is intact and nothing was written or removed.
    restored = checkpointing.restore_state(manager, 2, state, shardings)
  np.testing.assert_array_equal(restored['x'], state['x'])
  assert sorted(p for p in tmp_path.rglob('*')) == before
