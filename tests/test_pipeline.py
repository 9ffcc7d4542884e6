"""The input pipeline: fields per supervision, geometry, flips, eval cover."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from refseg_jax.data import pipeline
from refseg_jax.data.ref_shapes import builder as ref_shapes
from refseg_jax.data.ref_shapes import language as lang

BATCH = 8


def _tensors(element):
  return {k: tf.constant(v) for k, v in element.items()}


def _first_batch(config, supervision, seed=0):
  ds = pipeline.train_dataset(config, supervision, BATCH, seed=seed)
  return next(iter(tfds.as_numpy(ds)))


def test_each_supervision_gets_only_its_fields(tiny_config):
  mixed = tiny_config.copy_and_resolve_references()
  with mixed.unlocked():
    mixed.supervision = {'mask': 0.5, 'clicks': 0.5}
  for supervision, fields in pipeline.SUPERVISION_FIELDS.items():
    batch = _first_batch(mixed if supervision == 'mixed' else tiny_config,
                         supervision)
    assert set(batch) == set(fields), supervision
  with pytest.raises(ValueError, match='needs config.data.supervision'):
    _first_batch(tiny_config, 'mixed')
  assert 'mask' not in pipeline.SUPERVISION_FIELDS['click']
  assert set(pipeline.SUPERVISION_FIELDS['text']) == {
      'image', 'image_id', 'text_tokens', 'text_mask'}


def test_full_batch_labels_agree(tiny_config):
  batch = _first_batch(tiny_config, 'full')
  size = tiny_config.image_size
  assert batch['image'].shape == (BATCH, size, size, 3)
  assert batch['image'].dtype == np.uint8
  for mask, box, clicks in zip(batch['mask'], batch['box'], batch['clicks']):
    ys, xs = np.nonzero(mask)
    assert ys.size
    # Resized masks stay inside their box, up to a pixel of resampling.
    assert ys.min() >= box[0] * size - 1 and ys.max() < box[2] * size + 1
    assert xs.min() >= box[1] * size - 1 and xs.max() < box[3] * size + 1
    np.testing.assert_allclose(clicks[1:].ravel(), box, atol=1e-6)
  tokens = batch['text_tokens']
  assert (batch['text_mask'].sum(1) > 2).all()
  assert (tokens[:, 0] == 2).all()  # [CLS]
  assert (tokens[batch['text_mask'] == 0] == 0).all()  # [PAD]
  assert not (tokens == 1).any(), 'an [UNK] token'


def test_same_seed_same_batches_other_seed_other_batches(tiny_config):
  first = _first_batch(tiny_config, 'full', seed=3)
  again = _first_batch(tiny_config, 'full', seed=3)
  other = _first_batch(tiny_config, 'full', seed=4)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first['text_tokens'], other['text_tokens'])


def test_swap_left_right():
  cases = {'the leftmost circle': 'the rightmost circle',
           'circle left of the square on the right':
               'circle right of the square on the left',
           'the bright star': 'the bright star'}
  for sentence, expected in cases.items():
    assert pipeline.swap_left_right(tf.constant(sentence)).numpy().decode() \
        == expected


def test_flip_mirrors_image_mask_box_clicks_and_words():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (5, 8, 3), dtype=np.uint8)
  mask = np.zeros((5, 8), np.uint8)
  mask[1:4, 1:3] = 1  # Rows 1-3, columns 1-2.
  element = {'image': image, 'mask': mask,
             'box': np.array([1 / 5, 1 / 8, 4 / 5, 3 / 8], np.float32),
             'clicks': np.array([[2.5 / 5, 1.5 / 8], [1 / 5, 1 / 8],
                                 [4 / 5, 3 / 8]], np.float32),
             'sentence': 'the leftmost star'}
  flipped = {k: v.numpy() for k, v in pipeline.flip(_tensors(element)).items()}
  np.testing.assert_array_equal(flipped['image'], image[:, ::-1])
  np.testing.assert_array_equal(flipped['mask'], mask[:, ::-1])
  # Columns 1-2 of 8 become columns 5-6.
  np.testing.assert_allclose(flipped['box'], [1 / 5, 5 / 8, 4 / 5, 7 / 8])
  np.testing.assert_allclose(
      flipped['clicks'], [[2.5 / 5, 6.5 / 8], [1 / 5, 5 / 8], [4 / 5, 7 / 8]])
  assert flipped['sentence'] == b'the rightmost star'


def test_flipped_scenes_still_mean_the_same_object(tiny_builder):
  """Mirror every object and swap left/right: each sentence keeps its object."""
  config = tiny_builder.builder_config
  checked = 0
  for index in range(40):
    scene, sentences, _ = ref_shapes.make_example(config, 'train', index)
    mirrored = [lang.SceneObject(o.shape, o.colour, o.size, o.y, 1 - o.x)
                for o in scene.objects]
    for k, object_sentences in sentences.items():
      for sentence in object_sentences:
        swapped = pipeline.swap_left_right(tf.constant(sentence))
        expression = lang.parse(swapped.numpy().decode())
        assert lang.matches(expression, mirrored) == [k], sentence
        checked += 'left' in sentence or 'right' in sentence
  assert checked > 10


def test_training_flips_about_half_the_examples(tiny_config):
  ds = pipeline.train_dataset(tiny_config, 'full', BATCH, seed=0)
  unflipped = tiny_config.copy_and_resolve_references()
  unflipped.flip = False
  plain = pipeline.train_dataset(unflipped, 'full', BATCH, seed=0)
  flips = mirrored = 0
  for batch, reference in zip(tfds.as_numpy(ds.take(8)),
                              tfds.as_numpy(plain.take(8))):
    for a, b in zip(batch['image'], reference['image']):
      if not np.array_equal(a, b):
        flips += 1
        # ref_shapes images fill the canvas, so a flip is an exact mirror.
        mirrored += np.array_equal(a, b[:, ::-1])
  assert 16 <= flips <= 48, flips  # 64 examples, p = 0.5.
  assert mirrored == flips


def test_resize_keeps_aspect_and_pads_bottom_right():
  image = np.full((30, 60, 3), 200, np.uint8)
  mask = np.zeros((30, 60), np.uint8)
  mask[:, 30:] = 1
  element = {'image': image, 'mask': mask,
             'box': np.array([0, 0.5, 1, 1], np.float32),
             'clicks': np.array([[0.5, 0.75], [0, 0.5], [1, 1]], np.float32)}
  out = {k: v.numpy()
         for k, v in pipeline._resize_and_pad(_tensors(element), 40).items()}
  np.testing.assert_array_equal(out['orig_size'], [30, 60])
  np.testing.assert_array_equal(out['content_size'], [20, 40])
  assert (out['image'][:20, :40] == 200).all()
  assert (out['image'][20:] == 0).all()
  np.testing.assert_array_equal(out['mask'][:20, 20:], 1)
  assert out['mask'][:20, :20].sum() == 0 and out['mask'][20:].sum() == 0
  np.testing.assert_allclose(out['box'], [0, 0.5, 0.5, 1])
  np.testing.assert_allclose(out['clicks'], [[0.25, 0.75], [0, 0.5],
                                             [0.5, 1]])


def test_stretch_fills_the_canvas_with_tf_image_resize():
  rng = np.random.default_rng(0)
  image = rng.integers(50, 256, (30, 60, 3), dtype=np.uint8)
  canvas, content = pipeline.fit_image(tf.constant(image), 40, 'stretch')
  np.testing.assert_array_equal(content, [40, 40])
  assert canvas.shape == (40, 40, 3) and canvas.dtype == tf.uint8
  assert canvas.numpy().min() >= 50  # No zero padding anywhere.
  expected = tf.image.resize(tf.cast(image, tf.float32), (40, 40),
                             method='bilinear', antialias=True)
  np.testing.assert_array_equal(
      canvas, np.round(np.clip(expected, 0, 255)).astype(np.uint8))
  # The letterbox of the same image is unchanged: top-left, aspect kept.
  boxed, content = pipeline.fit_image(tf.constant(image), 40, 'letterbox')
  np.testing.assert_array_equal(content, [20, 40])
  assert (boxed.numpy()[20:] == 0).all() and boxed.numpy()[:20].min() >= 50


def test_stretch_keeps_image_normalised_boxes_and_clicks():
  """A 30 x 60 image stretched to 40 x 40: box and clicks stay as the
  dataset gives them, and the stretched mask lies where they say."""
  mask = np.zeros((30, 60), np.uint8)
  mask[6:12, 15:45] = 1
  box = np.array([6 / 30, 15 / 60, 12 / 30, 45 / 60], np.float32)
  clicks = np.array([[9 / 30, 30 / 60], box[:2], box[2:]], np.float32)
  element = {'image': np.full((30, 60, 3), 200, np.uint8), 'mask': mask,
             'box': box, 'clicks': clicks}
  out = {k: v.numpy() for k, v in pipeline._resize_and_pad(
      _tensors(element), 40, 'stretch').items()}
  np.testing.assert_array_equal(out['orig_size'], [30, 60])
  np.testing.assert_array_equal(out['content_size'], [40, 40])
  assert (out['image'] == 200).all()
  np.testing.assert_array_equal(out['box'], box)
  np.testing.assert_array_equal(out['clicks'], clicks)
  ys, xs = np.nonzero(out['mask'])
  # Rows 8-15 and columns 10-29 of the canvas: the box times S.
  np.testing.assert_array_equal([ys.min(), xs.min(), ys.max() + 1,
                                 xs.max() + 1], box * 40)
  assert out['mask'].sum() == 8 * 20
  # Letterboxed, the same labels are scaled by content / S = (0.5, 1).
  boxed = pipeline._resize_and_pad(_tensors(element), 40, 'letterbox')
  np.testing.assert_allclose(boxed['box'], box * [0.5, 1, 0.5, 1])
  np.testing.assert_allclose(boxed['clicks'], clicks * [0.5, 1])


def test_stretch_reaches_training_and_evaluation(tiny_config, monkeypatch):
  """data.resize='stretch' fits every training and evaluation image with
  `stretch`; ref_shapes images are square, so batches equal letterbox's."""
  calls = []
  stretch = pipeline.stretch
  monkeypatch.setattr(pipeline, 'stretch',
                      lambda *args: calls.append(1) or stretch(*args))
  config = tiny_config.copy_and_resolve_references()
  config.resize = 'stretch'
  stretched = _first_batch(config, 'full')
  assert calls, 'training did not stretch'
  letterboxed = _first_batch(tiny_config, 'full')
  for key in stretched:
    np.testing.assert_array_equal(stretched[key], letterboxed[key])
  calls.clear()
  batch = next(iter(tfds.as_numpy(
      pipeline.eval_dataset(config, 'validation', BATCH, 1))))
  assert calls, 'evaluation did not stretch'
  size = config.image_size
  assert (batch['content_size'] == [size, size]).all()


