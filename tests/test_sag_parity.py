"""Shatter and Gather against the official code, tensor by tensor.

`../shared/sag_reference/sag_official_small.npz` holds the official
state dict of SaG's own layers, the encoders' outputs, the slot noise and
every intermediate of the official forward pass and loss (its README says
how it was made). The official weights are converted with
`convert.sag_official_head`, the ViT's and BERT's outputs put in place of
our encoders with `nn.intercept_methods`, and every intermediate compared
at 1e-5 of the official tensor's largest magnitude.
"""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refseg_jax import config_lib
from refseg_jax.losses import sag as sag_losses
from refseg_jax.models import bert
from refseg_jax.models import convert
from refseg_jax.models import sag
from refseg_jax.models import vit
from refseg_jax.tasks import sag_text

REFERENCE = (pathlib.Path(__file__).parents[2] / 'shared' / 'sag_reference' /
             'sag_official_small.npz')
RELATIVE_TOLERANCE = 1e-5
OFFICIAL_LAYERS = config_lib.import_sibling(
    str(pathlib.Path(__file__).parents[1] / 'configs' / 'text.py'),
    'text').OFFICIAL_LAYERS

pytestmark = pytest.mark.skipif(
    not REFERENCE.exists(),
    reason=f'No official SaG reference tensors at {REFERENCE} (they come '
    'with ../shared beside the repository).')


def sag_fields(flags: dict) -> dict:
  """The `SaG` fields of the official flags (`train_eval_unc.sh` options)."""
  return dict(
      dim=flags['embed_dim'],
      groups=flags['img_num_embeds'] // flags['cascade_factor'],
      slots_per_group=flags['cascade_factor'], iterations=flags['agg_depth'],
      heads=flags['agg_cross_head'], head_dim=flags['agg_cross_dim'],
      interaction_heads=flags['agg_latent_head'],
      interaction_head_dim=flags['agg_latent_dim'],
      decoder_hidden=flags['embed_dim'], reconstruct='features',
      text_pooling='cls', gather='fusion', image_size=flags['crop_size'],
      **OFFICIAL_LAYERS)


@pytest.fixture(scope='module')
def official():
  with np.load(REFERENCE) as npz:
    arrays = {k: npz[k] for k in npz.files}
  flags = json.loads(bytes(arrays.pop('flags_json')))
  # The fusion layer shares the aggregation's head shape in our model.
  assert (flags['cma_heads'], flags['cma_head_dim']) == (
      flags['agg_cross_head'], flags['agg_cross_dim'])
  return flags, arrays


@pytest.fixture(scope='module')
def ours(official, tiny_model):
  """Our SaG with the official weights and encoder outputs: the training
  forward pass (all pairs), the evaluation one, and their intermediates."""
  flags, arrays = official
  tokens = arrays['input/vit_tokens']
  hidden = arrays['input/bert_hidden']
  batch, patches, _ = tokens.shape
  side = int(np.sqrt(patches))
  model = tiny_model('text.py', 100, **sag_fields(flags))
  text_tokens = np.ones(hidden.shape[:2], np.int32)
  images = np.zeros((batch, flags['crop_size'], flags['crop_size'], 3),
                    np.uint8)
  state = {k.removeprefix('param/'): v for k, v in arrays.items()
           if k.startswith('param/')}

  def encoders(next_fun, args, kwargs, context):
    """The official encoders' outputs and slot noise in place of ours."""
    if context.method_name == '__call__' and isinstance(context.module,
                                                        vit.ViT):
      return {'tokens': jnp.asarray(tokens),
              'grid': jnp.asarray(tokens).reshape(batch, side, side, -1)}
    if context.method_name == '__call__' and isinstance(context.module,
                                                        bert.BertEncoder):
      return {'hidden': jnp.asarray(hidden), 'cls': jnp.asarray(hidden[:, 0])}
    if context.method_name == 'draw_noise':
      return jnp.asarray(arrays['input/slot_noise'])
    return next_fun(*args, **kwargs)

  def apply(variables, all_pairs):
    with nn.intercept_methods(encoders):
      return model.apply(variables, images, text_tokens, text_tokens,
                         train=False, all_pairs=all_pairs,
                         rngs={'slots': jax.random.key(0)},
                         capture_intermediates=True, mutable=['intermediates'])

  with nn.intercept_methods(encoders):
    shapes = jax.eval_shape(
        lambda: model.init({'params': jax.random.key(0),
                            'slots': jax.random.key(1)}, images, text_tokens,
                           text_tokens, train=False))
  converted = convert.sag_official_head(state, shapes, (side, side))
  assert converted.missing == []
  assert converted.unused == sorted(
      k for k in state if 'residual_fc' in k or 'set_pred_module.fc.' in k)
  variables = {'params': converted.variables['params']}
  return {'train': apply(variables, True), 'eval': apply(variables, False),
          'side': side, 'flags': flags}


