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
  `model_fields`, through the checkpoint converter's block stacking."""
  config = config_lib.load(f'{REPO}/configs/{config_file}:data=ref_shapes_tiny')
  config.model.update(model_fields)
  target = jax.eval_shape(tasks.build(config, VOCAB).init_variables,
                          jax.random.key(0))
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


def test_resnet_remat_changes_no_number():
  """PKS's backbone (the rest of PKS is not rematerialised): batch
  statistics updated inside the remat, the same outputs, new statistics
  and gradients."""
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

  def run(policy):
    model = resnet.ResNet(**resnet.PRESETS['tiny'], remat=policy)
    variables = jax.jit(lambda key: model.init(key, images, train=False))(
        jax.random.key(0))

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
  total_2, updates_2, grads_2 = run('dots_saveable')
  np.testing.assert_allclose(total_2, total, rtol=TOLERANCE)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=TOLERANCE,
                                                       atol=TOLERANCE),
               updates_2, updates)
  _assert_same((total, {}, grads), (total_2, {}, grads_2))


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="'everything'.*nothing_saveable"):
    layers.remat(layers.nn.Dense, 'everything')
