"""Builds a refseg_jax TFDS dataset, offline.

    python -m refseg_jax.data.build --dataset=ref_shapes/tiny [--data_dir=DIR]
    python -m refseg_jax.data.build --dataset=refcoco/refcoco_unc \\
        --manual_dir=REFER_DATA [--clicks_file=F] [--skip_bad]

Equivalent to `tfds build`, but registers the project's builders first and
reports the build time and the size on disk. `--manual_dir` is the folder
of a manual-download dataset's files (`refcoco`: docs/refcoco.md).
"""

import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

# pylint: disable=unused-import
from refseg_jax.data.ref_shapes import builder as ref_shapes
from refseg_jax.data.refcoco import builder as refcoco
# pylint: enable=unused-import


def build(name: str, data_dir: str | None = None,
          manual_dir: str | None = None,
          **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Generates the registered builder `name` unless it is already built.

  Args:
    name: TFDS name[/config].
    data_dir: where to write; None = the TFDS default.
    manual_dir: the files of a manual-download dataset.
    **builder_kwargs: options of the builder (`refcoco`: clicks_file,
      skip_bad).

  Raises:
    FileNotFoundError: a manual-download dataset is neither built nor given
      a manual_dir; the message gives the command that builds it.
  """
  builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  if (builder.MANUAL_DOWNLOAD_INSTRUCTIONS and manual_dir is None and
      not builder.is_prepared()):
    raise FileNotFoundError(
        f'Dataset {name} is not built in {builder.data_dir} and is built from '
        f'files you download: python -m refseg_jax.data.build '
        f'--dataset={name} --manual_dir=DIR'
        + (f' --data_dir={data_dir}' if data_dir else '')
        + f'\nwith DIR laid out as:\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
  if not builder.is_prepared():
    logging.info('Building %s in %s.', name, builder.data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, manual_dir=manual_dir))
  return builder


def build_on_first_host(name: str, data_dir: str | None = None) -> None:
  """`build` on process 0 only; the other hosts wait for it.

  Several hosts building one dataset at once would race on its files, so
  they meet at a barrier once process 0 is done, then check that they see
  what it built: `data_dir` must be shared by every host (e.g. gs://).

  Raises:
    FileNotFoundError: on a host that does not see the built dataset.
  """
  if jax.process_index() == 0:
    build(name, data_dir)
  if jax.process_count() == 1:
    return
  if jax.process_index() > 0:
    logging.info('Waiting for process 0 to prepare %s.', name)
  multihost_utils.sync_global_devices(f'refseg_jax: {name} prepared')
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'Process 0 prepared {name} in {builder.data_dir}, but process '
        f'{jax.process_index()} does not see it there: config.data.data_dir '
        'must be a directory every host shares (e.g. gs://BUCKET/tfds).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  name, data_dir = flags.FLAGS.dataset, flags.FLAGS.data_dir
  options = {}  # Only the builders that take them get them.
  if flags.FLAGS.clicks_file:
    options['clicks_file'] = flags.FLAGS.clicks_file
  if flags.FLAGS.skip_bad:
    options['skip_bad'] = True
  start = time.perf_counter()
  builder = build(name, data_dir, flags.FLAGS.manual_dir, **options)
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
  flags.DEFINE_string('manual_dir', None, 'Folder of the files a manual-'
                      'download dataset (refcoco) is built from.')
  flags.DEFINE_string('clicks_file', None, 'refcoco: clicks JSON file to '
                      'use instead of simulated clicks (docs/refcoco.md).')
  flags.DEFINE_bool('skip_bad', False, 'refcoco: leave flawed refs, images '
                    'and objects out with a counted warning instead of '
                    'stopping.')
  app.run(main)
