"""Input-pipeline throughput, in expressions per second on this host.

    python -m refseg_jax.benchmarks.input_pipeline --dataset=ref_shapes \\
        --supervision=full --batch_size=64 --num_batches=200

`--split=train` times the training pipeline (shuffle, flip, the fields of
`--supervision`); any other split times the evaluation pipeline. The first
`--warmup` batches (graph building, shuffle-buffer fill) are not timed.
Padding rows of evaluation batches count as examples (at most one batch
per pass over the split).
"""

import time

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from refseg_jax.data import pipeline

_DATASET = flags.DEFINE_string('dataset', 'ref_shapes', 'TFDS name[/config].')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
_SPLIT = flags.DEFINE_string('split', 'train', 'train, or an eval split.')
_SUPERVISION = flags.DEFINE_enum(
    'supervision', 'full', list(pipeline.SUPERVISION_FIELDS),
    'Fields of the training batches.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Canvas side.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 200, 'Timed batches.')
_WARMUP = flags.DEFINE_integer('warmup', 10, 'Untimed first batches.')


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
  config = pipeline.default_config()
  config.name, config.data_dir = _DATASET.value, _DATA_DIR.value
  config.image_size = config.eval_mask_size = _IMAGE_SIZE.value
  if _SPLIT.value == 'train':
    ds = pipeline.train_dataset(config, _SUPERVISION.value, _BATCH_SIZE.value,
                                seed=0)
  else:
    # Cycles over the split: padding only completes each pass's last batch.
    ds = pipeline.eval_dataset(
        config, _SPLIT.value, _BATCH_SIZE.value,
        pipeline.num_eval_batches(config, _SPLIT.value,
                                  _BATCH_SIZE.value)).repeat()
  rate = throughput(tfds.as_numpy(ds), _BATCH_SIZE.value, _WARMUP.value,
                    _NUM_BATCHES.value)
  logging.info('%s %s (%s): %.0f examples/s, batch %d, %d batches',
               _DATASET.value, _SPLIT.value, _SUPERVISION.value, rate,
               _BATCH_SIZE.value, _NUM_BATCHES.value)
  print(f'{rate:.0f} examples/s')


if __name__ == '__main__':
  app.run(main)
