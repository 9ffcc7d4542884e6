"""The optimiser: one optax chain, from `config.optimizer`.

    clip by global norm -> Adam moments -> decoupled weight decay (masked)
    -> per-module learning-rate multiplier -> - schedule(step)

which is AdamW with a learning rate of `multiplier * schedule(step)` for
each top-level module, in one optimiser state.

`config.optimizer.schedule` picks the schedule (`SCHEDULES`):

  'warmup_cosine'         linear warm-up from 0, then cosine decay to
                          `end_learning_rate_fraction` of the peak (the
                          default);
  'constant_then_cosine'  the official Shatter-and-Gather (kdwonn/SaG)
                          schedule: the peak for `warmup_steps`, then
                          PyTorch's `CosineAnnealingLR(T_max=total_steps)`
                          stepped once per step after that, so the cosine
                          spans the whole run and never reaches 0.

`config.optimizer.decay_all_params` decays every parameter, as the
official SaG's `torch.optim.AdamW` does; by default `NO_DECAY_SUFFIXES`
are left out. Decay-then-Adam (torch) and Adam-plus-decay (this chain)
both decay the weights from before the step, scaled by the same
(multiplied) learning rate, so they are the same update (in float64 to
1e-9 of torch's; its `clip_grad_norm_` adds 1e-6 to the norm, which moves
later steps by ~1e-6: tests/test_optimizer.py).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from absl import logging
import jax
import optax

# Parameters that never decay, as suffixes of their paths: biases and
# normalisation scales; position embeddings (ViT's, BERT's, SaG's slot
# decoder's); the class token; SaG's slot distributions (the Gaussians the
# initial slots are drawn from).
NO_DECAY_SUFFIXES = (
    ('bias',), ('scale',),
    ('pos_embed',), ('position_embeddings', 'embedding'),
    ('decoder', 'position'),
    ('cls_token',),
    ('entities', 'mean'), ('entities', 'log_var'),
)


# `config.optimizer.schedule`'s values (`learning_rate_schedule`).
SCHEDULES = ('warmup_cosine', 'constant_then_cosine')


class Optimizer(NamedTuple):
  """The optax transformation, and its base learning rate per step."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def learning_rate_schedule(total_steps: int, *, learning_rate: float,
                           warmup_steps: int,
                           end_learning_rate_fraction: float,
                           schedule: str = 'warmup_cosine'
                           ) -> optax.Schedule:
  """The base learning rate of each (0-based) step.

  Args:
    total_steps: the run's length.
    learning_rate: the peak.
    warmup_steps: 'warmup_cosine': steps of linear warm-up from 0 (a
      warm-up longer than half the run, e.g. a short smoke run's with the
      default warm-up, is cut to half the run). 'constant_then_cosine':
      steps at the peak before the cosine (never cut; 0 acts as 1, as in
      the official loop, whose first step always runs at the peak).
    end_learning_rate_fraction: 'warmup_cosine': the cosine's end, a
      fraction of the peak. 'constant_then_cosine' decays to 0 as the
      official SaG (`eta_min=0`) and raises a ValueError unless this is 0,
      so that a config cannot believe it set an end it does not get.
    schedule: one of `SCHEDULES` (module doc).

  Returns:
    step -> learning rate.

  Raises:
    ValueError: an unknown `schedule`, or 'constant_then_cosine' with a
      nonzero `end_learning_rate_fraction`.
  """
  if schedule == 'warmup_cosine':
    warmup = min(warmup_steps, total_steps // 2)
    if warmup < warmup_steps:
      logging.warning('Warm-up cut from %d to %d steps (half of the run).',
                      warmup_steps, warmup)
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(total_steps, 1),
        end_value=learning_rate * end_learning_rate_fraction)
  if schedule == 'constant_then_cosine':
    if end_learning_rate_fraction != 0:
      raise ValueError(
          "The 'constant_then_cosine' schedule decays to 0 (as the official "
          'SaG); set end_learning_rate_fraction to 0 (it is '
          f'{end_learning_rate_fraction}).')
    # The official loop (1-based iteration k): optimizer.step() at the
    # current rate, then `if k >= warmup: scheduler.step()`. So step s
    # (0-based, k = s + 1) runs at the cosine of max(0, s + 1 - W)
    # scheduler steps, W = max(warmup, 1) (k >= 0 and k >= 1 are the same
    # test): the peak through step W - 1, the cosine of 1 at step W. The
    # cosine of 0 is the peak, so joining at W - 1 gives both. Its length
    # is the whole run (`T_max=total_steps`), not the run minus the
    # constant part: the last step's rate is above 0.
    boundary = max(warmup_steps, 1) - 1
    return optax.join_schedules(
        [optax.constant_schedule(learning_rate),
         optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))],
        [boundary])
  raise ValueError(f'Unknown learning-rate schedule {schedule!r}; the known '
                   f'ones: {", ".join(SCHEDULES)}.')


