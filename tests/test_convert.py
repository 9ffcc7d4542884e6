"""Pretrained checkpoints: conversion, and parity with the PyTorch references.

The references are Hugging Face `BertModel`, `ViTModel` and `ResNetModel` on
CPU (torch comes with the `test` extra), with random weights built from
configs: nothing is downloaded. timm and torchvision cannot be installed
without GPU packages, so their checkpoints are made by renaming HF state
dicts to their names (`timm_names`, `torchvision_names`: the mappings,
written independently of the converter's rules) and must reproduce the HF
outputs. Run with `-s` to see the measured differences.
"""

import argparse
import functools
import math
import os
import pathlib
import re

import jax
import numpy as np
import pytest
import safetensors.numpy

from refseg_jax import config_lib
from refseg_jax import predict
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train_state
from refseg_jax import trained
from refseg_jax.data import pipeline
from refseg_jax.models import bert
from refseg_jax.models import convert
from refseg_jax.models import resnet
from refseg_jax.models import vit

torch = pytest.importorskip('torch', reason='PyTorch is in the test extra.')
transformers = pytest.importorskip('transformers')

REPO = pathlib.Path(__file__).parents[1]
OFFICIAL_LAYERS = config_lib.import_sibling(str(REPO / 'configs' / 'text.py'),
                                            'text').OFFICIAL_LAYERS
VOCAB = 43  # ref_shapes' vocabulary.
TOKENS = np.array([[1, 7, 12, 30, 2, 0, 0], [1, 40, 2, 0, 0, 0, 0]], np.int32)
MASK = (np.arange(7)[None] < np.array([[5], [3]])).astype(np.int32)
# HF configs of the flax presets: bert 'tiny', vit 'tiny' (timm's LayerNorm
# epsilon; HF ViT's default is 1e-12), resnet 'tiny' and 'resnet50'.
BERT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128)
VIT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=256, patch_size=8, image_size=32,
                layer_norm_eps=1e-6)
RESNET_TINY = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                   depths=[1, 1, 1, 1], layer_type='basic')
RESNET_50 = dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048],
                 depths=[3, 4, 6, 3], layer_type='bottleneck')


# --- helpers -----------------------------------------------------------------


def random_model(model_cls, config, seed=0, **kwargs):
  """`model_cls(config, **kwargs)` in eval mode, every float tensor random.

  Weights ~ N(0, 1 / fan_in) (attention far from uniform, so a q/k mix-up
  shows), norm scales 1 + N(0, 0.2), biases and BN means N(0, 0.2), BN
  variances in [0.5, 1.5]: no tensor keeps a trivial value. HF's own
  initialisation is skipped (every tensor is redrawn anyway; it takes
  seconds for BERT-base).
  """
  with transformers.initialization.no_init_weights():
    model = model_cls(config, **kwargs)
  rng = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=rng)
      if tensor.ndim > 1:
        fan_in = math.prod(tensor.shape[1:]) if tensor.ndim == 4 else (
            tensor.shape[-1])
        tensor.copy_(noise / math.sqrt(fan_in))
      elif name.endswith('running_var'):
        tensor.copy_(0.5 + torch.rand(tensor.shape, generator=rng))
      elif name.endswith('weight'):
        tensor.copy_(1 + 0.2 * noise)
      else:
        tensor.copy_(0.2 * noise)
  return model.eval()


def saved(model, directory) -> str:
  """`model.save_pretrained(directory)`: the files a hub download holds."""
  model.save_pretrained(directory)
  return str(directory)


def shapes(module, *inputs):
  """The flax variables' shapes: the conversion target."""
  return jax.eval_shape(functools.partial(module.init, train=False),
                        jax.random.key(0), *inputs)


def check(name, ours, reference, atol=None, relative=None):
  """Asserts max|ours - reference| <= atol, or <= relative * max|reference|,
  and prints both numbers."""
  reference = np.asarray(reference, np.float64)
  diff = float(np.abs(np.asarray(ours, np.float64) - reference).max())
  largest = float(np.abs(reference).max())
  print(f'\n{name}: max |diff| {diff:.2e} (max |output| {largest:.2e})')
  assert diff <= (atol if atol is not None else relative * largest), name


