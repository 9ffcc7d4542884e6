"""Mixed supervision: per-referent labels, per-example losses, the teacher."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from refseg_jax import config_lib
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax.data import pipeline
from refseg_jax.losses import boxinst
from refseg_jax.tasks import pks_click
from refseg_jax.tasks import pks_full
from refseg_jax.tasks import pks_mixed

BATCH = 32
VOCAB = 64
MIXED_CONFIG = pathlib.Path(__file__).parents[1] / 'configs' / 'mixed.py'
FRACTIONS = {'mask': 0.3, 'clicks': 0.3, 'text': 0.4}
MASK, CLICKS, TEXT = pks_mixed.MASK, pks_mixed.CLICKS, pks_mixed.TEXT


def _kinds(ids, fractions):
  return pipeline.label_kinds(tf.constant(ids, tf.int64), fractions).numpy()


def test_label_kinds_are_per_referent_and_hit_their_fractions():
  ids = np.arange(1, 30_001, dtype=np.int64) * 7_919
  kinds = _kinds(ids, {'mask': 0.1, 'clicks': 0.3, 'text': 0.6})
  # 30,000 draws: each share's binomial std is at most 0.0029.
  np.testing.assert_allclose(np.bincount(kinds, minlength=3) / ids.size,
                             [0.1, 0.3, 0.6], atol=0.01)
  # A referent's kind depends on its id alone: not on the order, the
  # batch shape, the epoch or the process that asks.
  order = np.random.default_rng(0).permutation(ids.size)
  np.testing.assert_array_equal(
      _kinds(ids[order].reshape(-1, 2), {'mask': 0.1, 'clicks': 0.3,
                                         'text': 0.6}).reshape(-1),
      kinds[order])
  # Smaller mask fractions label a subset of the same referents, so the
  # points of a mask-fraction curve are nested.
  fewer = _kinds(ids, {'mask': 0.01, 'clicks': 0.99})
  assert 0.005 < (fewer == MASK).mean() < 0.015
  assert set(ids[fewer == MASK]) <= set(ids[kinds == MASK])
  assert (_kinds(ids, {'clicks': 1.0}) == CLICKS).all()


@pytest.mark.parametrize('fractions, message', [
    ({'mask': 0.5, 'boxes': 0.5}, r"unknown kinds \['boxes'\]"),
    ({'mask': 0.5, 'clicks': 0.4}, 'sums to 0.9'),
    ({'mask': 1.5, 'clicks': -0.5}, 'supervision.mask=1.5 is not a fraction'),
])
def test_bad_fractions_are_named(fractions, message):
  with pytest.raises(ValueError, match=message):
    pipeline.check_fractions(fractions)


def _mixed_data_config(tiny_config, **changes):
  config = tiny_config.copy_and_resolve_references()
  with config.unlocked():
    config.supervision = FRACTIONS
    config.update(changes)
  return config


def _first(config, supervision):
  return next(iter(tfds.as_numpy(
      pipeline.train_dataset(config, supervision, BATCH, seed=0))))


@pytest.fixture(scope='module')
def mixed_batch(tiny_config):
  return _first(_mixed_data_config(tiny_config, click_noise=0.1), 'mixed')


def test_mixed_batches_hold_only_each_examples_labels(tiny_config,
                                                      mixed_batch):
  full = _first(tiny_config, 'full')
  kinds = mixed_batch['labelled_with']
  assert {MASK, CLICKS, TEXT} <= set(kinds.tolist())
  # The same examples as full supervision (same seed, same order).
  np.testing.assert_array_equal(mixed_batch['image'], full['image'])
  masked, clicked, text = kinds == MASK, kinds == CLICKS, kinds == TEXT
  # A masked referent: its mask and its exact clicks, noise or not.
  np.testing.assert_array_equal(mixed_batch['mask'][masked],
                                full['mask'][masked])
  np.testing.assert_array_equal(mixed_batch['clicks'][masked],
                                full['clicks'][masked])
  # A clicked one: noisy clicks (click_noise applies to these alone) and
  # their span, no mask.
  assert not mixed_batch['mask'][~masked].any()
  assert (mixed_batch['clicks'][clicked] != full['clicks'][clicked]).all()
  corners = mixed_batch['clicks'][clicked][:, 1:]
  np.testing.assert_allclose(mixed_batch['box'][clicked], np.concatenate(
      [corners.min(1), corners.max(1)], -1), atol=1e-6)
  # Text only: nothing but the sentence.
  assert not mixed_batch['clicks'][text].any()
  assert not mixed_batch['box'][text].any()


@pytest.mark.parametrize('group', [0, 2])
def test_oversampled_masks_fill_their_share_of_batches(tiny_config, group):
  config = _mixed_data_config(tiny_config, oversample_masked=0.5,
                              expressions_per_image=group)
  batches = list(tfds.as_numpy(pipeline.train_dataset(
      config, 'mixed', BATCH, seed=0).take(8)))
  kinds = np.concatenate([b['labelled_with'] for b in batches])
  # Half the examples (images) from the masked referents alone, half
  # drawn as before (30 % masked): 0.65 in expectation, std ~0.03-0.04
  # over 256 examples; without oversampling 0.3.
  assert abs((kinds == MASK).mean() - 0.65) < 0.1
  masks = np.concatenate([b['mask'] for b in batches])
  assert masks[kinds == MASK].any(axis=(1, 2)).all()
  assert not masks[kinds != MASK].any()


def test_oversampling_needs_masked_referents(tiny_config):
  config = _mixed_data_config(tiny_config, oversample_masked=0.5)
  with config.unlocked():
    config.supervision = {'clicks': 1.0}
  with pytest.raises(ValueError, match='oversample_masked=0.5 must be'):
    pipeline.train_dataset(config, 'mixed', BATCH, seed=0)


def test_a_missed_centre_click_lands_in_the_box():
  box = np.array([[0.2, 0.4, 0.6, 0.5]] * 500, np.float32)
  element = {'box': tf.constant(box), 'clicks': tf.constant(np.stack(
      [(box[:, :2] + box[:, 2:]) / 2, box[:, :2], box[:, 2:]], 1))}
  seed = tf.constant([1, 2], tf.int64)
  missed = pipeline.click_labels(element, 0.0, seed, miss=1.0)['clicks']
  kept = pipeline.click_labels(element, 0.0, seed, miss=0.0)['clicks']
  np.testing.assert_array_equal(kept, element['clicks'])
  centre = missed[:, 0].numpy()
  assert ((centre >= box[:, :2]) & (centre <= box[:, 2:])).all()
  # Uniform over the box: its quarters each get about a quarter.
  upper_left = (centre < (box[:, :2] + box[:, 2:]) / 2).all(-1)
  assert 0.18 < upper_left.mean() < 0.32
  np.testing.assert_array_equal(missed[:, 1:], element['clicks'][:, 1:])


def _task(**loss):
  """A small PKS on the three kinds of `FRACTIONS`, both teacher parts on
  (text-only pseudo-labels at threshold 0, clicked examples' masks)."""
  config = config_lib.load(
      f'{MIXED_CONFIG}:data=ref_shapes_tiny,rest=text,click_teacher=1')
  config.model.update(dim=16, mask_stride=8, frozen_bn=True)
  config.data.supervision.update(FRACTIONS)
  config.loss.update({'pseudo_threshold': 0.0, **loss})
  return tasks.build(config, VOCAB)


@pytest.fixture(scope='module')
def task_and_variables():
  task = _task()
  return task, jax.jit(task.init_variables)(jax.random.key(0))


# Compiled once per task (static) for every batch of the same shapes.
_jitted_loss_and_grads = jax.jit(train.loss_and_grads, static_argnums=0)


def _loss_and_grads(task, variables, batch):
  batch = pks_mixed.no_teacher_labels(
      dict(batch, text_tokens=batch['text_tokens'] % VOCAB))
  (total, (terms, _)), grads = _jitted_loss_and_grads(
      task, variables['params'], variables['batch_stats'], batch, 1000)
  return total, terms, grads


def test_each_example_sees_only_what_it_is_labelled_with(task_and_variables,
                                                        mixed_batch):
  task, variables = task_and_variables
  kinds = mixed_batch['labelled_with']
  garbage = dict(mixed_batch)
  rng = np.random.default_rng(0)
  # Masks of clicked and text-only examples: noise; clicks and box of
  # text-only ones: NaN.
  garbage['mask'] = np.where((kinds != MASK)[:, None, None],
                             rng.integers(0, 2, mixed_batch['mask'].shape),
                             mixed_batch['mask']).astype(np.uint8)
  text = (kinds == TEXT)
  garbage['clicks'] = np.where(text[:, None, None], np.nan,
                               mixed_batch['clicks']).astype(np.float32)
  garbage['box'] = np.where(text[:, None], np.nan,
                            mixed_batch['box']).astype(np.float32)
  total, terms, grads = _loss_and_grads(task, variables, mixed_batch)
  garbage_total, garbage_terms, garbage_grads = _loss_and_grads(
      task, variables, garbage)
  assert np.isfinite(float(total)) and float(total) == float(garbage_total)
  assert jax.tree.map(float, terms) == jax.tree.map(float, garbage_terms)
  jax.tree.map(np.testing.assert_array_equal, grads, garbage_grads)
  # ...while a masked example's mask does count.
  flipped = dict(mixed_batch, mask=np.where(
      (kinds == MASK)[:, None, None], 1 - mixed_batch['mask'],
      mixed_batch['mask']).astype(np.uint8))
  assert float(_loss_and_grads(task, variables, flipped)[0]) != float(total)


@pytest.mark.parametrize('kind, loss_fn', [
    (MASK, pks_full.full_supervision_loss),
    (CLICKS, pks_click.click_supervision_loss)])
def test_one_kind_alone_is_that_tasks_loss(task_and_variables, mixed_batch,
                                           kind, loss_fn):
  task, variables = task_and_variables
  # Every example labelled `kind` (those without such labels have zeros:
  # both losses see the same batch).
  batch = pks_mixed.no_teacher_labels(dict(
      mixed_batch, labelled_with=np.full(BATCH, kind, np.int32),
      text_tokens=mixed_batch['text_tokens'] % VOCAB))
  outputs = jax.jit(lambda v, b: task.model.apply(
      v, b['image'], b['text_tokens'], b['text_mask'], train=False,
      centre=b['clicks'][:, 0]))(variables, batch)
  total, terms = jax.jit(task.loss)(outputs, batch, 1000)
  settings = {k: v for k, v in task.config.loss.items()
              if k in loss_fn.__code__.co_varnames}
  args = (outputs, batch, 1000) if kind == CLICKS else (outputs, batch)
  expected_total, expected_terms = loss_fn(*args, **settings)
  prefix = pipeline.LABEL_KINDS[kind]
  np.testing.assert_allclose(float(total), float(expected_total), rtol=1e-5)
  for name, value in expected_terms.items():
    np.testing.assert_allclose(float(terms[f'{prefix}/{name}']), float(value),
                               rtol=1e-5, err_msg=name)
  assert float(terms[f'share/{prefix}']) == 1.0


def test_the_teacher_labels_text_and_clicked_examples_without_gradient(
    task_and_variables, mixed_batch):
  task, student = task_and_variables
  teacher = jax.jit(task.init_variables)(jax.random.key(1))
  pseudo_label = jax.jit(task.pseudo_label)
  batch = dict(mixed_batch, text_tokens=mixed_batch['text_tokens'] % VOCAB)
  text = batch['labelled_with'] == TEXT
  clicked = batch['labelled_with'] == CLICKS
  start = pks_mixed.pseudo_start_step(task.config)

  # Before the start step: no teacher labels, the batch as it was.
  before = pseudo_label(teacher, batch, start - 1)
  jax.tree.map(np.testing.assert_array_equal, before,
               pks_mixed.no_teacher_labels(batch))

  # After: its inference outputs label the text-only examples where its
  # mask is not empty (threshold 0)...
  after = pseudo_label(teacher, batch, start)
  run = jax.jit(lambda v, b, centre: task.model.apply(
      v, b['image'], b['text_tokens'], b['text_mask'], train=False,
      centre=centre))
  outputs = run(teacher, batch, None)
  grid = np.asarray(outputs['mask_logits'] > 0)
  expected = text & grid.any((1, 2))
  assert expected.any() and (text & ~expected).any()  # Both cases here.
  np.testing.assert_array_equal(after['pseudo'], expected)
  stride = batch['mask'].shape[-1] // grid.shape[-1]
  np.testing.assert_array_equal(
      after['mask'][expected],
      grid.repeat(stride, 1).repeat(stride, 2)[expected])
  np.testing.assert_allclose(after['clicks'][expected][:, 0],
                             np.asarray(outputs['centre'])[expected])
  for key in ('mask', 'clicks', 'box'):
    np.testing.assert_array_equal(after[key][~expected], batch[key][~expected])

  # ...and gives each clicked one its mask with the kernel at the click,
  # cut to the cells the box covers half of, weighted by its confidence.
  prob = np.asarray(jax.nn.sigmoid(
      run(teacher, batch, batch['clicks'][:, 0])['mask_logits']))
  inside = np.asarray(boxinst.box_coverage(batch['box'], prob.shape[1:]))
  called = (prob > 0.5) & (inside >= 0.5)
  assert called.any() and (prob > 0.5)[~called].any()  # Both cases.
  masks = np.asarray(after['teacher_mask'])[:, ::stride, ::stride]
  np.testing.assert_array_equal(masks[clicked], called[clicked])
  confidence = (prob * called).sum((1, 2)) / np.maximum(called.sum((1, 2)),
                                                          1)
  weight = np.asarray(after['teacher_weight'])
  assert (weight[~clicked] == 0).all() and (weight[clicked] > 0).any()
  np.testing.assert_allclose(weight[clicked], confidence[clicked], rtol=1e-5)

  # A confidence threshold over every peak labels no text-only example.
  strict = _task(pseudo_threshold=1.01)
  assert not jax.jit(strict.pseudo_label)(teacher, batch, start)[
      'pseudo'].any()

  # The loss through the teacher's labels: no gradient reaches the teacher.
  def loss_of_teacher(teacher_params):
    labelled = task.pseudo_label(
        {'params': teacher_params, 'batch_stats': teacher['batch_stats']},
        batch, start)
    return train.loss_and_grads(task, student['params'],
                                student['batch_stats'], labelled, start)[0]
  (value, (terms, _)), grads = jax.jit(jax.value_and_grad(
      loss_of_teacher, has_aux=True))(teacher['params'])
  assert np.isfinite(float(value))
  assert float(terms['pseudo/dice']) > 0
  assert float(terms['click_teacher/dice']) > 0
  assert float(terms['share/click_teacher']) == (weight > 0).mean()
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads))


def test_text_only_examples_need_a_teacher():
  with pytest.raises(ValueError, match='set config.ema_decay > 0'):
    config = config_lib.load(f'{MIXED_CONFIG}:data=ref_shapes_tiny,rest=text')
    config.ema_decay = 0.0
    tasks.build(config, VOCAB)
  # Without the pseudo-label weight they are simply left out.
  config = config_lib.load(f'{MIXED_CONFIG}:data=ref_shapes_tiny,rest=none')
  assert not tasks.build(config, VOCAB).uses_teacher(config)
