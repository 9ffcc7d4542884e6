"""Draws dataset examples: each expression, its object lit up, its clicks.

    python -m refseg_jax.data.show --dataset=ref_shapes/tiny --split=train \\
        --out=docs/ref_shapes_train.png
"""

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from refseg_jax import visualize
from refseg_jax.data.ref_shapes import builder as ref_shapes  # pylint: disable=unused-import

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
  builder = tfds.builder(flags.FLAGS.dataset, data_dir=flags.FLAGS.data_dir)
  examples = tfds.as_numpy(builder.as_dataset(split=flags.FLAGS.split))
  grid = visualize.captioned_grid(list(panels(examples, flags.FLAGS.num)),
                                  columns=4)
  visualize.write_png(grid, flags.FLAGS.out)
  print(f'Wrote {flags.FLAGS.out}')


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so).
  flags.DEFINE_string('dataset', 'ref_shapes', 'TFDS name[/config].')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
  flags.DEFINE_string('split', 'train', 'Split to show.')
  flags.DEFINE_integer('num', 12, 'Expressions to show.')
  flags.DEFINE_string('out', 'examples.png', 'PNG to write.')
  app.run(main)
