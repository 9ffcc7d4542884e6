"""Rematerialisation and the chunked all-pairs fusion change no number.

`config.model.remat` wraps the repeated blocks (ViT, BERT, ResNet, SaG's
slot iterations and gathering) in `nn.remat`, and `model.fusion_chunk`
fuses SaG's T x I pairs a few expressions at a time: both trade memory
for time only. The training loss and every gradient of the tiny SaG (ViT,
BERT, slots, fusion), and the outputs, statistics and gradients of the
tiny ResNet, are compared with the plain ones (same parameters, inputs
and rngs).
"""

import pathlib

from flax import traverse_util
import jax
import numpy as np
import pytest

from refseg_jax import config_lib
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax.benchmarks import train_step as train_step_benchmark
from refseg_jax.models import convert
from refseg_jax.models import layers
from refseg_jax.models import resnet

REPO = pathlib.Path(__file__).parents[1]
VOCAB = 60
TOLERANCE = 1e-5


def _loss_and_grads(config_file: str, variables=None, **model_fields):
  """(loss, terms, gradients) of one tiny training step of `config_file`
  with `model_fields` changed (8 expressions, 2 per image, float32), at
  `variables` (None: the model's initial ones), and those variables."""
  config = config_lib.load(f'{REPO}/configs/{config_file}:data=ref_shapes_tiny')
  config.batch_size = 8
  config.data.expressions_per_image = 2
  config.model.update(model_fields)
  task = tasks.build(config, VOCAB)
  if variables is None:
    variables = jax.jit(task.init_variables)(jax.random.key(0))
  batch = train_step_benchmark.train_batch(config, task.supervision, VOCAB)
  (total, (terms, _)), grads = jax.jit(
      lambda v, b: train.loss_and_grads(task, v['params'],
                                        v.get('batch_stats', {}), b, 7)
  )(variables, batch)
  return (total, terms, grads), variables


def _scanned_layout(tree, config_file: str, **model_fields):
  """`tree` (unrolled blocks' variables) in the layout of the model with
  `model_fields`."""
  config = config_lib.load(f'{REPO}/configs/{config_file}:data=ref_shapes_tiny')
  config.model.update(model_fields)
  return _stacked_like(tree, jax.eval_shape(
      tasks.build(config, VOCAB).init_variables, jax.random.key(0)))


def _stacked_like(tree, target):
  """`tree` (unrolled blocks' variables) in the layout of `target` (a
  scanning model's variables), through the checkpoint converter's block
  stacking."""
  flat = {path: (np.asarray(x), '/'.join(path))
          for path, x in traverse_util.flatten_dict(tree).items()}
  wanted = {path: x for path, x in traverse_util.flatten_dict(target).items()
            if path[0] in tree}
  stacked = convert.stack_scanned(flat, wanted)
  assert set(stacked) == set(wanted)
  return traverse_util.unflatten_dict(
      {path: array for path, (array, _) in stacked.items()})


def _assert_same(plain, other):
  (total, terms, grads), (total_2, terms_2, grads_2) = plain, other
  np.testing.assert_allclose(total_2, total, rtol=TOLERANCE)
  for name in terms:
    np.testing.assert_allclose(terms_2[name], terms[name], rtol=TOLERANCE,
                               atol=TOLERANCE, err_msg=name)
  assert jax.tree.structure(grads_2) == jax.tree.structure(grads)
  # Relative to the largest gradient: some are 0 in exact arithmetic (a
  # bias that a softmax cancels, e.g. the slot queries'), and their float
  # rounding differs (measured: 1.2e-7 of the largest, SaG with fusion).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  for (path, g), g_2 in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(grads_2)):
    np.testing.assert_allclose(g_2 / scale, g / scale, atol=TOLERANCE,
                               err_msg=jax.tree_util.keystr(path))


def test_sag_remat_and_chunked_fusion_change_no_number():
  # The paper's gathering, the fusion layer (slot matching goes through the
  # same chunks). Dropout 0 (the tiny default): with dropout each chunk
  # draws its own masks, a different (equally valid) draw.
  plain, _ = _loss_and_grads('text.py', gather='fusion')
  assert float(plain[0]) > 0 and any(
      float(np.abs(g).max()) > 0 for g in jax.tree.leaves(plain[2]))
  _assert_same(plain, _loss_and_grads(
      'text.py', gather='fusion', remat='nothing_saveable', fusion_chunk=3)[0])


