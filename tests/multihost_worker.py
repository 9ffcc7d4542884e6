"""One of two processes joined by `jax.distributed` on loopback.

Run by the tests as `python multihost_worker.py PROCESS PORT MODE [ARGS]`:

* `batch`: assembles a global batch from both hosts' rows and reduces it
  (tests/test_sharding.py);
* `train DATA_DIR BATCHES.npz`: trains the tiny config on the saved global
  batches, this host feeding its half of each, and prints the losses
  (tests/test_train.py).
"""

import json
import os
import sys

# Four CPU devices per process, eight in all; set before jax loads.
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from refseg_jax import sharding  # pylint: disable=g-import-not-at-top


def reduce_batch() -> None:
  mesh = sharding.make_mesh([('data', -1)])
  # Each host holds only its own 4 rows: 0..7 (host 0), 100..107 (host 1).
  local = {'x': np.arange(8, dtype=np.float32).reshape(4, 2)
                + 100 * jax.process_index()}
  batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  total = jax.jit(lambda b: b['x'].sum(0), out_shardings=replicated)(batch)
  print('RESULT', jax.process_count(), len(jax.devices()), batch['x'].shape,
        np.asarray(total).tolist())


def train_on_saved_batches(data_dir: str, batches_path: str) -> None:
  sys.path.insert(0, os.path.dirname(__file__))
  import test_train  # pylint: disable=g-import-not-at-top
  saved = np.load(batches_path)
  batches = []
  for i in range(test_train.NUM_STEPS):
    batch = {k.split('/')[1]: saved[k] for k in saved if k.startswith(f'{i}/')}
    # Each host feeds its half of every field (a grouped batch has half as
    # many images as expressions).
    batches.append({k: np.split(v, 2)[jax.process_index()]
                    for k, v in batch.items()})
  config = test_train.tiny_train_config(data_dir)
  mesh = sharding.make_mesh([('data', -1)])
  losses, _, _ = test_train.run_steps(config, mesh, batches)
  print('LOSSES', json.dumps(losses.tolist()))


def main(process_id: int, port: str, mode: str, *args: str) -> None:
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id)
  {'batch': reduce_batch, 'train': train_on_saved_batches}[mode](*args)


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:])
