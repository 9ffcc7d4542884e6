"""Builds a refseg_jax TFDS dataset, offline.

    python -m refseg_jax.data.build --dataset=ref_shapes/tiny [--data_dir=DIR]

Equivalent to `tfds build`, but registers the project's builders first and
reports the build time and the size on disk.
"""

import time

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from refseg_jax.data import ref_shapes  # pylint: disable=unused-import

def build(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Generates the registered builder `name` unless it is already built."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name, data_dir = flags.FLAGS.dataset, flags.FLAGS.data_dir
  start = time.perf_counter()
  builder = build(name, data_dir)
  size = sum(f.stat().length for f in builder.data_path.iterdir())
  logging.info('%s in %s: %.1f s, %.1f MiB, splits %s', name,
               builder.data_path, time.perf_counter() - start, size / 2**20,
               {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == '__main__':
  # Defined only when run as a program, so that modules importing `build`
  # (the train loop, benchmarks) keep these flag names free.
  flags.DEFINE_string('dataset', 'ref_shapes',
                      'TFDS name, with an optional /config.')
  flags.DEFINE_string('data_dir', None, 'Where to write; TFDS default '
                      '(~/tensorflow_datasets).')
  app.run(main)
