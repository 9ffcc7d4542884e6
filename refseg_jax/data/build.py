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

_DATASET = flags.DEFINE_string(
    'dataset', 'ref_shapes', 'TFDS name, with an optional /config.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Where to write; TFDS default (~/tensorflow_datasets).')


def build(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Generates the registered builder `name` unless it is already built."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  start = time.perf_counter()
  builder = build(_DATASET.value, _DATA_DIR.value)
  size = sum(f.stat().length for f in builder.data_path.iterdir())
  logging.info('%s in %s: %.1f s, %.1f MiB, splits %s', _DATASET.value,
               builder.data_path, time.perf_counter() - start, size / 2**20,
               {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == '__main__':
  app.run(main)