def bert_outputs(hf_model, flax_model, variables):
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(TOKENS),
                   attention_mask=torch.tensor(MASK))
  ours = jax.jit(functools.partial(flax_model.apply, train=False))(
      variables, TOKENS, MASK)
  return ours, ref


def vit_outputs(hf_model, flax_model, variables, size, seed=0):
  images = np.random.default_rng(seed).standard_normal(
      (1, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf_model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
  ours = jax.jit(functools.partial(flax_model.apply, train=False))(
      variables, images)
  return ours, ref.last_hidden_state.numpy()


def resnet_outputs(hf_model, flax_model, variables, size):
  """Our four stage outputs and HF's hidden states 1-4, both NHWC."""
  images = np.random.default_rng(0).standard_normal(
      (1, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf_model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                   output_hidden_states=True).hidden_states[1:]
  ours = jax.jit(functools.partial(flax_model.apply, train=False))(
      variables, images)
  return ours, [h.numpy().transpose(0, 2, 3, 1) for h in ref]


def timm_names(hf_state):
  """An HF `ViTModel` state dict as timm's `VisionTransformer` names it."""
  top = {'embeddings.cls_token': 'cls_token',
         'embeddings.position_embeddings': 'pos_embed',
         'embeddings.patch_embeddings.projection': 'patch_embed.proj',
         'layernorm': 'norm', 'pooler.dense': 'head'}
  block = {'attention.output.dense': 'attn.proj', 'layernorm_before': 'norm1',
           'layernorm_after': 'norm2', 'intermediate.dense': 'mlp.fc1',
           'output.dense': 'mlp.fc2'}
  timm = {}
  for key, value in hf_state.items():
    layer = re.fullmatch(r'encoder\.layer\.(\d+)\.(.+)\.(weight|bias)', key)
    if layer is None:
      module, _, leaf = key.rpartition('.')
      name = top[key] if key in top else f'{top[module]}.{leaf}'
    elif layer[2].startswith('attention.attention.'):
      continue  # q, k, v: fused below.
    else:
      name = f'blocks.{layer[1]}.{block[layer[2]]}.{layer[3]}'
    timm[name] = value
  for key in [k for k in hf_state if '.attention.attention.query.' in k]:
    i, leaf = re.search(r'layer\.(\d+)\..*\.(weight|bias)', key).groups()
    timm[f'blocks.{i}.attn.qkv.{leaf}'] = np.concatenate(
        [hf_state[key.replace('query', part)]
         for part in ('query', 'key', 'value')])
  return timm


def torchvision_names(hf_state):
  """An HF `ResNetModel` state dict as torchvision's `ResNet` names it."""
  stem = {'embedder.embedder.convolution': 'conv1',
          'embedder.embedder.normalization': 'bn1'}
  out = {}
  for key, value in hf_state.items():
    module, _, leaf = key.rpartition('.')
    if module in stem:
      out[f'{stem[module]}.{leaf}'] = value
      continue
    # encoder.stages.S.layers.I.{shortcut,layer.K}.{convolution,normalization}
    parts = module.split('.')
    block = f'layer{int(parts[2]) + 1}.{parts[4]}'
    if parts[5] == 'shortcut':
      index = {'convolution': 0, 'normalization': 1}[parts[6]]
      out[f'{block}.downsample.{index}.{leaf}'] = value
    else:
      kind = {'convolution': 'conv', 'normalization': 'bn'}[parts[7]]
      out[f'{block}.{kind}{int(parts[6]) + 1}.{leaf}'] = value
  return out


def at_path(tree, path):
  for key in path.split('/'):
    tree = tree[key]
  return np.asarray(tree)


# --- parity, tiny configs: <= 1e-5 -------------------------------------------


# Unrolled blocks, and blocks as one rematerialised scan (stacked weights).
LAYOUTS = [dict(), dict(scan_layers=True, remat='nothing_saveable')]


@pytest.mark.parametrize('layout', LAYOUTS, ids=['unrolled', 'scanned'])
def test_bert_tiny_matches_hf_bert_model(layout, tmp_path):
  hf = random_model(transformers.BertModel,
                    transformers.BertConfig(vocab_size=VOCAB, **BERT_TINY))
  model = bert.BertEncoder(bert.preset('tiny', VOCAB), **layout)
  converted = convert.load(saved(hf, tmp_path),
                           shapes(model, TOKENS, MASK))
  assert converted.unused == converted.missing == []
  ours, ref = bert_outputs(hf, model, converted.variables)
  check('BERT tiny hidden', ours['hidden'], ref.last_hidden_state, atol=1e-5)
  check('BERT tiny pooled', ours['pooled'], ref.pooler_output, atol=1e-5)


def test_bert_task_model_bin_reports_unused_and_missing(tmp_path):
  # A pickled BertFor* checkpoint as old hub files are: `bert.` prefix,
  # LayerNorm gamma/beta, a position_ids buffer, a head; and no pooler.
  hf = random_model(transformers.BertModel,
                    transformers.BertConfig(vocab_size=VOCAB, **BERT_TINY))
  old_name = lambda key: 'bert.' + key.replace(
      'LayerNorm.weight', 'LayerNorm.gamma').replace(
          'LayerNorm.bias', 'LayerNorm.beta')
  state = {old_name(k): v for k, v in hf.state_dict().items()
           if not k.startswith('pooler.')}
  assert 'bert.embeddings.LayerNorm.gamma' in state
  state['bert.embeddings.position_ids'] = torch.arange(512)[None]
  state['cls.predictions.bias'] = torch.zeros(VOCAB)
  torch.save(state, tmp_path / 'pytorch_model.bin')
  model = bert.BertEncoder(bert.preset('tiny', VOCAB))
  target = shapes(model, TOKENS, MASK)
  converted = convert.load(str(tmp_path), target)
  assert converted.unused == ['cls.predictions.bias']
  assert converted.missing == ['params/pooler/dense/bias',
                               'params/pooler/dense/kernel']
  # The pooler (which the hidden states do not depend on) as zeros.
  converted.variables['params']['pooler'] = jax.tree.map(
      lambda x: np.zeros(x.shape, x.dtype), target['params']['pooler'])
  ours, ref = bert_outputs(hf, model, converted.variables)
  check('BERT tiny (.bin) hidden', ours['hidden'], ref.last_hidden_state,
        atol=1e-5)


@pytest.fixture(scope='module')
def hf_vit_tiny():
  return random_model(transformers.ViTModel,
                      transformers.ViTConfig(**VIT_TINY))


@pytest.mark.parametrize('layout', LAYOUTS, ids=['unrolled', 'scanned'])
def test_vit_tiny_matches_hf_vit_model(layout, hf_vit_tiny, tmp_path):
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=32, **layout)
  converted = convert.load(saved(hf_vit_tiny, tmp_path),
                           shapes(model, np.zeros((1, 32, 32, 3))))
  assert converted.unused == ['pooler.dense.bias', 'pooler.dense.weight']
  assert converted.missing == []
  # Same image size: the position embeddings are copied as they are.
  np.testing.assert_array_equal(
      converted.variables['params']['pos_embed'],
      hf_vit_tiny.embeddings.position_embeddings.detach().numpy())
  ours, ref = vit_outputs(hf_vit_tiny, model, converted.variables, 32)
  check('ViT tiny tokens', ours['tokens'], ref[:, 1:], atol=1e-5)
  check('ViT tiny CLS', ours['cls'], ref[:, 0], atol=1e-5)


def test_vit_timm_names_match_hf_vit_model(hf_vit_tiny, tmp_path):
  hf_state = convert.read_state_dict(saved(hf_vit_tiny, tmp_path / 'hf'))
  path = str(tmp_path / 'vit_tiny_patch8_32.safetensors')
  safetensors.numpy.save_file(timm_names(hf_state), path)
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=32)
  converted = convert.load(path, shapes(model, np.zeros((1, 32, 32, 3))))
  assert converted.unused == ['head.bias', 'head.weight']
  ours, ref = vit_outputs(hf_vit_tiny, model, converted.variables, 32)
  check('ViT tiny (timm names) tokens', ours['tokens'], ref[:, 1:], atol=1e-5)


def test_vit_position_embeddings_resized_for_another_image_size(
    hf_vit_tiny, tmp_path):
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=64)  # 8 x 8, not 4 x 4.
  converted = convert.load(saved(hf_vit_tiny, tmp_path),
                           shapes(model, np.zeros((1, 64, 64, 3))))
  original = hf_vit_tiny.embeddings.position_embeddings.detach().numpy()
  resized = converted.variables['params']['pos_embed']
  assert resized.shape == (1, 1 + 8 * 8, 64)
  np.testing.assert_array_equal(resized[:, 0], original[:, 0])  # Class token.
  # Bilinear with aligned corners: the grid's corners stay where they were.
  old = original[0, 1:].reshape(4, 4, 64)
  new = resized[0, 1:].reshape(8, 8, 64)
  np.testing.assert_allclose(new[::7, ::7], old[::3, ::3], atol=1e-6)
  # The model runs at 64 px from the converted weights.
  ours = model.apply(converted.variables, np.zeros((1, 64, 64, 3)),
                     train=False)
  assert ours['grid'].shape == (1, 8, 8, 64)


