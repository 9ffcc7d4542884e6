"""The optimiser: schedule, per-module learning rates, the weight-decay mask."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from refseg_jax import config_lib
from refseg_jax import optimizer
from refseg_jax import tasks

REPO = pathlib.Path(__file__).parents[1]
FULL = config_lib.load(f'{REPO}/configs/full.py:data=ref_shapes_tiny')
FULL.optimizer.warmup_steps = 2


def test_schedule_warms_up_then_decays():
  opt_config = FULL.optimizer
  schedule = optimizer.learning_rate_schedule(
      100, learning_rate=opt_config.learning_rate,
      warmup_steps=opt_config.warmup_steps,
      end_learning_rate_fraction=opt_config.end_learning_rate_fraction)
  peak = opt_config.learning_rate
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(1), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(2), peak, rtol=1e-6)
  np.testing.assert_allclose(
      schedule(100), peak * opt_config.end_learning_rate_fraction,
      rtol=1e-5)
  assert schedule(50) < schedule(10)


def test_learning_rate_multipliers_scale_module_updates():
  opt_config = FULL.optimizer.copy_and_resolve_references()
  opt_config.warmup_steps = 0
  opt_config.weight_decay = 0.0
  opt_config.lr_multipliers = {'backbone': 0.0, 'text': 0.5}
  params = {'backbone': {'w': jnp.ones((2, 2))},
            'text': {'w': jnp.ones((2, 2))}, 'neck': {'w': jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda x: 0.01 * x, params)
  tx = optimizer.make(10, **opt_config).tx
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every weight by the learning rate (sign of g).
  lr = opt_config.learning_rate
  np.testing.assert_allclose(updates['backbone']['w'], 0.0)
  np.testing.assert_allclose(updates['text']['w'], -0.5 * lr, rtol=1e-4)
  np.testing.assert_allclose(updates['neck']['w'], -lr, rtol=1e-4)


def _no_decay_names(config_file: str) -> set[str]:
  """'module/leaf' of every parameter of the tiny model that does not decay
  (biases and norm scales left out of the list)."""
  config = config_lib.load(f'{REPO}/configs/{config_file}:'
                           'data=ref_shapes_tiny')
  task = tasks.build(config, 64)
  params = jax.eval_shape(task.init_variables, jax.random.key(0))['params']
  names = set()
  for path, decays in jax.tree_util.tree_leaves_with_path(
      optimizer.decay_mask(params)):
    keys = [k.key for k in path]
    if not decays and keys[-1] not in ('bias', 'scale'):
      names.add('/'.join(keys[-2:]))
  return names


def test_weight_decay_leaves_out_biases_norms_positions_cls_and_slots():
  assert _no_decay_names('full.py') == {'position_embeddings/embedding'}
  assert _no_decay_names('text.py') == {
      'backbone/cls_token', 'backbone/pos_embed',  # ViT
      'position_embeddings/embedding',             # BERT
      'decoder/position',                          # SaG's slot decoder
      'entities/mean', 'entities/log_var'}         # SaG's slot Gaussians
  config = config_lib.load(f'{REPO}/configs/text.py:data=ref_shapes_tiny')
  params = jax.eval_shape(tasks.build(config, 64).init_variables,
                          jax.random.key(0))['params']
  mask = optimizer.decay_mask(params)
  # Every vector (bias, norm scale) is left out; kernels and word
  # embeddings decay.
  for (path, leaf), decays in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree.leaves(mask)):
    if leaf.ndim < 2:
      assert not decays, jax.tree_util.keystr(path)
  assert mask['text']['embeddings']['word_embeddings']['embedding']
  assert mask['visual_projection']['kernel']


def test_decay_shrinks_only_decaying_parameters():
  opt_config = FULL.optimizer.copy_and_resolve_references()
  opt_config.update(warmup_steps=0, weight_decay=0.5)
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optimizer.make(10, **opt_config).tx
  updates, _ = tx.update(zero, tx.init(params), params)
  # No gradient: only the decay moves a weight, by lr * decay * weight.
  np.testing.assert_allclose(updates['dense']['kernel'],
                             -opt_config.learning_rate * 0.5, rtol=1e-5)
  np.testing.assert_array_equal(updates['dense']['bias'], 0.0)
