"""PKS under mixed supervision: per example a mask, clicks, or text only.

Each training example carries what its referent is labelled with
(`batch['labelled_with']`, `refseg_jax.data.pipeline.LABEL_KINDS`, drawn
per referent from `config.data.supervision`), and gets the losses its
labels allow: the full task's (heatmap, box, Dice, BCE) where a mask is
given, the click task's (heatmap, box, BoxInst's projection and pairwise,
point, outside) where clicks are given. Each kind's terms are means over
that kind's examples of the batch, weighted by `loss.kind_weights`.

Text-only examples learn from pseudo-labels (Omni-RES style): from step
`loss.pseudo_start` x `config.total_steps` on, the params' exponential
moving average (the teacher, `config.ema_decay` > 0; no gradient reaches
it) predicts each one's centre, box and mask at inference; those whose heatmap peak is at
least `loss.pseudo_threshold` become mask examples of the teacher's
prediction (kind 'pseudo', the full task's terms). Before that step, and
at `kind_weights.pseudo` 0, text-only examples add no loss at all.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from refseg_jax.data import pipeline
from refseg_jax.tasks import base
from refseg_jax.tasks import pks_click
from refseg_jax.tasks import pks_full

MASK, CLICKS, TEXT = (pipeline.LABEL_KINDS.index(kind)
                      for kind in ('mask', 'clicks', 'text'))
# config.loss keys of each kind's loss function.
_FULL_KEYS = ('heatmap', 'box', 'dice', 'bce', 'heatmap_sigma')
_CLICK_KEYS = ('heatmap', 'box', 'projection', 'pairwise', 'point', 'outside',
               'heatmap_sigma', 'pairwise_size', 'pairwise_dilation',
               'colour_threshold', 'pairwise_warmup_steps')


class PKSMixed(pks_full.PKSFull):
  """PKS trained on a per-example mix of masks, clicks and bare text."""

  supervision = 'mixed'

  def __init__(self, config, vocab_size):
    super().__init__(config, vocab_size)
    fractions = pipeline.check_fractions(config.data.supervision)
    if (self.uses_teacher(config) and fractions['text']
        and not config.ema_decay):
      raise ValueError(
          'Text-only examples learn from the params\' moving average '
          f"(config.data.supervision.text={fractions['text']}, "
          f'config.loss.kind_weights.pseudo='
          f'{config.loss.kind_weights.pseudo}): set config.ema_decay > 0, '
          'or the pseudo weight to 0 to leave them out.')

  @staticmethod
  def uses_teacher(config) -> bool:
    """Whether text-only examples get pseudo-labels."""
    return (bool(config.loss.kind_weights.pseudo)
            and bool(pipeline.check_fractions(config.data.supervision)['text']))

  def train_inputs(self, batch):
    # The kernel is read at the given (or pseudo) centre; an example with
    # none takes the canvas' centre (it adds no loss).
    located = (batch['labelled_with'] != TEXT) | batch['pseudo']
    return {'centre': _keep(batch['clicks'][:, 0], located, 0.5)}

  def pseudo_label(self, teacher, batch, step):
    if not self.uses_teacher(self.config):
      return dict(batch, pseudo=jnp.zeros(batch['labelled_with'].shape, bool))
    # Before the start step the teacher is not run at all.
    return jax.lax.cond(
        step >= pseudo_start_step(self.config),
        lambda: teacher_labels(self, teacher, batch),
        lambda: dict(batch, pseudo=jnp.zeros(batch['labelled_with'].shape,
                                             bool)))

  def loss(self, outputs, batch, step):
    return mixed_supervision_loss(outputs, batch, step, **self.config.loss)


def pseudo_start_step(config) -> int:
  """The first step with pseudo-labels: `loss.pseudo_start` of the run."""
  return int(config.loss.pseudo_start * config.total_steps)


def teacher_labels(task: base.Task, teacher: Mapping[str, Any],
                   batch: base.Batch) -> dict[str, jax.Array]:
  """`batch` with the teacher's confident predictions as the labels of its
  text-only examples, and bool [B] 'pseudo' marking them.

  The teacher runs as at inference (kernel at its heatmap peak); its mask
  (logits > 0 on the mask grid) is repeated up to the canvas, so that the
  full task's pooling gives it back exactly.
  """
  outputs = jax.lax.stop_gradient(task.forward(
      teacher, batch, train=False, rngs=task.eval_rngs()))
  confidence = jax.nn.sigmoid(outputs['heatmap'].max(axis=(1, 2)))
  grid = outputs['mask_logits'] > 0
  pseudo = ((batch['labelled_with'] == TEXT)
            & (confidence >= task.config.loss.pseudo_threshold)
            & grid.any(axis=(1, 2)))
  side = batch['mask'].shape[-1]
  stride = side // grid.shape[-1]
  mask = jnp.repeat(jnp.repeat(grid, stride, 1), stride, 2).astype(jnp.uint8)
  box = jnp.clip(outputs['box_at_centre'], 0.0, 1.0)
  box = jnp.concatenate([jnp.minimum(box[:, :2], box[:, 2:]),
                         jnp.maximum(box[:, :2], box[:, 2:])], axis=-1)
  clicks = jnp.stack([outputs['centre'], box[:, :2], box[:, 2:]], axis=1)
  where = lambda new, old: jnp.where(
      pseudo.reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype),
      old)
  return dict(batch, mask=where(mask, batch['mask']),
              box=where(box, batch['box']),
              clicks=where(clicks, batch['clicks']), pseudo=pseudo)


def mixed_supervision_loss(
    outputs: base.Outputs, batch: base.Batch, step: jax.Array, *,
    kind_weights: Mapping[str, float], pseudo_threshold: float,
    pseudo_start: float, **weights_and_settings: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example mixed loss (module doc).

  Args:
    outputs: `PKS` outputs, run with `centre=batch['clicks'][:, 0]`.
    batch: A 'mixed' batch with 'pseudo' (`PKSMixed.pseudo_label`).
    step: The training step (the pairwise warm-up).
    kind_weights: {'mask', 'clicks', 'pseudo'}: each kind's weight.
    pseudo_threshold, pseudo_start: the teacher's settings (read by
      `PKSMixed.pseudo_label`, not here).
    **weights_and_settings: the full and click tasks' loss settings.

  Returns:
    (weighted total, {kind/term: unweighted value} and each kind's share of
    the batch, 'share/<kind>').
  """
  del pseudo_threshold, pseudo_start
  kinds = batch['labelled_with']
  examples = {'mask': kinds == MASK, 'clicks': kinds == CLICKS,
              'pseudo': batch['pseudo']}
  # Labels an example lacks are zeros from the pipeline; replacing them
  # again here keeps garbage (even NaN) out of the values and gradients.
  has_mask = examples['mask'] | examples['pseudo']
  has_position = has_mask | examples['clicks']  # (`PKSMixed.train_inputs`)
  clean = dict(batch, mask=_keep(batch['mask'], has_mask),
               clicks=_keep(batch['clicks'], has_position, 0.5),
               box=_keep(batch['box'], has_position, 0.5))
  full = {k: weights_and_settings[k] for k in _FULL_KEYS}
  click = {k: weights_and_settings[k] for k in _CLICK_KEYS}
  losses = {
      'mask': pks_full.full_supervision_loss(
          outputs, clean, weights=examples['mask'], **full),
      'clicks': pks_click.click_supervision_loss(
          outputs, clean, step, weights=examples['clicks'], **click),
      'pseudo': pks_full.full_supervision_loss(
          outputs, clean, weights=examples['pseudo'], **full),
  }
  total = sum(kind_weights[kind] * loss for kind, (loss, _) in losses.items())
  terms = {f'{kind}/{name}': value for kind, (_, kind_terms) in losses.items()
           for name, value in kind_terms.items()}
  terms.update({f'share/{kind}': flags.astype(jnp.float32).mean()
                for kind, flags in examples.items()})
  terms['share/text'] = (kinds == TEXT).astype(jnp.float32).mean()
  return total, terms


def _keep(value: jax.Array, flags: jax.Array, fill: float = 0.0) -> jax.Array:
  """`value` [B, ...] where `flags` [B], else `fill`."""
  return jnp.where(flags.reshape((-1,) + (1,) * (value.ndim - 1)), value,
                   jnp.asarray(fill, value.dtype))
