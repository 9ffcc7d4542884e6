"""Shatter and Gather: module behaviour, the C^3 loss, text-only batches."""

import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from refseg_jax import config_lib
from refseg_jax import predict
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax import trained
from refseg_jax.data import pipeline
from refseg_jax.losses import sag as sag_losses
from refseg_jax.models import sag
from refseg_jax.tasks import sag_text

TEXT_CONFIG = pathlib.Path(__file__).parents[1] / 'configs' / 'text.py'
SIZE = 32
TOKENS = np.array([[1, 7, 12, 2], [1, 9, 2, 0], [1, 5, 6, 2], [1, 8, 2, 0]],
                  np.int32)
TEXT_MASK = (TOKENS > 0).astype(np.int32)


def small_sag(tiny_model, **fields):
  """A small SaG on SIZE px: the official ViT-feature reconstruction and
  [CLS] pooling, every slot a candidate."""
  return tiny_model('text.py', 16, **{
      'image_size': SIZE, 'dim': 16, 'groups': 3, 'slots_per_group': 2,
      'iterations': 2, 'heads': 2, 'head_dim': 8, 'interaction_heads': 2,
      'interaction_head_dim': 8, 'decoder_hidden': 16,
      'reconstruct': 'features', 'text_pooling': 'cls', 'max_slot_area': 1.0,
      **fields})


@pytest.fixture(scope='module', params=['fusion', 'slot_max'])
def model_run(request, tiny_model):
  """A small SaG on 2 images with 2 expressions each (grouped batch), with
  each way of gathering slots."""
  model = small_sag(tiny_model, gather=request.param)
  images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3),
                                             np.uint8)
  rngs = {'params': jax.random.key(0), 'slots': jax.random.key(1)}
  variables = jax.jit(functools.partial(model.init, train=False))(
      rngs, images, TOKENS, TEXT_MASK)

  @functools.partial(jax.jit, static_argnames='all_pairs')
  def apply(slot_key, all_pairs):
    return model.apply(variables, images, TOKENS, TEXT_MASK, train=False,
                       all_pairs=all_pairs, rngs={'slots': slot_key},
                       capture_intermediates=True, mutable=['intermediates'])
  return apply


def _gathering(state):
  """The outputs of the model's fusion or matching layer."""
  (outputs,), = [state['intermediates'][name]['__call__']
                 for name in ('fusion', 'matching')
                 if name in state['intermediates']]
  return outputs


def test_sine_position_encoding_values():
  # DETR's normalised encoding on a 1 x 2 grid, dim 8: y in channels 0-3,
  # x in 4-7; pairs (sin, cos) at frequencies 1 and 10000 ** (-2 / 4).
  # Row 0 sits at angle 1 / (1 + 1e-6) * 2 pi, column j at
  # (j + 1) / (2 + 1e-6) * 2 pi.
  encoding = np.asarray(sag.sine_position_encoding(1, 2, 8), np.float64)
  angle_y = 2 * np.pi / (1 + 1e-6)
  angle_x = 2 * np.pi * np.array([1, 2]) / (2 + 1e-6)
  for offset, angles in ((0, np.full(2, angle_y)), (4, angle_x)):
    expected = np.stack([np.sin(angles), np.cos(angles),
                         np.sin(angles / 100), np.cos(angles / 100)], -1)
    np.testing.assert_allclose(encoding[:, offset:offset + 4], expected,
                               atol=1e-6)


def test_centred_sine_position_encoding_values():
  # The pre-official layout on a 1 x 2 grid, dim 8: cell centres
  # (j + 0.5) / max(H, W) * 2 pi, [sin | cos] blocks per axis, frequencies
  # 1 and 10000 ** (-1 / 2).
  encoding = np.asarray(sag.sine_position_encoding(1, 2, 8, 'centred'),
                        np.float64)
  for offset, positions in ((0, np.full(2, 0.5)), (4, np.array([0.5, 1.5]))):
    angles = positions[:, None] * np.pi * np.array([1, 0.01])
    np.testing.assert_allclose(
        encoding[:, offset:offset + 4],
        np.concatenate([np.sin(angles), np.cos(angles)], -1), atol=1e-6)
  with pytest.raises(ValueError, match="'polar'.*'detr', 'centred'"):
    sag.sine_position_encoding(1, 2, 8, 'polar')


def test_slot_attention_sums_to_one_over_slots(model_run):
  _, state = model_run(jax.random.key(1), False)
  slots, attention = state['intermediates']['entities']['__call__'][0]
  assert slots.shape == (2, 6, 16) and attention.shape == (2, 6, 16)
  np.testing.assert_allclose(np.asarray(attention).sum(1), 1.0, atol=1e-5)