# Two or three blocks in stages 1 and 4: identity shortcuts after projected
# ones (scanned: blocks 1 and 2 of stage 1 stacked, block 0 apart).
_BOTTLENECK = dict(block='bottleneck', stage_sizes=(3, 1, 1, 2),
                   widths=(8, 16, 32, 64))
_HF_BOTTLENECK = dict(embedding_size=8, hidden_sizes=[32, 64, 128, 256],
                      depths=[3, 1, 1, 2], layer_type='bottleneck')


@pytest.mark.parametrize('preset,hf_config,layout', [
    (resnet.PRESETS['tiny'], RESNET_TINY, LAYOUTS[0]),
    (_BOTTLENECK, _HF_BOTTLENECK, LAYOUTS[0]),
    (_BOTTLENECK, _HF_BOTTLENECK, LAYOUTS[1]),
], ids=['basic', 'bottleneck', 'bottleneck_scanned'])
def test_resnet_tiny_matches_hf_and_torchvision_names(preset, hf_config,
                                                      layout, tmp_path):
  hf = random_model(transformers.ResNetModel,
                    transformers.ResNetConfig(**hf_config))
  model = resnet.ResNet(**preset, **layout)
  target = shapes(model, np.zeros((1, 64, 64, 3)))
  from_hf = convert.load(saved(hf, tmp_path / 'hf'), target)
  assert from_hf.unused == from_hf.missing == []
  # torchvision names, pickled, with the classifier torchvision has.
  tv_state = torchvision_names(convert.read_state_dict(str(tmp_path / 'hf')))
  tv_state.update({'fc.weight': np.zeros((10, 128), np.float32),
                   'fc.bias': np.zeros(10, np.float32)})
  torch.save({k: torch.tensor(v) for k, v in tv_state.items()},
             tmp_path / 'resnet.pth')
  from_tv = convert.load(str(tmp_path / 'resnet.pth'), target)
  assert from_tv.unused == ['fc.bias', 'fc.weight']
  jax.tree.map(np.testing.assert_array_equal, from_tv.variables,
               from_hf.variables)
  assert set(from_hf.variables) == {'params', 'batch_stats'}
  ours, ref = resnet_outputs(hf, model, from_hf.variables, 64)
  for stage, expected in enumerate(ref, 1):
    check(f'ResNet tiny {preset["block"]} stage{stage}', ours[f'stage{stage}'],
          expected, atol=1e-5)


