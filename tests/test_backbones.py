"""Tests of the ResNet and ViT backbones (CPU-sized presets)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refseg_jax.models import resnet
from refseg_jax.models import vit

# Reference counts: torchvision / timm totals minus the classifier (fc /
# head). ResNet counts conv kernels and BN scale/bias (torch's BN weight and
# bias), not the running statistics (buffers in torch, `batch_stats` here).
#   resnet18  11,689,512 - (512 * 1000 + 1000)  = 11,176,512
#   resnet34  21,797,672 - (512 * 1000 + 1000)  = 21,284,672
#   resnet50  25,557,032 - (2048 * 1000 + 1000) = 23,508,032
#   resnet101 44,549,160 - (2048 * 1000 + 1000) = 42,500,160
# ViT at 224 (patch embed + cls token + 197 positions + blocks + final norm):
#   s16: 295,296 + 384 + 75,648 + 12 * 1,774,464 + 768 = 21,665,664
#        (timm 22,050,664 - (384 * 1000 + 1000))
RESNET_PARAMS = {
  'resnet18': 11_176_512,
  'resnet34': 21_284_672,
  'resnet50': 23_508_032,
  'resnet101': 42_500_160,
}
VIT_PARAMS = {
  'ti16': 5_524_416,   # timm 5,717,416 - 193,000
  's16': 21_665_664,
  'b16': 85_798_656,   # timm 86,567,656 - 769,000
}


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _smooth_images(size: int, batch: int = 1) -> jax.Array:
  """A smooth image sampled on [-1, 1]^2 at `size` x `size` pixels."""
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size),
                       indexing='ij')
  image = np.stack([np.sin(2 * yy), np.cos(1.5 * xx), yy * xx], axis=-1)
  return jnp.asarray(np.broadcast_to(image, (batch, size, size, 3)),
                     jnp.float32)


def _random_images(shape, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _variables(model, images_shape, seed: int = 0):
  """Random variables of `model`'s structure, built without running `init`.

  Compiling the initializers (many RNG streams) takes seconds on CPU, so
  tests take the structure from abstract evaluation and fill it with numpy:
  fan-in-scaled normal weights, unit BN variances, small normal embeddings.
  """
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(images_shape),
                         train=False))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'var' in name or 'scale' in name:
      value = np.ones(leaf.shape)
    elif 'kernel' in name:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:  # biases, BN means, embeddings
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope='module')
def tiny_vit():
  """The 'tiny' ViT configured for 32x32 inputs (a 4x4 grid), and params."""
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=32)
  return model, _variables(model, (1, 32, 32, 3))


# ResNet.


@pytest.mark.parametrize('name', sorted(RESNET_PARAMS))
def test_resnet_param_count_matches_torchvision(name):
  model = resnet.ResNet(**resnet.PRESETS[name])
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert _count(variables['params']) == RESNET_PARAMS[name]


def test_resnet_tiny_stage_strides_and_batch_norm():
  model = resnet.ResNet(**resnet.PRESETS['tiny'])
  images = _random_images((2, 64, 96, 3))
  variables = _variables(model, images.shape)
  features, updates = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats']))(variables, images)
  for stage, (stride, width) in enumerate(zip((4, 8, 16, 32),
                                              (16, 32, 64, 128))):
    assert features[f'stage{stage + 1}'].shape == (
        2, 64 // stride, 96 // stride, width)
  # Training BN moves the running statistics.
  assert not np.allclose(variables['batch_stats']['bn1']['mean'],
                         updates['batch_stats']['bn1']['mean'])


def test_resnet_bf16_activations_float32_params():
  # Dtypes are fixed at trace time, so abstract evaluation suffices (bf16
  # convolutions are very slow on CPU).
  model = resnet.ResNet(**resnet.PRESETS['tiny'], dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  features, updates = jax.eval_shape(lambda v, x: model.apply(
      v, x, train=True, mutable=['batch_stats']), variables, images)
  assert all(x.dtype == jnp.bfloat16 for x in features.values())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))


def test_resnet_frozen_bn_trains_like_eval():
  model = resnet.ResNet(**resnet.PRESETS['tiny'], frozen_bn=True)
  images = _random_images((2, 32, 32, 3))
  variables = _variables(model, images.shape)
  # No `mutable`: frozen BN must not try to update its statistics.
  apply = jax.jit(lambda v, x, train: model.apply(v, x, train=train)
                  ['stage4'], static_argnums=2)
  np.testing.assert_array_equal(apply(variables, images, True),
                                apply(variables, images, False))


# ViT position-embedding interpolation.


def test_interpolate_pos_embed_identity_when_grids_match():
  pos_embed = _random_images((1, 1 + 3 * 5, 8))
  out = vit.interpolate_pos_embed(pos_embed, (3, 5), (3, 5),
                                  num_prefix_tokens=1)
  np.testing.assert_array_equal(out, pos_embed)


@pytest.mark.parametrize('old_grid,new_grid',
                         [((4, 4), (7, 5)), ((6, 9), (3, 4)), ((2, 3), (5, 2))])
def test_interpolate_pos_embed_reproduces_linear_ramp(old_grid, new_grid):
  """Embeddings linear in the (corner-aligned) grid coordinates stay so."""
  slopes_y, slopes_x, offsets = np.random.default_rng(0).normal(size=(3, 4))

  def ramp(grid):
    yy, xx = np.meshgrid(np.linspace(0, 1, grid[0]),
                         np.linspace(0, 1, grid[1]), indexing='ij')
    values = (yy[..., None] * slopes_y + xx[..., None] * slopes_x + offsets)
    return values.reshape(1, -1, 4)

  cls = np.full((1, 1, 4), 7.0)
  pos_embed = jnp.asarray(np.concatenate([cls, ramp(old_grid)], 1),
                          jnp.float32)
  out = vit.interpolate_pos_embed(pos_embed, old_grid, new_grid,
                                  num_prefix_tokens=1)
  expected = np.concatenate([cls, ramp(new_grid)], 1)
  np.testing.assert_allclose(out, expected, atol=1e-5)


# ViT model.


@pytest.mark.parametrize('name', sorted(VIT_PARAMS))
def test_vit_param_count_matches_timm(name):
  model = vit.ViT(**vit.PRESETS[name], image_size=224)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  assert _count(variables['params']) == VIT_PARAMS[name]


def test_vit_other_input_size_uses_interpolated_pos_embed(tiny_vit):
  model, variables = tiny_vit
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  native = apply(variables, _smooth_images(32))['grid']  # 4x4 grid
  resized = apply(variables, _smooth_images(48))  # 6x6 grid
  assert resized['grid'].shape == (1, 6, 6, 64)
  assert resized['tokens'].shape == (1, 36, 64)

  # Same as a model configured for 48 that holds the interpolated table.
  params = dict(variables['params'])
  params['pos_embed'] = vit.interpolate_pos_embed(
      params['pos_embed'], (4, 4), (6, 6), num_prefix_tokens=1)
  model_48 = vit.ViT(**vit.PRESETS['tiny'], image_size=48)
  reference = jax.jit(lambda v, x: model_48.apply(v, x, train=False))(
      {'params': params}, _smooth_images(48))
  np.testing.assert_allclose(reference['grid'], resized['grid'], atol=1e-5)

  # Smooth in the input size: resampled back to 4x4, the 6x6 features agree
  # with the native ones far better than the native ones with a mirror.
  back = vit.interpolate_pos_embed(
      resized['grid'].reshape(1, 36, 64), (6, 6), (4, 4)).reshape(native.shape)
  mismatch = float(jnp.abs(back - native).mean())
  spatial_spread = float(jnp.abs(native - native[:, ::-1, ::-1]).mean())
  assert mismatch < 0.2 * spatial_spread


def test_vit_bf16_activations_float32_params():
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=32, dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                       variables, images)
  assert {k: (x.shape, x.dtype) for k, x in out.items()} == {
      'tokens': ((2, 16, 64), jnp.bfloat16),
      'cls': ((2, 64), jnp.bfloat16),
      'grid': ((2, 4, 4, 64), jnp.bfloat16)}


def test_vit_drop_path_only_in_train(tiny_vit):
  _, variables = tiny_vit
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=32, drop_path_rate=0.5)
  images = _random_images((8, 32, 32, 3))
  apply = jax.jit(lambda rng, train: model.apply(
      variables, images, train=train, rngs={'dropout': rng})['tokens'],
                  static_argnums=1)
  eval_a = apply(jax.random.key(1), False)
  eval_b = apply(jax.random.key(2), False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = apply(jax.random.key(1), True)
  np.testing.assert_array_equal(train_a, apply(jax.random.key(1), True))
  assert not np.allclose(train_a, apply(jax.random.key(2), True))
  assert not np.allclose(train_a, eval_a)


def test_vit_patch_embed_is_translation_equivariant(tiny_vit):
  """Without positions, rolling the image by a patch rolls the tokens.

  The patch conv is equivariant to whole-patch shifts and the transformer is
  equivariant to token permutations, so only `pos_embed` breaks this.
  """
  model, variables = tiny_vit
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  images = _random_images((1, 32, 32, 3))
  shifted = jnp.roll(images, 8, axis=2)  # one patch to the right

  params = dict(variables['params'])
  params['pos_embed'] = jnp.zeros_like(params['pos_embed'])
  out, out_shifted = (apply({'params': params}, x) for x in (images, shifted))
  np.testing.assert_allclose(out_shifted['grid'],
                             jnp.roll(out['grid'], 1, axis=2), atol=1e-4)
  np.testing.assert_allclose(out_shifted['cls'], out['cls'], atol=1e-4)

  # The learned positions do break it (the check above is not vacuous).
  out, out_shifted = (apply(variables, x) for x in (images, shifted))
  assert not np.allclose(out_shifted['grid'],
                         jnp.roll(out['grid'], 1, axis=2), atol=1e-2)