def test_scanned_blocks_compute_the_unrolled_function():
  """SaG's ViT and BERT blocks as one scan each, remat inside: at the same
  parameters, stacked, the loss and every gradient (stacked the same way)
  equal the unrolled model's."""
  config_file = 'text.py'
  (total, terms, grads), variables = _loss_and_grads(config_file)
  scanned = dict(scan_layers=True, remat='nothing_saveable')
  (total_2, terms_2, grads_2), _ = _loss_and_grads(
      config_file, _scanned_layout(variables, config_file, **scanned),
      **scanned)
  assert 'layer' in grads_2['text']['encoder']
  assert 'layer_0' not in grads_2['text']['encoder']
  _assert_same((total, terms,
                _scanned_layout({'params': grads}, config_file,
                                **scanned)['params']),
               (total_2, terms_2, grads_2))


def test_pks_scans_its_bert_layers():
  config = config_lib.load(f'{REPO}/configs/click.py:data=ref_shapes_tiny')
  config.model.scan_layers = True
  params = jax.eval_shape(tasks.build(config, VOCAB).init_variables,
                          jax.random.key(0))['params']
  layer = params['text']['encoder']
  assert list(layer) == ['layer']
  assert layer['layer']['attention']['self']['query']['kernel'].shape == (
      2, 64, 64)


@pytest.mark.parametrize('scan', [False, True], ids=['unrolled', 'scanned'])
def test_resnet_remat_changes_no_number(scan):
  """PKS's backbone (the rest of PKS is not rematerialised): batch
  statistics updated inside the remat (and the scan over each stage's
  blocks after the first), the same outputs, new statistics and
  gradients."""
  # 4 images of 64 px: stage 4's BN sees 16 values. With 2 images of 32
  # px (2 values) float32 rounding, amplified back to the stem, moved the
  # stem's gradient by 2.6e-5 of the largest between the scanned and the
  # unrolled ResNet; here by 5.6e-7.
  images = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
  # Stages of 2 and 3 blocks: a scan of 1 and of 2 blocks.
  preset = dict(block='bottleneck', stage_sizes=(3, 1, 1, 2),
                widths=(8, 16, 32, 64))
  plain_model = resnet.ResNet(**preset)
  plain_variables = jax.jit(
      lambda key: plain_model.init(key, images, train=False))(
          jax.random.key(0))

  def run(policy, scan_layers=False):
    model = resnet.ResNet(**preset, remat=policy, scan_layers=scan_layers)
    variables = plain_variables
    if scan_layers:
      variables = _stacked_like(variables, jax.eval_shape(
          lambda key: model.init(key, images, train=False), jax.random.key(0)))

    def loss(params):
      features, updates = model.apply(
          {'params': params, 'batch_stats': variables['batch_stats']},
          images, train=True, mutable=['batch_stats'])
      return sum((f ** 2).mean() for f in features.values()), updates

    gradient = jax.value_and_grad(loss, has_aux=True)
    # The blocks really are rematerialised (else equality proves nothing).
    traced = str(jax.make_jaxpr(gradient)(variables['params']))
    assert ('checkpoint' in traced or 'remat' in traced) == (policy != 'none')
    (total, updates), grads = jax.jit(gradient)(variables['params'])
    return total, updates, grads

  total, updates, grads = run('none')
  total_2, updates_2, grads_2 = run('dots_saveable', scan)
  if scan:
    assert grads_2['layer1']['conv1']['kernel'].shape[0] == 2
    updates, grads = _stacked_like(updates, updates_2), _stacked_like(
        {'params': grads}, {'params': grads_2})['params']
  np.testing.assert_allclose(total_2, total, rtol=TOLERANCE)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOLERANCE,
                                                       atol=TOLERANCE),
               updates_2, updates)
  _assert_same((total, {}, grads), (total_2, {}, grads_2))


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="'everything'.*nothing_saveable"):
    layers.remat(layers.nn.Dense, 'everything')