# --- parity, full-size configs: <= 1e-4 x max|output| ------------------------


def test_bert_base_matches_hf():
  hf = random_model(transformers.BertModel, transformers.BertConfig())
  model = bert.BertEncoder(bert.preset('base'))
  # From memory (BERT's names there are the file's): 440 MB less disk
  # traffic; reading files is tested above.
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  converted = convert.convert(state, shapes(model, TOKENS, MASK))
  ours, ref = bert_outputs(hf, model, converted.variables)
  check('BERT-base hidden', ours['hidden'], ref.last_hidden_state,
        relative=1e-4)
  check('BERT-base pooled', ours['pooled'], ref.pooler_output, relative=1e-4)


def test_vit_s16_384_matches_hf(tmp_path):
  hf = random_model(transformers.ViTModel, transformers.ViTConfig(
      hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
      intermediate_size=1536, patch_size=16, image_size=384,
      layer_norm_eps=1e-6), add_pooling_layer=False)
  model = vit.ViT(**vit.PRESETS['s16'], image_size=384)
  converted = convert.load(saved(hf, tmp_path),
                           shapes(model, np.zeros((1, 384, 384, 3))))
  ours, ref = vit_outputs(hf, model, converted.variables, 384)
  check('ViT-S/16@384 tokens', ours['tokens'], ref[:, 1:], relative=1e-4)
  check('ViT-S/16@384 CLS', ours['cls'], ref[:, 0], relative=1e-4)


