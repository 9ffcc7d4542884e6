"""The optimiser: schedules (the official SaG's against PyTorch's),
per-module learning rates, the weight-decay mask, one AdamW step
against PyTorch's, and the run's length in epochs
(`train.resolve_total_steps`)."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np
import optax
import pytest

from refseg_jax import config_lib
from refseg_jax import optimizer
from refseg_jax import tasks
from refseg_jax import train

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


def _official_sag_rates(total_steps: int, warmup_steps: int,
                        learning_rate: float) -> np.ndarray:
  """The learning rate of each step of the official SaG loop
  (kdwonn/SaG, train_cma_recon.py): 1-based `total_iter`, optimizer.step()
  at the current rate, then `if total_iter >= lr_warmup_iter:
  scheduler.step()` with CosineAnnealingLR(T_max=total_steps)."""
  torch = pytest.importorskip('torch')
  param = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
  opt = torch.optim.AdamW([param], lr=learning_rate)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt,
                                                         T_max=total_steps)
  rates = []
  for total_iter in range(1, total_steps + 1):
    rates.append(opt.param_groups[0]['lr'])
    opt.step()
    if total_iter >= warmup_steps:
      scheduler.step()
  return np.array(rates)


@pytest.mark.parametrize('total_steps,warmup_steps',
                         [(50, 10), (50, 0), (40, 60)])
def test_constant_then_cosine_is_the_official_sag_schedule(total_steps,
                                                           warmup_steps):
  lr = 1e-5
  official = _official_sag_rates(total_steps, warmup_steps, lr)
  kwargs = dict(learning_rate=lr, warmup_steps=warmup_steps,
                end_learning_rate_fraction=0.0,
                schedule='constant_then_cosine')
  steps = np.arange(total_steps)
  # The same rates: exactly in float64, to float32's rounding in float32
  # (near the end of a long run, cos(~pi) in float32 is off by ~1e-7 of
  # the peak, a larger fraction of the small rate there).
  with jax.enable_x64(True):
    schedule = optimizer.learning_rate_schedule(total_steps, **kwargs)
    np.testing.assert_allclose(jax.vmap(schedule)(steps), official,
                               rtol=1e-12)
  schedule = optimizer.learning_rate_schedule(total_steps, **kwargs)
  np.testing.assert_allclose(jax.vmap(schedule)(steps), official, rtol=0,
                             atol=1e-6 * lr)
  # The constant part, then a cosine over the whole run (T_max = the run,
  # not the run minus the constant part): never 0.
  warmup = max(warmup_steps, 1)
  expected = [lr if s < warmup else
              lr * 0.5 * (1 + np.cos(np.pi * (s - warmup + 1) / total_steps))
              for s in steps]
  np.testing.assert_allclose(official, expected, rtol=1e-12)
  assert official[-1] > 0


def test_schedule_options_are_checked():
  kwargs = dict(learning_rate=1e-3, warmup_steps=10,
                end_learning_rate_fraction=0.01)
  with pytest.raises(ValueError, match='end_learning_rate_fraction'):
    optimizer.learning_rate_schedule(100, schedule='constant_then_cosine',
                                     **kwargs)
  with pytest.raises(ValueError,
                     match="'linear'.*warmup_cosine, constant_then_cosine"):
    optimizer.learning_rate_schedule(100, schedule='linear', **kwargs)
  # The default is today's schedule, by name or left out.
  default = optimizer.learning_rate_schedule(100, **kwargs)
  named = optimizer.make(100, **{**FULL.optimizer.to_dict(), **kwargs,
                                 'schedule': 'warmup_cosine'}).schedule
  steps = np.arange(101)
  np.testing.assert_array_equal(jax.vmap(default)(steps),
                                jax.vmap(named)(steps))
  assert FULL.optimizer.schedule == 'warmup_cosine'
  assert not FULL.optimizer.decay_all_params


def test_decay_all_params_decays_every_parameter():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'norm': {'scale': jnp.ones(2)},
            'entities': {'mean': jnp.ones(2)}}
  assert all(jax.tree.leaves(optimizer.decay_mask(params, True)))
  assert optimizer.decay_mask(params) == {
      'dense': {'kernel': True, 'bias': False}, 'norm': {'scale': False},
      'entities': {'mean': False}}
  # In the chain: with no gradient the bias now shrinks as the kernel.
  opt_config = FULL.optimizer.copy_and_resolve_references()
  opt_config.update(warmup_steps=0, weight_decay=0.5, decay_all_params=True)
  tx = optimizer.make(10, **opt_config).tx
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_allclose(leaf, -opt_config.learning_rate * 0.5,
                               rtol=1e-5)


def test_sag_optimizer_steps_as_torch_adamw():
  """torch.optim.AdamW (the official SaG's: weight decay on every group,
  `p -= lr * wd * p` before the Adam step, per-group learning rates) and
  this chain (decay added after Adam's moments, then the multiplied rate)
  both decay the weights from before the step by the same rate: the same
  updates. Compared in float64; in float32 optax's bias correction
  1 - float32(0.999) alone is 1.3e-5 off, the update ~6.5e-6."""
  torch = pytest.importorskip('torch')
  lr, wd, clip = 1e-5, 1e-4, 0.1
  rng = np.random.default_rng(0)
  params = {'backbone': {'kernel': rng.normal(size=(3, 2))},
            'neck': {'bias': rng.normal(size=2)}}
  grads = [jax.tree.map(lambda x: rng.normal(size=x.shape), params)
           for _ in range(3)]

  kernel = torch.nn.Parameter(torch.tensor(params['backbone']['kernel']))
  bias = torch.nn.Parameter(torch.tensor(params['neck']['bias']))
  torch_opt = torch.optim.AdamW(
      [{'params': [kernel], 'lr': lr * 0.1}, {'params': [bias], 'lr': lr}],
      lr=lr, weight_decay=wd)
  torch_updates = []
  for grad in grads:
    before = kernel.detach().clone(), bias.detach().clone()
    kernel.grad = torch.tensor(grad['backbone']['kernel'])
    bias.grad = torch.tensor(grad['neck']['bias'])
    torch.nn.utils.clip_grad_norm_([kernel, bias], clip)
    torch_opt.step()
    torch_updates.append({'backbone': {'kernel': (kernel - before[0]).detach()
                                       .numpy()},
                          'neck': {'bias': (bias - before[1]).detach()
                                   .numpy()}})

  with jax.enable_x64(True):
    tx = optimizer.make(
        100, learning_rate=lr, weight_decay=wd, b1=0.9, b2=0.999,
        warmup_steps=100, end_learning_rate_fraction=0.0,
        grad_clip_norm=clip, lr_multipliers={'backbone': 0.1},
        schedule='constant_then_cosine', decay_all_params=True).tx
    state = tx.init(params)
    for step, (grad, expected) in enumerate(zip(grads, torch_updates)):
      updates, state = tx.update(grad, state, params)
      params = optax.apply_updates(params, updates)
      # After the first step, torch's clip_grad_norm_ (norm + 1e-6 in its
      # denominator) makes successive gradients differ by ~1e-6.
      jax.tree.map(functools.partial(np.testing.assert_allclose,
                                     rtol=1e-9 if step == 0 else 1e-5),
                   updates, expected)


def test_total_epochs_set_the_steps_rounding_up():
  config = ml_collections.ConfigDict(dict(
      total_steps=2_400, batch_size=32,
      total_epochs=config_dict.placeholder(float)))
  assert train.resolve_total_steps(config, 70_787) == 2_400
  config.total_epochs = 40
  # An epoch of 70,787 is ceil(70,787 / 32) = 2,213 steps (the last one
  # partial, as the official loader's): 40 x 2,213 = 88,520.
  assert train.resolve_total_steps(config, 70_787) == 88_520
  config.total_epochs = 2.5
  assert train.resolve_total_steps(config, 70_787) == 5_533  # 5,532.5 up.
  config.total_epochs = 2.0
  assert train.resolve_total_steps(config, 64) == 4      # Exact: no +1.
  config.total_epochs = 0.1
  config.batch_size = 3
  assert train.resolve_total_steps(config, 30) == 1      # Not 1.0000000002.
  config.total_epochs = 0.0
  with pytest.raises(ValueError, match='total_epochs'):
    train.resolve_total_steps(config, 30)
  # A config without the key (older code's) keeps its steps.
  assert train.resolve_total_steps(
      ml_collections.ConfigDict(dict(total_steps=7, batch_size=2)), 30) == 7
  assert FULL.total_epochs is None


def test_a_resumed_epoch_config_checks_against_its_resolved_steps():
  """The checkpoint saves the resolved total_steps; the resuming run
  resolves its own before `check_resume` (train.train_and_evaluate), so
  an unchanged config resumes, and a changed length is still refused."""
  def resolved(epochs):
    config = FULL.copy_and_resolve_references()
    config.total_epochs = epochs
    config.total_steps = train.resolve_total_steps(config, 240)
    return config
  saved = resolved(3.0).to_dict()
  assert saved['total_steps'] == 24  # 3 epochs x ceil(240 / 32) = 3 x 8.
  assert not config_lib.check_resume(saved, resolved(3.0))
  # Checked before resolving, the config's own total_steps would differ.
  unresolved = FULL.copy_and_resolve_references()
  unresolved.total_epochs = 3.0
  with pytest.raises(ValueError, match='total_steps: 24 -> 2400'):
    config_lib.check_resume(saved, unresolved)
  with pytest.raises(ValueError, match='total_epochs.*total_steps'):
    config_lib.check_resume(saved, resolved(4.0))
