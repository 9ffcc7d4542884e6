"""Draws dataset examples: each expression, its object lit up, its clicks.

    python -m refseg_jax.data.show --dataset=ref_shapes/tiny --split=train \\
        --out=docs/ref_shapes_train.png
"""

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from refseg_jax import visualize
from refseg_jax.data import ref_shapes  # pylint: disable=unused-import

_DATASET = flags.DEFINE_string('dataset', 'ref_shapes', 'TFDS name[/config].')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to show.')
_NUM = flags.DEFINE_integer('num', 12, 'Expressions to show.')
_OUT = flags.DEFINE_string('out', 'examples.png', 'PNG to write.')


def panels(examples, num: int):
  """(overlay, sentence) for the first `num` expressions of `examples`."""
  for example in examples:
    objects = example['objects']
    for k, sentences in enumerate(objects['refs']['sentence'].to_list()):
      for sentence in sentences:
        yield (visualize.overlay(
            example['image'],
            [(objects['mask'][k][..., 0], visualize.TRUE_COLOUR)],
            objects['clicks'][k], alpha=0.0, dim=0.35), sentence.decode())
        num -= 1
        if not num:
          return


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  builder = tfds.builder(_DATASET.value, data_dir=_DATA_DIR.value)
  examples = tfds.as_numpy(builder.as_dataset(split=_SPLIT.value))
  grid = visualize.captioned_grid(list(panels(examples, _NUM.value)),
                                  columns=4)
  grid.save(_OUT.value)
  print(f'Wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