def assert_close(name, actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
  assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
  scale = np.abs(expected).max()
  worst = np.abs(actual - expected).max() / scale
  assert worst <= RELATIVE_TOLERANCE, f'{name}: {worst:.2e} of max |official|'


def _called(intermediates, *path):
  for name in path:
    intermediates = intermediates[name]
  return intermediates['__call__'][0]


def test_position_encoding(official):
  flags, arrays = official
  side = int(np.sqrt(arrays['output/position'].shape[0]))
  assert_close('position', sag.sine_position_encoding(
      side, side, flags['embed_dim']), arrays['output/position'])


def test_features_slots_and_slot_attention(official, ours):
  _, arrays = official
  captured = ours['eval'][1]['intermediates']
  assert_close('features', _called(captured, 'visual_projection'),
               arrays['output/features'])
  slots, attention = _called(captured, 'entities')
  assert_close('slots', slots, arrays['output/slots'])
  assert_close('slot_attention', attention, arrays['output/slot_attention'])


def test_text_fusion_and_scores(official, ours):
  _, arrays = official
  outputs, state = ours['train']
  captured = state['intermediates']
  assert_close('text', _called(captured, 'text_projection'),
               arrays['output/text'])
  z, fuse = _called(captured, 'fusion')
  assert_close('z', z, arrays['output/z'])
  assert_close('fuse', fuse, arrays['output/fuse'])
  assert_close('scores', outputs['scores'], arrays['output/scores'])
  _, own = _called(ours['eval'][1]['intermediates'], 'fusion')
  assert_close('fuse_own', own[:, 0], arrays['output/fuse_own'])


def test_mask_and_inference_map(official, ours):
  flags, arrays = official
  outputs = ours['eval'][0]
  assert_close('mask', outputs['mask'], arrays['output/mask'])
  size = flags['crop_size']
  # The official images are stretched: the image is the whole canvas.
  content = np.full((outputs['mask'].shape[0], 2), size, np.int32)
  assert_close('inference_map', sag.response_map(
      outputs['mask'], size, content) + 0.5, arrays['output/inference_map'])


def test_reconstruction_and_losses(official, ours):
  flags, arrays = official
  outputs = ours['train'][0]
  assert_close('reconstruction', outputs['reconstruction'],
               arrays['output/reconstruction'])
  assert_close('target', outputs['reconstruction_target'],
               arrays['output/target'])
  count = outputs['scores'].shape[0]
  assert_close('c3', sag_losses.c3_loss(outputs['scores'], np.arange(count)),
               arrays['output/c3'])
  # The official step is 1-based; ours counts from 0.
  total, terms = sag_text.text_supervision_loss(
      outputs, {'image_id': np.arange(count)}, flags['step'] - 1, c3=1.0,
      reconstruction=flags['recon_weight'], mask_same_image=False,
      warmup_steps=flags['lr_warmup_iter'])
  assert_close('recon_loss', terms['reconstruction'],
               arrays['output/recon_loss'])
  assert_close('total', total, arrays['output/total'])
