"""The optimiser: one optax chain, from `config.optimizer`.

    clip by global norm -> Adam moments -> decoupled weight decay (masked)
    -> per-module learning-rate multiplier -> - schedule(step)

which is AdamW with a learning rate of `multiplier * schedule(step)` for
each top-level module, in one optimiser state.
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


class Optimizer(NamedTuple):
  """The optax transformation, and its base learning rate per step."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def learning_rate_schedule(total_steps: int, *, learning_rate: float,
                           warmup_steps: int,
                           end_learning_rate_fraction: float
                           ) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to a fraction of the peak.

  A warm-up longer than half the run (a short smoke run with the default
  warm-up) is cut to half the run.
  """
  warmup = min(warmup_steps, total_steps // 2)
  if warmup < warmup_steps:
    logging.warning('Warm-up cut from %d to %d steps (half of the run).',
                    warmup_steps, warmup)
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup, max(total_steps, 1),
      end_value=learning_rate * end_learning_rate_fraction)


def decays(path: tuple[Any, ...], leaf: Any) -> bool:
  """Whether the parameter at `path` (a key path) takes weight decay."""
  del leaf
  names = tuple(str(getattr(k, 'key', k)) for k in path)
  return not any(names[-len(suffix):] == suffix
                 for suffix in NO_DECAY_SUFFIXES)


def decay_mask(params: Any) -> Any:
  """A tree of bools over `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(decays, params)


def _module_labels(params: Any, multiplied: frozenset[str]) -> Any:
  """Each parameter's top-level module name if it has a multiplier."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path[0].key if path[0].key in multiplied else 'rest',
      params)


def make(total_steps: int, *, learning_rate: float, weight_decay: float,
         b1: float, b2: float, warmup_steps: int,
         end_learning_rate_fraction: float, grad_clip_norm: float,
         lr_multipliers: Mapping[str, float]) -> Optimizer:
  """The optimiser of `config.optimizer` (`make(steps, **config.optimizer)`).

  Args:
    total_steps: the run's length, for the schedule.
    learning_rate: the schedule's peak.
    weight_decay: decoupled decay (AdamW's), on `decay_mask`'s parameters.
    b1, b2: Adam's moment decay rates.
    warmup_steps: linear warm-up steps.
    end_learning_rate_fraction: the cosine's end, a fraction of the peak.
    grad_clip_norm: global gradient norm clipped to.
    lr_multipliers: {top-level module name: factor on its learning rate}.

  Returns:
    The optax chain (module doc) and its schedule.
  """
  schedule = learning_rate_schedule(
      total_steps, learning_rate=learning_rate, warmup_steps=warmup_steps,
      end_learning_rate_fraction=end_learning_rate_fraction)
  multipliers = dict(lr_multipliers)
  scales = {name: optax.scale(m) for name, m in multipliers.items()}
  scales['rest'] = optax.identity()
  return Optimizer(optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.scale_by_adam(b1=b1, b2=b2),
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.multi_transform(scales, lambda params: _module_labels(
          params, frozenset(multipliers))),
      optax.scale_by_learning_rate(schedule)), schedule)