def test_unknown_resize_is_named(tiny_config):
  match = (r"config\.data\.resize='crop'.*\('letterbox', 'stretch'\)")
  with pytest.raises(ValueError, match=match):
    pipeline.fit_image(tf.zeros((4, 4, 3), tf.uint8), 8, 'crop')
  config = tiny_config.copy_and_resolve_references()
  config.resize = 'crop'
  with pytest.raises(ValueError, match=match):
    pipeline.train_dataset(config, 'full', BATCH, seed=0)
  with pytest.raises(ValueError, match=match):
    pipeline.eval_dataset(config, 'validation', BATCH, 1)


@pytest.mark.parametrize('split', ['validation', 'test_novel'])
def test_eval_visits_every_expression_once_over_two_hosts(
    tiny_config, tiny_builder, split):
  expected = {}
  for ex in tfds.as_numpy(tiny_builder.as_dataset(split=split)):
    masks = ex['objects']['mask'][..., 0]
    for k, ids in enumerate(ex['objects']['refs']['sentence_id'].to_list()):
      for sentence_id in ids:
        expected[sentence_id] = masks[k]
  counts = [pipeline.count_expressions(tiny_config, split, i, 2)
            for i in range(2)]
  assert sum(counts) == len(expected)
  num_batches = -(-max(counts) // (BATCH // 2))
  seen = collections.Counter()
  for host in range(2):
    batches = list(tfds.as_numpy(pipeline.eval_dataset(
        tiny_config, split, BATCH, num_batches, host, 2)))
    assert len(batches) == num_batches
    valid = np.concatenate([b['valid'] for b in batches])
    assert valid.sum() == counts[host]
    assert valid[:counts[host]].all()  # Padding only at the end.
    for batch in batches:
      assert batch['image'].shape[0] == BATCH // 2
      for i in np.flatnonzero(batch['valid']):
        sentence_id = int(batch['sentence_id'][i])
        seen[sentence_id] += 1
        height, width = batch['orig_size'][i]
        np.testing.assert_array_equal(
            batch['eval_mask'][i][:height, :width], expected[sentence_id])
        assert batch['eval_mask'][i][height:].sum() == 0
      assert not batch['eval_mask'][~batch['valid']].any()
  assert set(seen) == set(expected) and set(seen.values()) == {1}


def test_eval_rejects_images_larger_than_the_mask_canvas(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.eval_mask_size = 32
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='eval_mask_size'):
    list(tfds.as_numpy(pipeline.eval_dataset(config, 'validation', BATCH, 1)))


def test_unknown_supervision_missing_data_or_tokenizer_are_named(
    tiny_config, tmp_path):
  unbuilt = tiny_config.copy_and_resolve_references()
  unbuilt.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='refseg_jax.data.build'):
    pipeline.train_dataset(unbuilt, 'full', BATCH, seed=0)
  with pytest.raises(ValueError, match='boxes'):
    pipeline.train_dataset(tiny_config, 'boxes', BATCH, seed=0)
  with pytest.raises(FileNotFoundError, match='/no/such/vocab.txt'):
    pipeline.load_tokenizer('/no/such/vocab.txt', 'ref_shapes')
  with pytest.raises(ValueError, match='config.data.tokenizer'):
    pipeline.load_tokenizer(None, 'ref_coco/refcoco_unc')


