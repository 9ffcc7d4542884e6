r"""Trains and evaluates a referring segmentation model.

    python -m refseg_jax.main --config=configs/full.py --workdir=/tmp/full \
        [--config.total_steps=500]

Several hosts (a TPU pod, or processes on one machine) run the same command
with `--distributed` (TPU pods and SLURM find each other) or with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from refseg_jax import host_memory
from refseg_jax import train

FLAGS = flags.FLAGS


def _quiet_orbax(record) -> bool:
  """Drops orbax's INFO lines (dozens per save); keeps its warnings."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if FLAGS.distributed or FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  logging.info('JAX: %d hosts, %d devices (%s).', jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  if FLAGS.keep_freed_host_memory and jax.default_backend() == 'cpu':
    logging.info('Keeping freed host memory for reuse: %s.',
                 host_memory.keep_freed())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                           FLAGS.accept_config_change)


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so),
  # so that importing a command's module defines no flag.
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, optionally with a variant: FILE:ARG.',
      lock_config=True)
  flags.DEFINE_string(
      'workdir', None, 'Checkpoints, logs and results; a run resumes from it.')
  flags.DEFINE_list(
      'accept_config_change', [], 'Config keys that may differ from the '
      "resumed checkpoint's config although they change the model, the "
      'data or the optimisation (any other change is refused by name).')
  flags.DEFINE_bool(
      'distributed', False, 'Call jax.distributed.initialize() with the '
      "cluster's auto-detected settings.")
  flags.DEFINE_string(
      'coordinator_address', None, 'HOST:PORT of process 0 (implies '
      '--distributed).')
  flags.DEFINE_integer('num_processes', None, 'Host count.')
  flags.DEFINE_integer('process_id', None, "This host's index.")
  flags.DEFINE_bool(
      'keep_freed_host_memory', True, 'On CPU, make malloc keep freed '
      'memory for reuse (`host_memory.keep_freed`): faster steps, '
      'and the peak is not given back until the process ends.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