def test_mask_is_fuse_attention_times_slot_attention(model_run):
  outputs, state = model_run(jax.random.key(1), False)
  _, slot_attention = state['intermediates']['entities']['__call__'][0]
  _, fuse = _gathering(state)  # [T, 1, K]
  image_of = np.array([0, 0, 1, 1])
  expected = np.einsum('tk,tkn->tn', np.asarray(fuse)[:, 0],
                       np.asarray(slot_attention)[image_of])
  np.testing.assert_allclose(np.asarray(outputs['mask']).reshape(4, -1),
                             expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(fuse).sum(-1), 1.0, atol=1e-5)


def test_all_pairs_fusion_agrees_with_own_image_fusion(model_run):
  paired, _ = model_run(jax.random.key(1), False)
  crossed, state = model_run(jax.random.key(1), True)
  assert crossed['scores'].shape == (4, 2)
  if 'fusion' in state['intermediates']:
    z, _ = _gathering(state)
    assert z.shape == (4, 2, 16)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
  # The own-image mask is the same whether or not every pair was fused.
  np.testing.assert_allclose(crossed['mask'], paired['mask'], atol=1e-6)
  # Slots are drawn from the key: another key, other slots and masks.
  other, _ = model_run(jax.random.key(2), False)
  assert not np.allclose(other['mask'], paired['mask'])


def test_slot_matching_scores_are_soft_maxima_of_slot_cosines():
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  slots = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
  matching = sag.SlotMatching(temperature=0.5)
  variables = matching.init(jax.random.key(0), text, slots, paired=False)
  scores, fuse = matching.apply(variables, text, slots, paired=False)
  dense = variables['params']['slot_embedding']
  keys = np.asarray(slots) @ np.asarray(dense['kernel']) + np.asarray(
      dense['bias'])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = np.einsum('td,ikd->tik', unit(np.asarray(text)), unit(keys)) / 0.5
  expected_fuse = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(scores, np.log(np.exp(logits).sum(-1)),
                             rtol=1e-5)
  np.testing.assert_allclose(fuse, expected_fuse, rtol=1e-5, atol=1e-7)
  # Paired: text t with image t only, the diagonal of every pair.
  paired_scores, paired_fuse = matching.apply(variables, text[:2], slots,
                                              paired=True)
  np.testing.assert_allclose(paired_scores[:, 0], np.diag(scores[:2]),
                             rtol=1e-5)
  np.testing.assert_allclose(paired_fuse[:, 0], expected_fuse[[0, 1], [0, 1]],
                             rtol=1e-5, atol=1e-7)
  # Slots that are not candidates get no attention and no part of the score.
  candidates = np.ones((2, 5), bool)
  candidates[0, [1, 3]] = candidates[1, 0] = False
  scores, fuse = matching.apply(variables, text, slots, paired=False,
                                candidates=jnp.asarray(candidates))
  masked = np.where(candidates[None], np.exp(logits), 0.0)
  np.testing.assert_allclose(scores, np.log(masked.sum(-1)), rtol=1e-5)
  np.testing.assert_allclose(fuse, masked / masked.sum(-1, keepdims=True),
                             rtol=1e-5, atol=1e-7)


def test_slot_matching_leaves_out_large_slots_but_never_all(tiny_model):
  # max_slot_area=0 leaves out every slot but each image's smallest: each
  # expression's mask is then exactly that slot's attention map.
  model = small_sag(tiny_model, gather='slot_max', max_slot_area=0.0)
  images = np.random.default_rng(1).integers(0, 255, (2, SIZE, SIZE, 3),
                                             np.uint8)
  rngs = {'params': jax.random.key(0), 'slots': jax.random.key(1)}
  outputs, state = jax.jit(lambda: model.init_with_output(
      rngs, images, TOKENS, TEXT_MASK, train=False,
      capture_intermediates=True))()
  _, slot_attention = state['intermediates']['entities']['__call__'][0]
  slot_attention = np.asarray(slot_attention)
  smallest = slot_attention.mean(-1).argmin(-1)  # [I]
  expected = slot_attention[[0, 0, 1, 1], smallest[[0, 0, 1, 1]]]
  np.testing.assert_allclose(np.asarray(outputs['mask']).reshape(4, -1),
                             expected, rtol=1e-5, atol=1e-7)