def test_resnet50_matches_hf(tmp_path):
  hf = random_model(transformers.ResNetModel,
                    transformers.ResNetConfig(**RESNET_50))
  model = resnet.ResNet(**resnet.PRESETS['resnet50'])
  converted = convert.load(saved(hf, tmp_path),
                           shapes(model, np.zeros((1, 224, 224, 3))))
  ours, ref = resnet_outputs(hf, model, converted.variables, 224)
  for stage, expected in enumerate(ref, 1):
    check(f'ResNet-50 stage{stage}', ours[f'stage{stage}'], expected,
          relative=1e-4)


# --- errors ------------------------------------------------------------------


def test_shape_mismatch_names_first_tensor_and_both_shapes(tmp_path):
  hf = transformers.BertModel(transformers.BertConfig(**BERT_TINY))  # 30522.
  target = shapes(bert.BertEncoder(bert.preset('tiny', VOCAB)), TOKENS, MASK)
  with pytest.raises(ValueError) as error:
    convert.load(saved(hf, tmp_path / 'bert'), target)
  message = str(error.value)
  for part in ('embeddings.word_embeddings.weight',
               'params/embeddings/word_embeddings/embedding',
               '(30522, 64)', '(43, 64)'):
    assert part in message
  # A checkpoint of another architecture fits nothing.
  vit_target = shapes(vit.ViT(**vit.PRESETS['tiny'], image_size=32),
                      np.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='is it a vit checkpoint'):
    convert.load(str(tmp_path / 'bert'), vit_target)