def decays(path: tuple[Any, ...], leaf: Any) -> bool:
  """Whether the parameter at `path` (a key path) takes weight decay."""
  del leaf
  names = tuple(str(getattr(k, 'key', k)) for k in path)
  return not any(names[-len(suffix):] == suffix
                 for suffix in NO_DECAY_SUFFIXES)


def decay_mask(params: Any, decay_all_params: bool = False) -> Any:
  """A tree of bools over `params`: True where weight decay applies.

  Args:
    params: the parameters (or their shapes).
    decay_all_params: True: every parameter decays (the official SaG's
      AdamW); False: all but `NO_DECAY_SUFFIXES` (`decays`).
  """
  if decay_all_params:
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(decays, params)


def _module_labels(params: Any, multiplied: frozenset[str]) -> Any:
  """Each parameter's top-level module name if it has a multiplier."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key if path[0].key in multiplied else 'rest',
      params)


def make(total_steps: int, *, learning_rate: float, weight_decay: float,
         b1: float, b2: float, warmup_steps: int,
         end_learning_rate_fraction: float, grad_clip_norm: float,
         lr_multipliers: Mapping[str, float],
         schedule: str = 'warmup_cosine',
         decay_all_params: bool = False) -> Optimizer:
  """The optimiser of `config.optimizer` (`make(steps, **config.optimizer)`).

  Args:
    total_steps: the run's length, for the schedule.
    learning_rate: the schedule's peak.
    weight_decay: decoupled decay (AdamW's), on `decay_mask`'s parameters.
    b1, b2: Adam's moment decay rates.
    warmup_steps: linear warm-up steps ('warmup_cosine'), or steps at the
      peak ('constant_then_cosine'); `learning_rate_schedule`.
    end_learning_rate_fraction: the cosine's end, a fraction of the peak
      ('warmup_cosine' only; must be 0 for 'constant_then_cosine').
    grad_clip_norm: global gradient norm clipped to.
    lr_multipliers: {top-level module name: factor on its learning rate}.
    schedule: the learning-rate schedule, one of `SCHEDULES`.
    decay_all_params: decay every parameter, not only `decays`' ones.

  Returns:
    The optax chain (module doc) and its schedule.
  """
  rate = learning_rate_schedule(
      total_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
      end_learning_rate_fraction=end_learning_rate_fraction,
      schedule=schedule)
  multipliers = dict(lr_multipliers)
  scales = {name: optax.scale(m) for name, m in multipliers.items()}
  scales['rest'] = optax.identity()
  return Optimizer(optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.scale_by_adam(b1=b1, b2=b2),
      optax.add_decayed_weights(
          weight_decay,
          mask=lambda params: decay_mask(params, decay_all_params)),
      optax.multi_transform(scales, lambda params: _module_labels(
          params, frozenset(multipliers))),
      optax.scale_by_learning_rate(rate)), rate)
