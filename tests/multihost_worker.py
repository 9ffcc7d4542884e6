"""One of two processes joined by `jax.distributed` on loopback.

Run by tests/test_sharding.py as `python multihost_worker.py PROCESS PORT`:
assembles a global batch from both hosts' rows and reduces it. (Training
on two processes runs `launch/loopback.sh`: tests/test_train.py.)
"""

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


def main(process_id: int, port: str) -> None:
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2,
                             process_id=process_id)
  reduce_batch()


if __name__ == '__main__':
  main(int(sys.argv[1]), sys.argv[2])
