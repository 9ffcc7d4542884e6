"""Compares a built RefCOCO-family dataset with the published split sizes.

    python -m refseg_jax.data.refcoco.check --dataset=refcoco/refcoco_unc \\
        [--data_dir=DIR]

Counts, per split, the refs, the images and the expressions of the built
dataset, prints them beside the published statistics (Yu et al. 2016,
Nagaraja et al. 2016, Mao et al. 2016, as the refer toolkit gives them)
with each mismatch flagged, and exits with status 1 if any. A build from
the full download should match every published number.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from refseg_jax.data.refcoco import builder as refcoco  # pylint: disable=unused-import


class Counts(NamedTuple):
  """Sizes of one split; None where nothing is published."""
  refs: int | None
  images: int | None
  expressions: int | None


# {config: {split: Counts}}; the RefCOCO+ and RefCOCOg (UMD) expression
# counts add up to the datasets' published totals (141,564 and 95,010).
PUBLISHED = {
    'refcoco_unc': {
        'train': Counts(42_404, 16_994, 120_624),
        'val': Counts(3_811, 1_500, 10_834),
        'testA': Counts(1_975, 750, 5_657),
        'testB': Counts(1_810, 750, 5_095)},
    'refcocoplus_unc': {
        'train': Counts(42_278, 16_992, 120_191),
        'val': Counts(3_805, 1_500, 10_758),
        'testA': Counts(1_975, 750, 5_726),
        'testB': Counts(1_798, 750, 4_889)},
    'refcocog_umd': {
        'train': Counts(42_226, 21_899, 80_512),
        'val': Counts(2_573, 1_300, 4_896),
        'test': Counts(5_023, 2_600, 9_602)},
    'refcocog_google': {
        'train': Counts(44_822, 24_698, None),
        'val': Counts(5_000, 4_650, None)},
    'refcoco_google': {
        'train': Counts(40_000, 19_213, None),
        'val': Counts(5_000, 4_559, None),
        'test': Counts(5_000, 4_527, None)},
}


def count_split(builder: tfds.core.DatasetBuilder, split: str) -> Counts:
  """Distinct refs, images (examples) and expressions of a built split."""
  ds = builder.as_dataset(
      split=split, decoders={'image': tfds.decode.SkipDecoding(),
                             'objects': {'mask': tfds.decode.SkipDecoding()}})
  ds = ds.map(lambda example: example['objects']['refs']['id'].flat_values)
  refs, images, expressions = set(), 0, 0
  for ref_ids in tfds.as_numpy(ds):  # One per expression.
    refs.update(ref_ids.tolist())
    images += 1
    expressions += len(ref_ids)
  return Counts(len(refs), images, expressions)


def compare(built: dict[str, Counts], published: dict[str, Counts]
            ) -> tuple[list[str], int]:
  """The lines of a table of built vs published sizes, and the mismatches.

  A split missing on either side counts as one mismatch per number; a
  number nobody published (None) as none.
  """
  lines = [f'{"split":8}' + ''.join(f'{f"{field} built/published":>32}'
                                    for field in Counts._fields)]
  mismatches = 0
  for split in list(published) + [s for s in built if s not in published]:
    ours, theirs = built.get(split), published.get(split)
    cells = []
    for field in Counts._fields:
      mine = None if ours is None else getattr(ours, field)
      known = None if theirs is None else getattr(theirs, field)
      # A split missing on either side, or a published number not matched.
      bad = (ours is None or theirs is None or
             (known is not None and mine != known))
      mismatches += bad
      text = (f'{"-" if mine is None else f"{mine:,}"} / '
              f'{"-" if known is None else f"{known:,}"}')
      cells.append(f'{text + ("  MISMATCH" if bad else ""):>32}')
    lines.append(f'{split:8}' + ''.join(cells))
  return lines, mismatches


def check(name: str, data_dir: str | None = None) -> int:
  """Prints the table of dataset `name` ('refcoco/<config>'); mismatches."""
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(f'{name} is not built in {builder.data_dir}.')
  built = {split: count_split(builder, split) for split in builder.info.splits}
  lines, mismatches = compare(built, PUBLISHED[builder.builder_config.name])
  print(f'{name} in {builder.data_path}')
  print('\n'.join(lines))
  print(f'{mismatches} mismatch(es) with the published statistics.'
        if mismatches else 'Every split matches the published statistics.')
  return mismatches


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sys.exit(1 if check(flags.FLAGS.dataset, flags.FLAGS.data_dir) else 0)


if __name__ == '__main__':
  flags.DEFINE_string('dataset', 'refcoco/refcoco_unc', 'refcoco/<config>.')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
  app.run(main)
