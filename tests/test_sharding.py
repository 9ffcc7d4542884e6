"""Mesh, FSDP shardings and global batches, on 8 fake CPU devices."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refseg_jax import sharding


def test_eight_fake_devices():
  assert len(jax.devices()) == 8  # tests/conftest.py sets XLA_FLAGS.


@pytest.mark.parametrize('axes, shape', [
    ([('data', -1)], {'data': 8}),
    ([('data', 2), ('fsdp', -1)], {'data': 2, 'fsdp': 4}),
    ([('data', 4), ('fsdp', 2)], {'data': 4, 'fsdp': 2}),
])
def test_make_mesh(axes, shape):
  assert dict(sharding.make_mesh(axes).shape) == shape


@pytest.mark.parametrize('axes', [[('data', 3)], [('data', -1), ('fsdp', -1)],
                                  [('data', 3), ('fsdp', -1)]])
def test_make_mesh_rejects_bad_shapes_naming_them(axes):
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.make_mesh(axes)


def test_fsdp_spec():
  P = jax.sharding.PartitionSpec
  # The largest dimension that divides evenly is sharded.
  assert sharding.fsdp_spec((384, 4096), 4, 'fsdp', 1) == P(None, 'fsdp')
  assert sharding.fsdp_spec((4096, 6), 4, 'fsdp', 1) == P('fsdp', None)
  assert sharding.fsdp_spec((4098, 8), 4, 'fsdp', 1) == P(None, 'fsdp')
  # Too small, nothing divisible, or no FSDP axis: replicated.
  assert sharding.fsdp_spec((8, 8), 4, 'fsdp', 100) == P()
  assert sharding.fsdp_spec((7, 9), 4, 'fsdp', 1) == P()
  assert sharding.fsdp_spec((4096, 8), 4, None, 1) == P()


def test_sharded_step_equals_single_device_step():
  """Data parallel x FSDP gives the numbers of an unsharded computation."""
  mesh = sharding.make_mesh([('data', 2), ('fsdp', -1)])
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(64, 256)).astype(np.float32),
            'b': rng.normal(size=(256,)).astype(np.float32)}
  batch = {'x': rng.normal(size=(16, 64)).astype(np.float32)}

  def loss(p, b):
    return jnp.mean(jnp.tanh(b['x'] @ p['w'] + p['b']) ** 2)

  shardings = sharding.param_shardings(params, mesh, 'fsdp', min_size=1024)
  sharded_params = jax.device_put(params, shardings)
  # The big kernel is split four ways along its largest dimension.
  assert sharded_params['w'].addressable_shards[0].data.shape == (64, 64)
  assert sharded_params['b'].addressable_shards[0].data.shape == (256,)
  global_batch = sharding.global_batch(batch,
                                       sharding.batch_sharding(mesh))
  assert global_batch['x'].addressable_shards[0].data.shape == (2, 64)
  step = jax.jit(jax.value_and_grad(loss), out_shardings=(None, shardings))
  value, grads = step(sharded_params, global_batch)
  expected_value, expected_grads = jax.value_and_grad(loss)(params, batch)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for key in params:
    np.testing.assert_allclose(grads[key], expected_grads[key], rtol=1e-4,
                               atol=1e-6)
    assert grads[key].sharding == shardings[key]


def test_two_processes_on_loopback_build_one_global_batch():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = str(s.getsockname()[1])
  worker = pathlib.Path(__file__).with_name('multihost_worker.py')
  env = dict(os.environ, PYTHONPATH=str(worker.parents[1]))
  env.pop('XLA_FLAGS', None)
  processes = [subprocess.Popen([sys.executable, str(worker), str(i), port],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
               for i in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in processes]
  # Column sums over both hosts' rows: 0+2+4+6 + 100+102+104+106 = 424,
  # and 1+3+5+7 + 101+103+105+107 = 432.
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output
    result = [line for line in output.splitlines()
              if line.startswith('RESULT')]
    assert result == ['RESULT 2 8 (8, 2) [424.0, 432.0]'], output