def test_same_image_pairs_are_exactly_the_other_copies():
  # Images 0 and 2 are the same dataset image (id 5); 2 expressions each.
  image_ids = jnp.array([5, 7, 5, 9])
  image_of = jnp.arange(8) // 2
  excluded = np.asarray(sag_losses.same_image_pairs(image_ids, image_of))
  expected = np.zeros((8, 4), bool)
  expected[[0, 1], 2] = True   # Expressions of image 0: image 2 is a copy.
  expected[[4, 5], 0] = True   # Expressions of image 2: image 0 is a copy.
  np.testing.assert_array_equal(excluded, expected)


def test_c3_loss_hand_computed():
  scores = jnp.array([[1.0, 0.0, 3.0], [0.0, 2.0, 0.5]])
  image_of = jnp.array([0, 1])
  lse = lambda *x: np.log(np.sum(np.exp(x)))
  expected = np.mean([lse(1.0, 0.0, 3.0) - 1.0, lse(0.0, 2.0, 0.5) - 2.0])
  assert float(sag_losses.c3_loss(scores, image_of)) == pytest.approx(
      expected, rel=1e-6)
  # Leaving image 2 out of expression 0's negatives removes its exp(3).
  excluded = jnp.array([[False, False, True], [False, False, False]])
  expected = np.mean([lse(1.0, 0.0) - 1.0, lse(0.0, 2.0, 0.5) - 2.0])
  assert float(sag_losses.c3_loss(scores, image_of, excluded)) == pytest.approx(
      expected, rel=1e-6)


def test_text_loss_warms_up_and_masks_same_image_by_default():
  outputs = {'scores': jnp.array([[1.0, 3.0], [0.0, 2.0]]),
             'reconstruction': jnp.ones((2, 4, 3)),
             'reconstruction_target': jnp.zeros((2, 4, 3))}
  batch = {'image_id': jnp.array([5, 5])}  # The same image twice.
  settings = dict(c3=1.0, reconstruction=1.0, mask_same_image=True,
                  warmup_steps=100)
  # The 0-based step 49 is the official 1-based iteration 50.
  total, terms = sag_text.text_supervision_loss(outputs, batch, 49,
                                                **settings)
  # Each expression's only negative is a copy of its own image: C^3 = 0.
  assert float(terms['c3']) == pytest.approx(0.0, abs=1e-6)
  assert float(terms['reconstruction']) == pytest.approx(1.0)
  assert float(total) == pytest.approx(0.5 * (0.0 + 1.0), rel=1e-6)
  _, official = sag_text.text_supervision_loss(
      outputs, batch, 100, **{**settings, 'mask_same_image': False})
  assert float(official['c3']) > 0.5


def test_text_batches_hold_no_mask_box_or_click(tiny_config):
  ds = pipeline.train_dataset(tiny_config, 'text', 8, seed=0)
  batch = next(iter(tfds.as_numpy(ds)))
  assert set(batch) == {'image', 'image_id', 'text_tokens', 'text_mask'}


def test_text_training_is_blind_to_masks_boxes_and_clicks(
    tiny_config, garbage_data_config):
  garbage_config = garbage_data_config('mask', 'box', 'clicks')
  first = lambda config, supervision: next(iter(tfds.as_numpy(
      pipeline.train_dataset(config, supervision, 8, seed=0))))
  # The garbage is real: click supervision sees other clicks...
  assert not np.allclose(first(garbage_config, 'click')['clicks'],
                         first(tiny_config, 'click')['clicks'])
  # ...but the text batch and the text loss do not change at all.
  batch, garbage_batch = first(tiny_config, 'text'), first(garbage_config,
                                                           'text')
  jax.tree.map(np.testing.assert_array_equal, batch, garbage_batch)
  config = config_lib.load(f'{TEXT_CONFIG}:data=ref_shapes_tiny')
  task = tasks.build(config, 64)

  @jax.jit
  def loss(batch):
    batch = {**batch, 'text_tokens': batch['text_tokens'] % 64}
    variables = task.init_variables(jax.random.key(0))
    # The training forward pass (all pairs), without dropout.
    outputs = task.model.apply(
        variables, batch['image'], batch['text_tokens'], batch['text_mask'],
        train=False, rngs={'slots': jax.random.key(2)},
        **task.train_inputs(batch))
    return task.loss(outputs, batch, 1000)

  (total, terms), (garbage_total, garbage_terms) = loss(batch), loss(
      garbage_batch)
  assert float(total) == float(garbage_total) and np.isfinite(float(total))
  assert jax.tree.map(float, terms) == jax.tree.map(float, garbage_terms)