class _Exploit:
  """Pickles as a call of os.mkdir(path)."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def test_scanned_blocks_missing_from_a_checkpoint_are_named(hf_vit_tiny,
                                                           tmp_path):
  hf_state = convert.read_state_dict(saved(hf_vit_tiny, tmp_path))
  without_block_0 = {key: value for key, value in hf_state.items()
                     if '.layer.0.' not in key}
  assert len(without_block_0) < len(hf_state)
  model = vit.ViT(**vit.PRESETS['tiny'], image_size=32, scan_layers=True)
  # Which tensor is named first follows the checkpoint file's order; any
  # of them must show one stacked block where the model wants two.
  with pytest.raises(ValueError, match=r"'encoder\.layer\.1\.[^']*' "
                     r'\(-> params/blocks/.*has shape \(1, ([\d, ]+)\).*'
                     r'wants \(2, \1\)'):
    convert.convert(without_block_0, shapes(model, np.zeros((1, 32, 32, 3))))


def test_pickled_checkpoint_cannot_run_code(tmp_path):
  marker = tmp_path / 'pwned'
  torch.save({'weight': _Exploit(str(marker))}, tmp_path / 'evil.bin')
  with pytest.raises(Exception, match='[Ww]eights only'):
    convert.read_state_dict(str(tmp_path / 'evil.bin'))
  assert not marker.exists()


# --- training from converted weights -----------------------------------------


def test_train_state_starts_from_converted_weights(tmp_path):
  # A BERT directory as the hub has it (weights + tokenizer), and a ResNet.
  bert_dir = tmp_path / 'bert'
  pipeline.load_tokenizer(None, 'ref_shapes').save_pretrained(bert_dir)
  hf_bert = random_model(
      transformers.BertModel,
      transformers.BertConfig(vocab_size=VOCAB, **BERT_TINY), seed=1)
  hf_resnet = random_model(transformers.ResNetModel,
                           transformers.ResNetConfig(**RESNET_TINY), seed=2)
  config = config_lib.load(f'{REPO}/configs/full.py:data=ref_shapes_tiny')
  config.data.tokenizer = config.model_init.text = saved(hf_bert, bert_dir)
  config.model_init.backbone = saved(hf_resnet, tmp_path / 'resnet')
  # Convert once (what the command line does); train from the orbax copy of
  # the backbone and straight from the HF directory for the text.
  written = convert.convert_config(config, str(tmp_path / 'converted'))
  config.model_init.backbone = written['backbone']
  config.ema_decay = 0.99

  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  task = tasks.build(config, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  state, _ = train_state.create(config, task, mesh)
  params = jax.device_get(state.params)
  batch_stats = jax.device_get(state.batch_stats)
  # The params' average starts from the same, converted weights.
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(state.ema_params), params)

  bert_state = hf_bert.state_dict()
  np.testing.assert_array_equal(
      at_path(params, 'text/encoder/layer_1/attention/self/query/kernel'),
      bert_state['encoder.layer.1.attention.self.query.weight'].numpy().T)
  resnet_state = hf_resnet.state_dict()
  np.testing.assert_array_equal(
      at_path(params, 'backbone/layer2_0/conv1/kernel'),
      resnet_state['encoder.stages.1.layers.0.layer.0.convolution.weight']
      .numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      at_path(batch_stats, 'backbone/bn1/var'),
      resnet_state['embedder.embedder.normalization.running_var'].numpy())
  # Every converted variable, exactly.
  for name in ('backbone', 'text'):
    converted = convert.load(config.model_init[name],
                             {'params': params[name],
                              'batch_stats': batch_stats.get(name, {})})
    assert converted.missing == []
    for path, value in jax.tree_util.tree_leaves_with_path(
        converted.variables):
      collection, *rest = (k.key for k in path)
      tree = params if collection == 'params' else batch_stats
      np.testing.assert_array_equal(at_path(tree, '/'.join([name, *rest])),
                                    value)

  # A workdir of the whole model with these weights (`convert --workdir`):
  # what evaluation and prediction load is the train state's start, the
  # converted modules and the seed's initialisation of the rest.
  convert.write_workdir(config, written, str(tmp_path / 'workdir'))
  loaded = trained.load(str(tmp_path / 'workdir'),
                        mesh=sharding.make_mesh([('data', 1)],
                                                jax.devices()[:1]))
  assert (loaded.checkpoint, loaded.step) == ('best', 0)
  assert loaded.config.model_init.to_dict() == written
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(loaded.variables),
               {'params': params, 'batch_stats': batch_stats})
  (prediction,) = predict.Predictor(loaded)(
      np.zeros((20, 36, 3), np.uint8), 'the big red circle')
  assert prediction.mask.shape == (20, 36)


# --- the official Shatter and Gather checkpoint ------------------------------

# The official SaG (kdwonn/SaG) names of SaG's own layers -> ours, written
# from its state dict; `AGG_BLOCK` entries repeat for every aggregation
# block (weight-shared).
AGG = 'encoders.img_enc.set_pred_module.agg.'
OFFICIAL_HEAD = {
    'encoders.img_enc.spm_1x1': 'visual_projection',
    'encoders.txt_enc.linear': 'text_projection',
    'encoders.img_enc.set_pred_module.residual_norm': 'entities/norm_output',
    AGG + 'last_layer.1': 'entities/output',
    **{f'cma.attn.fn.to_{a}': f'fusion/{b}' for a, b in
       (('q', 'query'), ('k', 'key'), ('v', 'value'))},
    'cma.attn.fn.to_out.0': 'fusion/output',
    'cma.attn.norm': 'fusion/norm_text',
    'cma.attn.norm_context': 'fusion/norm_slots',
    'cma.ff.fn.net.0': 'fusion/mlp/fc1', 'cma.ff.fn.net.3': 'fusion/mlp/fc2',
    'cma.ff.norm': 'fusion/norm_mlp',
    **{f'decoder.mlp.{2 * i}': f'decoder/layer_{i}' for i in range(4)},
}
AGG_BLOCK = {
    **{f'0.fn.to_{a}': f'aggregation/{b}' for a, b in
       (('q', 'query'), ('k', 'key'), ('v', 'value'))},
    '0.fn.to_out.0': 'aggregation/output', '0.norm': 'aggregation/norm_slots',
    '0.norm_context': 'norm_inputs', '2.fn.net.0': 'aggregation/mlp/fc1',
    '2.fn.net.3': 'aggregation/mlp/fc2', '2.norm': 'aggregation/norm_mlp',
    **{f'4.0.0.fn.to_{a}': f'interaction/{b}' for a, b in
       (('q', 'query'), ('k', 'key'), ('v', 'value'))},
    '4.0.0.fn.to_out.0': 'interaction/output',
    '4.0.0.norm': 'interaction/norm_attention',
    '4.0.2.fn.net.0': 'interaction/mlp/fc1',
    '4.0.2.fn.net.3': 'interaction/mlp/fc2',
    '4.0.2.norm': 'interaction/norm_mlp',
}


def official_sag_state(params, iterations, rng):
  """The official state dict of SaG's own layers holding our `params`,
  plus the decoder's row / column embeddings and the two layers the
  official forward never reads (random)."""
  modules = {**OFFICIAL_HEAD, **{
      f'{AGG}agg_blocks.{b}.{name}': f'entities/{path}'
      for b in range(iterations) for name, path in AGG_BLOCK.items()}}
  state = {}
  for official, ours in modules.items():
    module = functools.reduce(lambda tree, key: tree[key], ours.split('/'),
                              params)
    for leaf, value in module.items():
      value = np.asarray(value)
      state[f'{official}.{"bias" if leaf == "bias" else "weight"}'] = (
          value.T if leaf == 'kernel' else value)
  state[AGG + 'queries.slots_mu'] = np.asarray(params['entities']['mean'])[None]
  state[AGG + 'queries.slots_log_sigma'] = np.asarray(
      params['entities']['log_var'])[None]
  dim = params['decoder']['position'].shape[-1]
  for name in ('row_embed', 'col_embed'):
    state[f'decoder.pos_emb.{name}.weight'] = rng.standard_normal(
        (50, dim // 2)).astype(np.float32)
  for name in ('residual_fc', 'set_pred_module.fc'):
    state[f'encoders.img_enc.{name}.weight'] = rng.standard_normal(
        (dim, 8)).astype(np.float32)
  return state


@pytest.fixture(scope='module')
def official_sag_model():
  """(config, its model's variable shapes, random initial variables) of a
  small text config with the official model's options."""
  config = config_lib.load(f'{REPO}/configs/text.py:data=ref_shapes_tiny')
  config.model.update(gather='fusion', reconstruct='features',
                      text_pooling='cls', iterations=2, vit_preset='tiny',
                      **OFFICIAL_LAYERS)
  task = tasks.build(config, VOCAB)
  return (config, jax.eval_shape(task.init_variables, jax.random.key(0)),
          jax.device_get(jax.jit(task.init_variables)(jax.random.key(3))))


def test_official_sag_checkpoint_becomes_a_workdir(official_sag_model,
                                                   tmp_path):
  config, _, ours = official_sag_model
  rng = np.random.default_rng(0)
  head = official_sag_state(ours['params'], 2, rng)
  # The ViT at 80 px (10 x 10 patches; ours runs 8 x 8) and a BERT, both
  # random, under the official prefixes.
  hf_vit = random_model(transformers.ViTModel, transformers.ViTConfig(
      **{**VIT_TINY, 'image_size': 80}), seed=4, add_pooling_layer=False)
  hf_bert = random_model(transformers.BertModel, transformers.BertConfig(
      vocab_size=VOCAB, **BERT_TINY), seed=5)
  # (Read back from the saved files: the names checkpoints carry.)
  vit_state = timm_names(convert.read_state_dict(saved(hf_vit,
                                                       tmp_path / 'vit')))
  bert_state = convert.read_state_dict(saved(hf_bert, tmp_path / 'bert'))
  state = {**head,
           **{f'encoders.img_enc.img_backbone.{k}': v
              for k, v in vit_state.items()},
           **{f'encoders.txt_enc.bert.{k}': v for k, v in bert_state.items()}}
  # As the official training saves it: its flags, and DataParallel names.
  checkpoint = tmp_path / 'model_best.pth.tar'
  torch.save({'args': argparse.Namespace(agg_depth=2, img_num_embeds=16),
              'epoch': 7, 'iou': 0.3,
              'model': {f'module.{k}': torch.tensor(v)
                        for k, v in state.items()}}, checkpoint)

  convert.convert_sag_official(str(checkpoint), config, str(tmp_path / 'w'))
  loaded = trained.load(str(tmp_path / 'w'), mesh=sharding.make_mesh(
      [('data', 1)], jax.devices()[:1]))
  params = jax.device_get(loaded.variables['params'])
  for name in ('visual_projection', 'entities', 'text_projection', 'fusion'):
    jax.tree.map(np.testing.assert_array_equal, params[name],
                 ours['params'][name])
  rows, cols = (head[f'decoder.pos_emb.{n}.weight'] for n in ('row_embed',
                                                              'col_embed'))
  position = params['decoder']['position'].reshape(8, 8, -1)
  np.testing.assert_array_equal(position[2, 5], np.concatenate(
      [cols[5], rows[2]]))
  np.testing.assert_array_equal(
      at_path(params, 'text/encoder/layer_1/attention/self/key/kernel'),
      bert_state['encoder.layer.1.attention.self.key.weight'].T)
  np.testing.assert_array_equal(at_path(params, 'backbone/blocks_1/attn/qkv/'
                                        'kernel'),
                                vit_state['blocks.1.attn.qkv.weight'].T)
  # Position embeddings resized as the official ViT resizes them at run
  # time: torch's bilinear interpolation, half-pixel, no antialiasing.
  grid = torch.tensor(vit_state['pos_embed'][0, 1:].reshape(1, 10, 10, -1)
                      ).permute(0, 3, 1, 2)
  expected = torch.nn.functional.interpolate(grid, size=(8, 8),
                                             mode='bilinear')
  np.testing.assert_allclose(
      at_path(params, 'backbone/pos_embed')[0, 1:],
      expected.permute(0, 2, 3, 1).reshape(64, -1).numpy(), atol=1e-6)
  (prediction,) = predict.Predictor(loaded)(
      np.zeros((20, 36, 3), np.uint8), 'the big red circle')
  assert prediction.mask.shape == (20, 36)


def test_official_sag_checkpoint_that_does_not_fit_is_named(
    official_sag_model):
  config, shapes, variables = official_sag_model
  params = variables['params']
  state = official_sag_state(params, 3, np.random.default_rng(0))
  with pytest.raises(ValueError, match='3 aggregation blocks'):
    convert.sag_official(state, config, shapes)
  state = official_sag_state(params, 2, np.random.default_rng(0))
  shifted = f'{AGG}agg_blocks.1.0.fn.to_q.weight'
  state[shifted] = state[shifted] + 1
  with pytest.raises(ValueError, match='do not share weights'):
    convert.sag_official_head(state, shapes, (8, 8))
  state = official_sag_state(params, 2, np.random.default_rng(0))
  state['cma.ff.fn.net.0.weight'] = state['cma.ff.fn.net.0.weight'][:, :3]
  with pytest.raises(ValueError, match=r"'cma\.ff\.fn\.net\.0\.weight'"):
    convert.sag_official_head(state, shapes, (8, 8))
