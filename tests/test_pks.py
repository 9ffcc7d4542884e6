"""Behaviour tests of the PKS model and its losses (CPU-sized)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from refseg_jax.losses import heatmap
from refseg_jax.losses import masks
from refseg_jax.models import pks
from refseg_jax.tasks import pks_full

SIZE = 64            # Canvas side S; the grid is S / 8 = 8 cells.
GRID = SIZE // 8
VOCAB = 43           # ref_shapes' vocabulary.
TOKENS = np.array([[1, 7, 12, 30, 2, 0], [1, 40, 2, 0, 0, 0]], np.int32)
TEXT_MASK = (TOKENS > 0).astype(np.int32)



def _full_loss(outputs, batch):
  """The full-supervision task's total with configs/full.py's weights."""
  return pks_full.full_supervision_loss(outputs, batch, heatmap=1.0, box=5.0,
                                        dice=1.0, bce=1.0, heatmap_sigma=1.0)[0]

def _batch():
  """Two images, each with one bright square: the referent."""
  boxes = np.array([[0.25, 0.125, 0.625, 0.5], [0.5, 0.5, 0.875, 0.75]])
  image = np.full((2, SIZE, SIZE, 3), 40, np.uint8)
  mask = np.zeros((2, SIZE, SIZE), np.uint8)
  for b, (y0, x0, y1, x1) in enumerate((boxes * SIZE).astype(int)):
    image[b, y0:y1, x0:x1] = (220, 180, 60)
    mask[b, y0:y1, x0:x1] = 1
  centre = (boxes[:, :2] + boxes[:, 2:]) / 2
  clicks = np.stack([centre, boxes[:, :2], boxes[:, 2:]], axis=1)
  return {'image': image, 'text_tokens': TOKENS, 'text_mask': TEXT_MASK,
          'box': boxes.astype(np.float32), 'clicks': clicks.astype(np.float32),
          'mask': mask}


def small_pks(tiny_model, **fields):
  """The tiny config's PKS, smaller, at mask stride 8 (the grid's)."""
  return tiny_model('full.py', VOCAB, **{
      'dim': 16, 'mask_stride': 8, 'frozen_bn': True, **fields})


@pytest.fixture(scope='module')
def setup(tiny_model):
  """One init of a small PKS, shared by the model tests."""
  model = small_pks(tiny_model)
  batch = _batch()
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(0), batch['image'], TOKENS, TEXT_MASK,
                   centre=batch['clicks'][:, 0])
  apply = jax.jit(functools.partial(model.apply, train=False))
  return model, variables, apply, batch


# ---------------------------------------------------------------- losses ---


def test_gaussian_heatmap_peaks_at_centre_cell_and_is_symmetric():
  # (0.5, 0.3) lies in cell (4, 2) of an 8 x 8 grid.
  target = np.asarray(heatmap.gaussian_heatmap(
      jnp.array([[0.5, 0.3]]), (GRID, GRID), sigma=1.0))[0]
  assert target[4, 2] == 1.0
  assert np.sum(target == 1.0) == 1
  np.testing.assert_allclose(target[3, 2], np.exp(-0.5), rtol=1e-6)
  # Mirror images around the peak cell agree.
  np.testing.assert_allclose(target[4, 0:2], target[4, 3:5][::-1])
  np.testing.assert_allclose(target[2:4, 2], target[5:7, 2][::-1])
  np.testing.assert_allclose(target[3, 1], target[5, 3])


def test_focal_loss_small_for_perfect_and_larger_for_wrong_peak():
  target = heatmap.gaussian_heatmap(jnp.array([[0.5, 0.3]]), (GRID, GRID), 1.0)
  perfect = jnp.where(target == 1, 20.0, -20.0)
  wrong = jnp.roll(perfect, 3, axis=2)
  assert float(heatmap.focal_heatmap_loss(perfect, target)) < 1e-6
  assert float(heatmap.focal_heatmap_loss(wrong, target)) > 1.0


def test_dice_perfect_zero_disjoint_one_and_valid_mask():
  mask = np.zeros((2, 4, 4), np.float32)
  mask[:, :2] = 1
  perfect = jnp.asarray(np.where(mask > 0, 30.0, -30.0))
  disjoint = -perfect
  assert float(masks.dice_loss(perfect, mask)) == pytest.approx(0, abs=1e-5)
  assert float(masks.dice_loss(disjoint, mask)) == pytest.approx(1, abs=1e-5)
  # Only the valid example counts: a perfect one next to a disjoint one.
  mixed = jnp.stack([perfect[0], disjoint[1]])
  valid = jnp.array([True, False])
  assert float(masks.dice_loss(mixed, mask, valid)) == pytest.approx(
      0, abs=1e-5)


def test_bce_of_zero_logits_is_log2():
  mask = np.random.default_rng(0).integers(0, 2, (2, 4, 4))
  assert float(masks.bce_loss(jnp.zeros((2, 4, 4)), mask)) == pytest.approx(
      np.log(2), rel=1e-6)


def test_box_l1_hand_case():
  pred = jnp.array([[0.0, 0.0, 1.0, 1.0]])
  box = jnp.array([[0.1, 0.2, 0.7, 0.9]])
  # (0.1 + 0.2 + 0.3 + 0.1) / 4
  assert float(heatmap.box_l1_loss(pred, box)) == pytest.approx(0.175)


def test_downsample_mask_gives_cell_coverage():
  mask = np.zeros((1, 8, 8), np.uint8)
  mask[0, :2, :3] = 1  # Cell (0, 0) of a 2 x 2 grid: 6 of 16 pixels.
  pooled = np.asarray(masks.downsample_mask(mask, (2, 2)))
  np.testing.assert_allclose(pooled, [[[6 / 16, 0], [0, 0]]])


# ----------------------------------------------------------------- model ---


def test_dynamic_param_count_is_condinst_169():
  # (8 + 2) * 8 + 8  +  8 * 8 + 8  +  8 * 1 + 1
  assert pks.dynamic_param_count(8, 8, 3) == 88 + 72 + 9 == 169


def test_decode_box_reads_distances_at_centre_cell():
  box_map = jnp.zeros((1, 4, 4, 4)).at[0, 1, 2].set(
      jnp.array([0.1, 0.2, 0.3, 0.05]))
  # (0.3, 0.6) is in cell (1, 2), whose centre is (0.375, 0.625).
  decoded = pks.decode_box(box_map, jnp.array([[0.3, 0.6]]))
  np.testing.assert_allclose(decoded, [[0.275, 0.425, 0.675, 0.675]],
                             atol=1e-6)


def test_forward_shapes_and_finite(setup):
  _, variables, apply, batch = setup
  out = apply(variables, batch['image'], TOKENS, TEXT_MASK)
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == {
      'heatmap': (2, GRID, GRID), 'box': (2, GRID, GRID, 4),
      'box_at_centre': (2, 4), 'mask_logits': (2, GRID, GRID),
      'mask_features': (2, GRID, GRID, 8), 'centre': (2, 2)}
  for v in out.values():
    assert np.all(np.isfinite(v))
  # Without a centre the kernel comes from the heatmap peak.
  np.testing.assert_allclose(out['centre'], pks.heatmap_peak(out['heatmap']))


def test_kernel_generator_starts_at_the_configured_std(setup, tiny_model):
  generator_std = lambda variables: np.std(
      variables['params']['kernel_out']['kernel'])
  _, variables, _, batch = setup
  wider = small_pks(tiny_model, kernel_init_std=0.05)
  init = jax.jit(functools.partial(wider.init, train=False))
  # 16 x 169 weights each: their std within 10 % of the configured one
  # (the configs' 0.01, then 0.05).
  np.testing.assert_allclose(generator_std(variables), 0.01, rtol=0.1)
  np.testing.assert_allclose(
      generator_std(init(jax.random.key(0), batch['image'], TOKENS,
                         TEXT_MASK)), 0.05, rtol=0.1)


def test_mask_head_uses_kernel_at_centre(setup):
  _, variables, apply, batch = setup
  run = lambda c: apply(variables, batch['image'], TOKENS, TEXT_MASK,
                        centre=jnp.asarray(c, jnp.float32))['mask_logits']
  a = run([[0.2, 0.2], [0.2, 0.2]])
  b = run([[0.7, 0.6], [0.7, 0.6]])
  np.testing.assert_array_equal(a, run([[0.2, 0.2], [0.2, 0.2]]))
  assert np.max(np.abs(a - b)) > 1e-4


def test_language_never_touches_segmentation(setup):
  _, variables, apply, batch = setup
  centre = batch['clicks'][:, 0]
  other = np.where(TEXT_MASK > 0, (TOKENS + 5) % VOCAB, 0).astype(np.int32)
  out = apply(variables, batch['image'], TOKENS, TEXT_MASK, centre=centre)
  out2 = apply(variables, batch['image'], other, TEXT_MASK, centre=centre)
  np.testing.assert_array_equal(out['mask_features'], out2['mask_features'])
  np.testing.assert_array_equal(out['mask_logits'], out2['mask_logits'])
  assert np.max(np.abs(out['heatmap'] - out2['heatmap'])) > 1e-4


def test_adam_steps_reduce_full_supervision_loss(setup):
  model, variables, apply, batch = setup
  centre = batch['clicks'][:, 0]

  def loss_fn(params, rng):
    out = model.apply({**variables, 'params': params}, batch['image'],
                      TOKENS, TEXT_MASK, train=True, centre=centre,
                      rngs={'dropout': rng})
    return _full_loss(out, batch)

  optimizer = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  def eval_loss(params):
    out = apply({**variables, 'params': params}, batch['image'], TOKENS,
                TEXT_MASK, centre=centre)
    return float(_full_loss(out, batch))

  params = variables['params']
  opt_state = optimizer.init(params)
  before = eval_loss(params)
  for rng in jax.random.split(jax.random.key(1), 25):
    params, opt_state, _ = step(params, opt_state, rng)
  assert eval_loss(params) < 0.7 * before


def test_centre_snaps_to_its_cell(setup):
  """Any point of a cell selects that cell's kernel and coordinates."""
  _, variables, apply, batch = setup
  run = lambda c: apply(variables, batch['image'], TOKENS, TEXT_MASK,
                        centre=jnp.asarray(c, jnp.float32))
  # Cells are 1/8 wide: (0.26, 0.3) and (0.37, 0.255) share cell (2, 2).
  a, b = run([[0.26, 0.3]] * 2), run([[0.37, 0.255]] * 2)
  np.testing.assert_allclose(a['centre'], [[0.3125, 0.3125]] * 2)
  np.testing.assert_array_equal(a['mask_logits'], b['mask_logits'])


