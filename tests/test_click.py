"""Click supervision: BoxInst losses, click labels and noise, no masks seen."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from refseg_jax import config_lib
from refseg_jax import tasks
from refseg_jax.data import pipeline
from refseg_jax.losses import boxinst
from refseg_jax.losses import weighting
from refseg_jax.models import pks
from refseg_jax.tasks import pks_click

BATCH = 8
CLICK_CONFIG = pathlib.Path(__file__).parents[1] / 'configs' / 'click.py'


def test_rgb_to_lab_matches_reference_colours():
  # CIE L*a*b* (D65) of sRGB white, black and pure red, as skimage gives.
  lab = np.asarray(boxinst.rgb_to_lab(jnp.array(
      [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])))
  np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
  np.testing.assert_allclose(lab[1], [0.0, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)


def test_box_coverage_is_the_fraction_of_each_cell_in_the_box():
  coverage = np.asarray(boxinst.box_coverage(
      jnp.array([[0.1, 0.25, 0.5, 0.75]]), (4, 4)))[0]
  rows = [0.6, 1.0, 0.0, 0.0]   # [0.1, 0.5) over cells of 0.25.
  cols = [0.0, 1.0, 1.0, 0.0]
  np.testing.assert_allclose(coverage, np.outer(rows, cols), atol=1e-6)


def _logits_where(mask, inside=30.0, outside=-30.0):
  return jnp.asarray(np.where(mask, inside, outside), jnp.float32)[None]


def test_projection_loss_zero_for_box_shaped_and_cross_masks():
  box = jnp.array([[0.25, 0.25, 0.75, 0.5]])  # Rows 2-5, columns 2-3 of 8.
  filled = np.zeros((8, 8), bool)
  filled[2:6, 2:4] = True
  assert float(boxinst.projection_loss(_logits_where(filled), box)) < 1e-4
  # Projections only: a mask touching each row and column of the box once
  # is just as good.
  diagonal = np.zeros((8, 8), bool)
  diagonal[[2, 3, 4, 5], [2, 3, 3, 2]] = True
  assert float(boxinst.projection_loss(_logits_where(diagonal), box)) < 1e-4
  # Shifted off the box's columns: the x projection is disjoint (Dice 1),
  # the y projection still matches.
  shifted = np.roll(filled, 4, axis=1)
  assert float(boxinst.projection_loss(_logits_where(shifted), box)) == (
      pytest.approx(1.0, abs=1e-4))


def _uniform_image(colour, side=16):
  return jnp.broadcast_to(jnp.asarray(colour, jnp.uint8), (1, side, side, 3))


def test_pairwise_loss_uniform_region_rewards_constant_predictions():
  image = _uniform_image((120, 80, 200))
  box = jnp.array([[0.0, 0.0, 1.0, 1.0]])
  pairwise = lambda logits: float(boxinst.pairwise_colour_loss(
      logits, image, box, 3, 2, 0.3))
  # Stride 2: 8 x 8 mask cells. Undecided cells: P(same) = 1/2.
  assert pairwise(jnp.zeros((1, 8, 8))) == pytest.approx(np.log(2), rel=1e-5)
  assert pairwise(jnp.full((1, 8, 8), 20.0)) < 1e-6
  assert pairwise(jnp.full((1, 8, 8), -20.0)) < 1e-6
  noisy = 3 * jax.random.normal(jax.random.key(0), (1, 8, 8))
  assert pairwise(noisy) > 0.3


def test_pairwise_loss_ignores_pairs_across_colour_edges_and_outside_box():
  image = np.zeros((1, 16, 16, 3), np.uint8)
  image[:, :, :8] = (255, 0, 0)   # Red left half,
  image[:, :, 8:] = (0, 0, 255)   # blue right half.
  left = np.zeros((8, 8), bool)
  left[:, :4] = True
  split_prediction = _logits_where(left, 20.0, -20.0)
  whole = jnp.array([[0.0, 0.0, 1.0, 1.0]])
  # The label changes only where the colour does: no pair pays.
  assert float(boxinst.pairwise_colour_loss(
      split_prediction, jnp.asarray(image), whole, 3, 2, 0.3)) < 1e-6
  # On a uniform image the same prediction pays at the edge.
  assert float(boxinst.pairwise_colour_loss(
      split_prediction, _uniform_image((255, 0, 0)), whole, 3, 2,
      0.3)) > 1.0
  # Pairs whose first cell is outside the box are not counted: a box over
  # columns 0-1 sees no edge on the uniform image either.
  narrow = jnp.array([[0.0, 0.0, 1.0, 0.25]])
  assert float(boxinst.pairwise_colour_loss(
      split_prediction, _uniform_image((255, 0, 0)), narrow, 3, 2,
      0.3)) < 1e-6


def test_neighbourhood_is_boxinst_3x3_dilation_2():
  assert sorted(boxinst.neighbour_offsets(3, 2)) == [
      (-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]


def test_point_loss_at_the_click_cell():
  point = jnp.array([[0.30, 0.60]])  # Cell (2, 4) of 8 x 8.
  assert float(boxinst.point_loss(jnp.zeros((1, 8, 8)), point)) == (
      pytest.approx(np.log(2), rel=1e-6))
  hit = jnp.full((1, 8, 8), -20.0).at[0, 2, 4].set(20.0)
  assert float(boxinst.point_loss(hit, point)) < 1e-8
  assert float(boxinst.point_loss(jnp.roll(hit, 1, axis=2), point)) > 19


def test_outside_box_loss_only_sees_cells_outside_the_box():
  box = jnp.array([[0.0, 0.0, 0.5, 0.5]])  # The top-left 2 x 2 of 4 x 4.
  inside = np.zeros((4, 4), bool)
  inside[:2, :2] = True
  loss = lambda logits: float(boxinst.outside_box_loss(logits, box))
  assert loss(jnp.zeros((1, 4, 4))) == pytest.approx(np.log(2), rel=1e-6)
  # Whatever the mask does inside the box costs nothing...
  assert loss(_logits_where(inside, 30.0, -30.0)) < 1e-12
  assert loss(_logits_where(inside, -30.0, -30.0)) < 1e-12
  # ...and 12 of 12 outside cells at logit 30 cost 30 each.
  assert loss(_logits_where(inside, -30.0, 30.0)) == pytest.approx(30.0)


def test_outside_margin_spares_the_cells_a_noisy_box_may_miss():
  box = jnp.array([[0.25, 0.25, 0.75, 0.75]])  # The middle 4 x 4 of 8 x 8.
  np.testing.assert_allclose(boxinst.widen_box(box, 0.25),
                             [[0.125, 0.125, 0.875, 0.875]])
  np.testing.assert_allclose(boxinst.widen_box(box, 1.0), [[0, 0, 1, 1]])
  # The mask on the ring of cells just around the box: costly without a
  # margin, free with a margin of a cell (a quarter of the box's side).
  ring = np.zeros((8, 8), bool)
  ring[1:7, 1:7] = True
  ring[2:6, 2:6] = False
  logits = _logits_where(ring, 30.0, -30.0)
  assert float(boxinst.outside_box_loss(logits, box)) > 10
  assert float(boxinst.outside_box_loss(logits, box, margin=0.25)) < 1e-12


def test_pairwise_warmup_ramps_linearly_then_holds():
  ramp = [float(weighting.linear_warmup(s, 150)) for s in (0, 75, 150, 600)]
  assert ramp == pytest.approx([0.0, 0.5, 1.0, 1.0])
  assert float(weighting.linear_warmup(0, 0)) == 1.0


@pytest.fixture(scope='module')
def click_batch(tiny_config):
  ds = pipeline.train_dataset(tiny_config, 'click', BATCH, seed=0)
  return next(iter(tfds.as_numpy(ds)))


@pytest.fixture(scope='module')
def click_model_outputs(click_batch, tiny_model):
  model = tiny_model('click.py', 64, dim=16, mask_stride=8, frozen_bn=True,
                     mask_trunk_gradient=1.0)
  return _run_model(model, click_batch)


@functools.partial(jax.jit, static_argnums=0)
def _run_model(model, batch):
  """Outputs of a freshly initialised `model` on a (click) batch."""
  tokens = batch['text_tokens'] % 64
  variables = model.init(jax.random.key(0), batch['image'], tokens,
                         batch['text_mask'], train=False)
  return model.apply(variables, batch['image'], tokens, batch['text_mask'],
                     train=False, centre=batch['clicks'][:, 0])


def test_click_loss_adds_pairwise_as_it_warms_up(click_batch,
                                                 click_model_outputs):
  settings = dict(config_lib.load(
      f'{CLICK_CONFIG}:data=ref_shapes_tiny').loss)
  settings.update(pairwise_warmup_steps=100, projection=2.0, outside=0.5)
  loss = lambda step: pks_click.click_supervision_loss(
      click_model_outputs, click_batch, step, **settings)
  total0, terms = loss(0)
  total50, _ = loss(50)
  total100, _ = loss(100)
  others = sum(settings[k] * terms[k] for k in terms if k != 'pairwise')
  assert float(terms['pairwise']) > 0
  np.testing.assert_allclose(float(total0), float(others), rtol=1e-6)
  np.testing.assert_allclose(float(total50), float(others + 0.5 * terms[
      'pairwise']), rtol=1e-6)
  np.testing.assert_allclose(float(total100), float(others + terms[
      'pairwise']), rtol=1e-6)


def test_click_batches_have_clicks_and_their_box_no_mask(tiny_config,
                                                         click_batch):
  full = next(iter(tfds.as_numpy(
      pipeline.train_dataset(tiny_config, 'full', BATCH, seed=0))))
  assert 'mask' not in click_batch
  # Exact clicks: the same examples as full supervision, and the box is the
  # corner clicks' span, which for exact clicks is the annotated box.
  np.testing.assert_array_equal(click_batch['image'], full['image'])
  np.testing.assert_array_equal(click_batch['clicks'], full['clicks'])
  np.testing.assert_allclose(click_batch['box'], full['box'], atol=1e-6)


def test_click_noise_shifts_clicks_by_the_box_fraction(tiny_config,
                                                       click_batch):
  config = tiny_config.copy_and_resolve_references()
  config.click_noise = 0.1
  ds = pipeline.train_dataset(config, 'click', 64, seed=0)
  exact = next(iter(tfds.as_numpy(
      pipeline.train_dataset(tiny_config, 'click', 64, seed=0))))
  noisy = next(iter(tfds.as_numpy(ds)))
  size = exact['box'][:, 2:] - exact['box'][:, :2]           # [B, (h, w)]
  relative = (noisy['clicks'] - exact['clicks']) / size[:, None, :]
  # |N(0, 0.1)| has mean 0.1 * sqrt(2 / pi) = 0.080 (clipping at the image
  # border only shortens shifts).
  assert 0.06 < np.abs(relative).mean() < 0.09
  corners = noisy['clicks'][:, 1:]
  np.testing.assert_allclose(noisy['box'], np.concatenate(
      [corners.min(1), corners.max(1)], -1), atol=1e-6)
  np.testing.assert_array_equal(noisy['image'], exact['image'])


def test_click_noise_outside_click_supervision_is_an_error(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.click_noise = 0.05
  with pytest.raises(ValueError, match='click_noise=0.05 applies to click'):
    pipeline.train_dataset(config, 'full', BATCH, seed=0)


def test_click_training_is_blind_to_every_stored_mask(
    tiny_config, garbage_data_config, click_batch):
  # The tiny dataset rebuilt with every object's stored mask replaced by
  # noise (boxes and clicks still come from the true masks).
  garbage_config = garbage_data_config('mask')
  first = lambda config, supervision: next(iter(tfds.as_numpy(
      pipeline.train_dataset(config, supervision, BATCH, seed=0))))
  garbage_click = first(garbage_config, 'click')
  # The garbage is real: full supervision sees other masks...
  assert (first(garbage_config, 'full')['mask']
          != first(tiny_config, 'full')['mask']).mean() > 0.2
  # ...but the click batch and the click loss do not change at all.
  jax.tree.map(np.testing.assert_array_equal, garbage_click, click_batch)
  config = config_lib.load(f'{CLICK_CONFIG}:data=ref_shapes_tiny')
  task = tasks.build(config, 64)

  loss = lambda batch: task.loss(_run_model(task.model, batch), batch, 1000)

  (total, terms), (garbage_total, garbage_terms) = (
      loss(click_batch), loss(garbage_click))
  assert float(total) == float(garbage_total) and np.isfinite(float(total))
  assert jax.tree.map(float, terms) == jax.tree.map(float, garbage_terms)