def test_num_eval_batches_covers_the_split(tiny_config):
  count = pipeline.count_expressions(tiny_config, 'validation')
  num_batches = pipeline.num_eval_batches(tiny_config, 'validation', BATCH)
  assert (num_batches - 1) * BATCH < count <= num_batches * BATCH


def test_grouped_batches_hold_k_distinct_expressions_of_each_image(
    tiny_config, tiny_builder):
  # With flips off, a batch image is its decoded PNG: map each image to the
  # (box, sentence) of its expressions, then check every group against it.
  tokenizer = pipeline.load_tokenizer(None, 'ref_shapes')
  expressions_of = {}
  for example in tfds.as_numpy(tiny_builder.as_dataset(split='train')):
    objects = example['objects']
    expressions_of[example['image'].tobytes()] = {
        (tuple(np.round(objects['box'][k], 5)), sentence.decode())
        for k, sentences in enumerate(objects['refs']['sentence'].to_list())
        for sentence in sentences}
  config = tiny_config.copy_and_resolve_references()
  config.flip, config.expressions_per_image = False, 4
  checked = 0
  for batch in tfds.as_numpy(
      pipeline.train_dataset(config, 'full', 16, seed=0).take(4)):
    assert batch['image'].shape[0] == 4 and batch['mask'].shape[0] == 16
    sentences = tokenizer.batch_decode(batch['text_tokens'],
                                       skip_special_tokens=True)
    for i, image in enumerate(batch['image']):
      known = expressions_of[image.tobytes()]
      group = {(tuple(np.round(batch['box'][j], 5)), sentences[j])
               for j in range(4 * i, 4 * i + 4)}
      assert group <= known
      # Drawn without replacement while the image has enough.
      assert len(group) == min(4, len(known))
      checked += len(known) >= 2
  assert checked >= 8
  config.expressions_per_image = 3
  with pytest.raises(ValueError, match='not divisible by config.data.'
                     'expressions_per_image=3'):
    pipeline.train_dataset(config, 'full', 16, seed=0)
