"""Input-pipeline throughput, in expressions per second on this host.

    python -m refseg_jax.benchmarks.input_pipeline --config=configs/full.py \\
        [--split=train] [--batch_size=64] [--num_batches=200]

reads the data section of a training config (its dataset, canvas size,
grouping by image) and, for `--split=train`, the fields its task's
supervision gives a batch (`--config=configs/text.py`: no masks decoded);
any other split times the evaluation pipeline. The first `--warmup` batches
(graph building, shuffle-buffer fill) are not timed. Padding rows of
evaluation batches count as examples (at most one batch per pass over the
split).
"""

import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow_datasets as tfds

from refseg_jax import tasks
from refseg_jax.data import pipeline


def throughput(batches, batch_size: int, warmup: int, num_batches: int
               ) -> float:
  """Examples per second over `num_batches` batches after `warmup`."""
  iterator = iter(batches)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  return num_batches * batch_size / (time.perf_counter() - start)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config, args = flags.FLAGS.config, flags.FLAGS
  supervision = tasks.get(config.task).supervision
  if args.split == 'train':
    ds = pipeline.train_dataset(config.data, supervision, args.batch_size,
                                seed=config.seed)
  else:
    # Cycles over the split: padding only completes each pass's last batch.
    ds = pipeline.eval_dataset(
        config.data, args.split, args.batch_size,
        pipeline.num_eval_batches(config.data, args.split,
                                  args.batch_size)).repeat()
  rate = throughput(tfds.as_numpy(ds), args.batch_size, args.warmup,
                    args.num_batches)
  logging.info('%s %s (%s): %.0f examples/s, batch %d, %d batches',
               config.data.name, args.split, supervision, rate,
               args.batch_size, args.num_batches)
  print(f'{rate:.0f} examples/s')


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so),
  # so that importing a command's module defines no flag.
  config_flags.DEFINE_config_file(
      'config', None, 'Training config whose data section is read: FILE:ARG.',
      lock_config=True)
  flags.DEFINE_string('split', 'train', 'train, or an eval split.')
  flags.DEFINE_integer('batch_size', 64, 'Batch size.')
  flags.DEFINE_integer('num_batches', 200, 'Timed batches.')
  flags.DEFINE_integer('warmup', 10, 'Untimed first batches.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