def test_stride4_masks_and_bad_stride(tiny_model):
  model = small_pks(tiny_model, mask_stride=4)
  batch = _batch()
  out, _ = jax.jit(lambda key, images, centre: model.init_with_output(
      key, images, TOKENS, TEXT_MASK, train=False, centre=centre))(
          jax.random.key(0), batch['image'], batch['clicks'][:, 0])
  assert out['mask_logits'].shape == (2, SIZE // 4, SIZE // 4)
  assert out['heatmap'].shape == (2, GRID, GRID)
  # The stride-4 full-supervision targets are pooled to that grid.
  assert np.isfinite(_full_loss(out, batch))
  with pytest.raises(ValueError, match='mask_stride must be 4 or 8, not 2'):
    small_pks(tiny_model, mask_stride=2)


@pytest.mark.parametrize('layers', [0, 1])
def test_spatial_context_lets_far_cells_interact(layers):
  """With a layer, changing one corner cell changes the opposite corner."""
  context = pks.SpatialContext(layers)
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
  params = context.init(jax.random.key(1), x)
  y = context.apply(params, x)
  y2 = context.apply(params, x.at[0, 0, 0].multiply(-3.0))
  far_change = float(jnp.abs(y2[0, 3, 3] - y[0, 3, 3]).max())
  assert (far_change > 1e-3) == (layers > 0)


def test_grouped_batch_equals_repeated_images(setup):
  # Two expressions per image, image-major: images [1] and texts [2] give
  # what images [2] (the same image twice) and the same texts give.
  _, variables, apply, batch = setup
  centre = batch['clicks'][:, 0]
  single = batch['image'][:1]
  grouped = apply(variables, single, TOKENS, TEXT_MASK, centre=centre)
  repeated = apply(variables, np.repeat(single, 2, axis=0), TOKENS, TEXT_MASK,
                   centre=centre)
  for key in repeated:
    np.testing.assert_allclose(grouped[key], repeated[key], atol=1e-5,
                               err_msg=key)
  with pytest.raises(ValueError, match='2 expressions cannot be split'):
    apply(variables, batch['image'][:1].repeat(3, axis=0), TOKENS, TEXT_MASK)


def test_scale_gradient_scales_only_the_gradient():
  f = lambda x: jnp.sum(pks.scale_gradient(x, 0.1) ** 2)
  x = jnp.array([1.0, -2.0])
  np.testing.assert_allclose(f(x), 5.0)
  np.testing.assert_allclose(jax.grad(f)(x), 0.1 * 2 * x, rtol=1e-6)
  assert pks.scale_gradient(x, 1.0) is x
