"""Properties of the built ref_shapes dataset (tiny config)."""

import collections
import filecmp
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from refseg_jax.data import pipeline
from refseg_jax.data.ref_shapes import builder as ref_shapes
from refseg_jax.data.ref_shapes import language as lang
from refseg_jax.data.ref_shapes import scene as shapes_scene


@pytest.fixture(scope='module')
def records(tiny_builder):
  """{split: [decoded example, ...]} of the whole tiny dataset."""
  return {split: list(tfds.as_numpy(tiny_builder.as_dataset(split=split)))
          for split in ref_shapes.SPLITS}


def _sentences(record):
  """Per object, its sentences as str (TFDS keeps nested sequences ragged)."""
  return [[s.decode() for s in row]
          for row in record['objects']['refs']['sentence'].to_list()]


def _regenerate(builder, split, record):
  index = int(record['image/id']) - ref_shapes._IMAGE_ID_BASE[split]
  return ref_shapes.make_example(builder.builder_config, split, index)


def test_building_twice_gives_identical_files(tiny_builder, tmp_path):
  # In a new process (protobuf's map order, for one, changes between them),
  # rendering in worker processes where the fixture used none.
  subprocess.run([sys.executable, '-c', (
      'from refseg_jax.data import build\n'
      'from refseg_jax.data.ref_shapes import builder as ref_shapes\n'
      'ref_shapes._MIN_IMAGES_PER_WORKER = 20\n'
      f'build.build("ref_shapes/tiny", {str(tmp_path)!r})')],
                 check=True, capture_output=True)
  again = tfds.builder('ref_shapes/tiny', data_dir=str(tmp_path))
  shards = sorted(p.name for p in tiny_builder.data_path.iterdir()
                  if '.tfrecord' in p.name)
  assert len(shards) == len(ref_shapes.SPLITS)
  for name in shards:
    assert filecmp.cmp(tiny_builder.data_path / name, again.data_path / name,
                       shallow=False), name


def test_split_sizes(tiny_builder):
  splits = tiny_builder.info.splits
  assert {s: splits[s].num_examples for s in ref_shapes.SPLITS} == (
      tiny_builder.builder_config.num_images)


def test_masks_boxes_and_clicks_agree(records):
  for split, examples in records.items():
    for ex in examples:
      height, width = ex['image'].shape[:2]
      objects = ex['objects']
      assert 2 <= len(objects['id']) <= 6
      for mask, box, clicks in zip(objects['mask'], objects['box'],
                                   objects['clicks']):
        mask = mask[..., 0]
        assert mask.shape == (height, width) and mask.any()
        ys, xs = np.nonzero(mask)
        # Tight box: every mask pixel inside, and touching all four edges.
        np.testing.assert_allclose(
            box, [ys.min() / height, xs.min() / width,
                  (ys.max() + 1) / height, (xs.max() + 1) / width], atol=1e-6)
        inside = ((clicks >= box[:2] - 1e-6) & (clicks <= box[2:] + 1e-6))
        assert inside.all(), (split, ex['image/id'])
        row, col = (clicks[0] * [height, width]).astype(int)
        assert mask[row, col], 'the centre click is off the object'
        np.testing.assert_allclose(clicks[1:].ravel(), box, atol=1e-6)


def test_every_expression_parses_back_to_exactly_its_object(tiny_builder,
                                                            records):
  kinds = collections.Counter()
  for split, examples in records.items():
    for ex in examples:
      scene, sentences, _ = _regenerate(tiny_builder, split, ex)
      # The records are the generator's scene, and its sentences.
      np.testing.assert_array_equal(ex['image'], scene.image)
      np.testing.assert_array_equal(ex['objects']['mask'][..., 0],
                                    scene.masks)
      stored = {k: row for k, row in enumerate(_sentences(ex)) if row}
      assert stored == sentences
      assert 1 <= len(stored) <= 3
      for k, object_sentences in stored.items():
        assert 1 <= len(object_sentences) <= 3
        assert len(set(object_sentences)) == len(object_sentences)
        for sentence in object_sentences:
          expression = lang.parse(sentence)
          kinds[expression.kind] += 1
          assert lang.matches(expression, scene.objects) == [k], sentence
          assert lang.is_unambiguous(expression, scene.objects, k,
                                     ref_shapes.SPATIAL_MARGIN), sentence
  # All three RefCOCO styles occur in earnest.
  total = sum(kinds.values())
  assert all(kinds[k] > 0.15 * total
             for k in ('attribute', 'location', 'relation')), kinds


def test_scenes_vary_and_occlude(tiny_builder, records):
  scenes = [_regenerate(tiny_builder, 'train', ex)[0]
            for ex in records['train']]
  objects = [o for scene in scenes for o in scene.objects]
  assert {o.shape for o in objects} == set(lang.SHAPES)
  assert {o.colour for o in objects} == set(lang.COLOURS)
  assert {o.size for o in objects} == set(lang.SIZES)
  for ex in records['train']:
    masks = ex['objects']['mask'][..., 0].astype(bool)
    assert masks.sum(0).max() == 1, 'visible masks overlap'
  fractions = np.array([f for scene in scenes
                        for f in scene.visible_fraction])
  assert fractions.min() >= shapes_scene.MIN_VISIBLE_FRACTION
  # Partial occlusion is common, not a curiosity.
  assert np.mean([min(scene.visible_fraction) < 1 for scene in scenes]) > 0.1


def test_novel_pairs_are_never_referred_to_or_named_in_train(tiny_builder,
                                                             records):
  referred = collections.defaultdict(set)
  for split, examples in records.items():
    for ex in examples:
      scene = _regenerate(tiny_builder, split, ex)[0]
      for k, sentences in enumerate(_sentences(ex)):
        obj = scene.objects[k]
        if sentences:
          referred[split].add((obj.colour, obj.shape))
        for sentence in sentences:
          landmark = lang.parse(sentence).landmark
          if split == 'train' and landmark and landmark.colour:
            assert ((landmark.colour, landmark.shape)
                    not in ref_shapes.NOVEL_PAIRS), sentence
  assert referred['test_novel'] <= ref_shapes.NOVEL_PAIRS
  assert not referred['test_novel'] & referred['train']
  for split in ('validation', 'test'):
    assert not referred[split] & ref_shapes.NOVEL_PAIRS


def test_shipped_vocabulary_is_current_and_has_no_unknown_words():
  with open(ref_shapes.vocab_path()) as f:
    assert f.read().split('\n')[:-1] == ref_shapes.wordpiece_vocab(), (
        'Regenerate refseg_jax/data/ref_shapes_vocab.txt from '
        'ref_shapes.wordpiece_vocab().')
  tokenizer = pipeline.load_tokenizer(None, 'ref_shapes/tiny')
  words = lang.vocabulary()
  ids = tokenizer(' '.join(words), add_special_tokens=False)['input_ids']
  assert ids == [tokenizer.vocab[w] for w in words]
  assert tokenizer.unk_token_id not in ids