def test_patch_pixels_lays_out_patches_row_major():
  # A 4 x 6 image of 2 x 3 patches: pixel value = 10 * row + column.
  image = (10 * np.arange(4)[:, None] + np.arange(6)[None, :]).astype(
      np.float32)[None, :, :, None]
  patches = np.asarray(sag.patch_pixels(jnp.asarray(image), 2, 2))
  assert patches.shape == (1, 4, 6)
  np.testing.assert_array_equal(patches[0, 0], [0, 1, 2, 10, 11, 12])
  np.testing.assert_array_equal(patches[0, 1], [3, 4, 5, 13, 14, 15])
  np.testing.assert_array_equal(patches[0, 3], [23, 24, 25, 33, 34, 35])


def test_pool_text_cls_or_mean_of_real_tokens():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  encoded = {'hidden': hidden, 'cls': hidden[:, 0]}
  text_mask = jnp.array([[1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(sag.pool_text(encoded, text_mask, 'cls'),
                                hidden[:, 0])
  np.testing.assert_allclose(sag.pool_text(encoded, text_mask, 'mean'),
                             [[1.0, 2.0], [8.0, 9.0]])
  with pytest.raises(ValueError, match="text_pooling='max'"):
    sag.pool_text(encoded, text_mask, 'max')


def test_response_map_normalises_over_the_image_not_the_padding():
  # A 2 x 4 patch map on a 16 px canvas holding a 8 x 16 (wide) image:
  # the top half is image, the bottom half padding.
  mask = jnp.array([[[0.2, 0.4, 0.6, 0.8],
                     [0.1, 0.3, 0.5, 0.7]]])
  content = jnp.array([[8, 16]])
  response = np.asarray(sag.response_map(mask, 16, content))
  canvas = np.asarray(jax.image.resize(mask, (1, 16, 16), 'bilinear'))
  image = canvas[0, :8]
  # Min-max over the image's own pixels: its extremes are exactly -0.5
  # and +0.5 whatever the padding holds.
  np.testing.assert_allclose(response[0, :8], (image - image.min()) / (
      image.max() - image.min() + 1e-9) - 0.5, atol=1e-6)
  assert response[0, :8].min() == pytest.approx(-0.5, abs=1e-6)
  # Extreme values on the padding change nothing on the image.
  maps = jnp.asarray(canvas).at[0, 8:].set(jnp.where(
      jnp.arange(16) % 2 == 0, -5.0, 9.0))
  region = sag.content_region(content, 16)
  np.testing.assert_allclose(
      np.asarray(sag.min_max_normalise(maps, region))[0, :8],
      response[0, :8] + 0.5, atol=1e-6)
  # Over the whole canvas (a square image) the minimum moves.
  whole = np.asarray(sag.response_map(mask, 16, jnp.array([[16, 16]])))
  assert whole[0, :8].min() > response[0, :8].min() + 0.01


def test_text_training_through_the_trainer_lowers_the_loss(
    tiny_data_dir, tmp_path, caplog):
  config = config_lib.load(f'{TEXT_CONFIG}:data=ref_shapes_tiny')
  config.data.update(data_dir=tiny_data_dir, prepare=False)
  config.update_from_flattened_dict({
      'total_steps': 30, 'log_every_steps': 10, 'loss.warmup_steps': 0,
      'optimizer.warmup_steps': 5, 'checkpoint_every_steps': 1000,
      'eval.batch_size': 64, 'eval.num_overlays': 0,
      'eval.every_steps': 1000})
  caplog.set_level('INFO')
  train.train_and_evaluate(config, str(tmp_path))
  losses = [float(match[1]) for record in caplog.records
            if (match := re.search(r'train/loss=([-\d.e]+)',
                                   record.getMessage()))]
  assert len(losses) == 3, losses
  # Mean losses of steps 1-10, 11-20, 21-30: C^3 starts at chance, log(16
  # images) = 2.77, plus the reconstruction; measured 3.26, 3.12, 3.08
  # (a 10-step window is noisy: each compared with the first only).
  assert max(losses[1:]) < losses[0] - 0.1, losses
  results = json.loads((tmp_path / 'results.json').read_text())
  assert 0.0 <= results['validation']['mIoU'] <= 100.0
  # The trained workdir predicts on an image of any shape: masks at its
  # size, a response that depends on the sentence, no PKS position or box.
  predictor = predict.Predictor(trained.load(str(tmp_path)))
  image = np.random.default_rng(2).integers(0, 255, (30, 50, 3), np.uint8)
  first, second = predictor(image, ['a star', 'the red circle'])
  assert first.mask.shape == second.mask.shape == (30, 50)
  assert not np.array_equal(first.response, second.response)
  assert first.position is None and first.box is None
