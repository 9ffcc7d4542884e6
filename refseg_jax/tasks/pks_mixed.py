"""PKS under mixed supervision: per example a mask, clicks, or text only.

Each training example carries what its referent is labelled with
(`batch['labelled_with']`, `refseg_jax.data.pipeline.LABEL_KINDS`, drawn
per referent from `config.data.supervision`), and gets the losses its
labels allow: the full task's (heatmap, box, Dice, BCE) where a mask is
given, the click task's (heatmap, box, BoxInst's projection and pairwise,
point, outside) where clicks are given. Each kind's terms are means over
that kind's examples of the batch, weighted by its share of the batch
(so that every example weighs the same) and by `loss.kind_weights`.

Text-only examples learn from pseudo-labels (Omni-RES style): from step
`loss.pseudo_start` x `config.total_steps` on, the params' exponential
moving average (the teacher, `config.ema_decay` > 0; no gradient reaches
it) predicts each one's centre, box and mask at inference; those whose
heatmap peak is at least `loss.pseudo_threshold` become mask examples of
the teacher's prediction (kind 'pseudo', the full task's terms). Before that step, and
at `kind_weights.pseudo` 0, text-only examples add no loss at all.

Clicked examples can learn from the same teacher (BoxTeacher, Cheng et al.
CVPR 2023, for boxes): with `kind_weights.click_teacher` > 0, from the same
step on, its mask with the kernel at the centre click, cut to the clicks'
box, is a Dice + BCE target weighted by its mask-aware confidence.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from refseg_jax.data import pipeline
from refseg_jax.losses import boxinst
from refseg_jax.losses import masks
from refseg_jax.losses import weighting
from refseg_jax.tasks import base
from refseg_jax.tasks import pks_click
from refseg_jax.tasks import pks_full

MASK, CLICKS, TEXT = (pipeline.LABEL_KINDS.index(kind)
                      for kind in ('mask', 'clicks', 'text'))
# config.loss keys of each kind's loss function.
_FULL_KEYS = ('heatmap', 'box', 'dice', 'bce', 'heatmap_sigma')
_CLICK_KEYS = ('heatmap', 'box', 'projection', 'pairwise', 'point', 'outside',
               'outside_margin', 'heatmap_sigma', 'pairwise_size',
               'pairwise_dilation', 'colour_threshold',
               'pairwise_warmup_steps')


class PKSMixed(pks_full.PKSFull):
  """PKS trained on a per-example mix of masks, clicks and bare text."""

  supervision = 'mixed'

  def __init__(self, config, vocab_size):
    super().__init__(config, vocab_size)
    if self.uses_teacher(config) and not config.ema_decay:
      raise ValueError(
          'The teacher is the params\' moving average (config.data.'
          f'supervision={dict(config.data.supervision)}, config.loss.'
          f'kind_weights={dict(config.loss.kind_weights)}): set '
          'config.ema_decay > 0, or the weights of pseudo and click_teacher '
          'to 0.')

  @staticmethod
  def uses_teacher(config) -> bool:
    """Whether the teacher runs: for text-only examples' pseudo-labels or
    clicked examples' masks (each needs its kind and its weight)."""
    fractions = pipeline.check_fractions(config.data.supervision)
    weights = config.loss.kind_weights
    return bool((weights.pseudo and fractions['text'])
                or (weights.click_teacher and fractions['clicks']))

  def train_inputs(self, batch):
    # The kernel is read at the given (or pseudo) centre; an example with
    # none takes the canvas' centre (it adds no loss).
    located = (batch['labelled_with'] != TEXT) | batch['pseudo']
    return {'centre': _keep(batch['clicks'][:, 0], located, 0.5)}

  def pseudo_label(self, teacher, batch, step):
    without = no_teacher_labels(batch)
    if not self.uses_teacher(self.config):
      return without
    # Before the start step the teacher is not run at all.
    return jax.lax.cond(step >= pseudo_start_step(self.config),
                        lambda: teacher_labels(self, teacher, without),
                        lambda: without)

  def loss(self, outputs, batch, step):
    return mixed_supervision_loss(outputs, batch, step, **self.config.loss)


def pseudo_start_step(config) -> int:
  """The first step the teacher runs: `loss.pseudo_start` of the run."""
  return int(config.loss.pseudo_start * config.total_steps)


def no_teacher_labels(batch: base.Batch) -> dict[str, jax.Array]:
  """`batch` with the teacher's fields empty: 'pseudo' (bool [B]),
  'teacher_mask' (float32 [B, S, S], on the canvas as 'mask') and its
  per-example weight 'teacher_weight' (float32 [B])."""
  count = batch['labelled_with'].shape[0]
  side = batch['mask'].shape[-1]
  return dict(batch, pseudo=jnp.zeros(count, bool),
              teacher_weight=jnp.zeros(count, jnp.float32),
              teacher_mask=jnp.zeros((count, side, side), jnp.float32))


def teacher_labels(task: base.Task, teacher: Mapping[str, Any],
                   batch: base.Batch) -> dict[str, jax.Array]:
  """`batch` (with `no_teacher_labels`' fields) with what the teacher adds,
  each part only when the config uses it (`kind_weights`):

  * text-only examples: its confident predictions as their labels, marked
    in 'pseudo'. It runs as at inference (kernel at its heatmap peak); its
    mask (logits > 0 on the mask grid) is repeated up to the canvas, so
    that the full task's pooling gives it back exactly.
  * clicked examples: its mask with the kernel at the centre click, cut to
    the clicks' box, as 'teacher_mask' (on the canvas, 0/1), weighted by
    its confidence (BoxTeacher's mask-aware score: the mean probability
    over the cells it calls the object; 0 when it calls none).
  """
  weights, fractions = task.config.loss.kind_weights, (
      pipeline.check_fractions(task.config.data.supervision))
  run = lambda centre: jax.lax.stop_gradient(task.model.apply(
      teacher, batch['image'], batch['text_tokens'], batch['text_mask'],
      train=False, centre=centre))
  side = batch['mask'].shape[-1]
  to_canvas = lambda grid: jnp.repeat(jnp.repeat(
      grid, side // grid.shape[1], 1), side // grid.shape[2], 2)
  batch = dict(batch)
  if weights.pseudo and fractions['text']:
    batch.update(_text_pseudo_labels(run(None), batch, to_canvas,
                                     task.config.loss.pseudo_threshold))
  if weights.click_teacher and fractions['clicks']:
    outputs = run(batch['clicks'][:, 0])
    prob = jax.nn.sigmoid(outputs['mask_logits'])
    called = (prob > 0.5) & (boxinst.box_coverage(
        batch['box'], prob.shape[1:]) >= 0.5)
    confidence = ((prob * called).sum((1, 2))
                  / jnp.maximum(called.sum((1, 2)), 1))
    clicked = batch['labelled_with'] == CLICKS
    batch.update(teacher_mask=to_canvas(called.astype(jnp.float32)),
                 teacher_weight=jnp.where(clicked, confidence, 0.0))
  return batch


def _text_pseudo_labels(outputs: base.Outputs, batch: base.Batch, to_canvas,
                        threshold: float) -> dict[str, jax.Array]:
  """The text-only examples' labels from the teacher's inference `outputs`
  (`teacher_labels`)."""
  confidence = jax.nn.sigmoid(outputs['heatmap'].max(axis=(1, 2)))
  grid = outputs['mask_logits'] > 0
  pseudo = ((batch['labelled_with'] == TEXT) & (confidence >= threshold)
            & grid.any(axis=(1, 2)))
  box = jnp.clip(outputs['box_at_centre'], 0.0, 1.0)
  box = jnp.concatenate([jnp.minimum(box[:, :2], box[:, 2:]),
                         jnp.maximum(box[:, :2], box[:, 2:])], axis=-1)
  clicks = jnp.stack([outputs['centre'], box[:, :2], box[:, 2:]], axis=1)
  where = lambda new, old: jnp.where(
      pseudo.reshape((-1,) + (1,) * (old.ndim - 1)), new.astype(old.dtype),
      old)
  return {'mask': where(to_canvas(grid), batch['mask']),
          'box': where(box, batch['box']),
          'clicks': where(clicks, batch['clicks']), 'pseudo': pseudo}


def mixed_supervision_loss(
    outputs: base.Outputs, batch: base.Batch, step: jax.Array, *,
    kind_weights: Mapping[str, float], pseudo_threshold: float,
    pseudo_start: float, **weights_and_settings: Any
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-example mixed loss (module doc).

  Args:
    outputs: `PKS` outputs, run with `centre=batch['clicks'][:, 0]`.
    batch: A 'mixed' batch with the teacher's fields
      (`PKSMixed.pseudo_label`).
    step: The training step (the pairwise warm-up).
    kind_weights: {'mask', 'clicks', 'pseudo', 'click_teacher'}: each
      kind's weight.
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
  # again here, once for every term, keeps garbage (even NaN) out of the
  # values and gradients (the loss functions only weight examples).
  has_mask = examples['mask'] | examples['pseudo']
  has_position = has_mask | examples['clicks']  # (`PKSMixed.train_inputs`)
  clean = dict(batch, mask=_keep(batch['mask'], has_mask),
               clicks=_keep(batch['clicks'], has_position, 0.5),
               box=_keep(batch['box'], has_position, 0.5))
  full = {k: weights_and_settings[k] for k in _FULL_KEYS}
  click = {k: weights_and_settings[k] for k in _CLICK_KEYS}
  teacher_mask = masks.downsample_mask(batch['teacher_mask'],
                                       outputs['mask_logits'].shape[1:])
  teacher_weight = batch['teacher_weight']
  losses = {
      'mask': pks_full.full_supervision_loss(
          outputs, clean, weights=examples['mask'], **full),
      'clicks': pks_click.click_supervision_loss(
          outputs, clean, step, weights=examples['clicks'], **click),
      'pseudo': pks_full.full_supervision_loss(
          outputs, clean, weights=examples['pseudo'], **full),
      # The clicked examples' teacher masks: Dice + BCE, as masks.
      'click_teacher': _mask_terms(outputs['mask_logits'], teacher_mask,
                                   teacher_weight, full),
  }
  examples.update(click_teacher=teacher_weight > 0, text=kinds == TEXT)
  shares = {kind: flags.astype(jnp.float32).mean()
            for kind, flags in examples.items()}
  # Each kind's means times its share of the batch: every example weighs
  # the same, as in a single-kind batch. (Kinds weighted alike whatever
  # their share let 3 masked examples of 32 make the gradient as noisy as
  # a batch of 3: validation mIoU 35.7 at 10 % masks, seed 0.)
  total = sum(kind_weights[kind] * shares[kind] * loss
              for kind, (loss, _) in losses.items())
  terms = {f'{kind}/{name}': value for kind, (_, kind_terms) in losses.items()
           for name, value in kind_terms.items()}
  terms.update({f'share/{kind}': share for kind, share in shares.items()})
  return total, terms


def _mask_terms(mask_logits: jax.Array, target: jax.Array,
                weights: jax.Array, settings: Mapping[str, float]
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted Dice + BCE, the terms) against a mask on the logits' grid."""
  terms = {'dice': masks.dice_loss(mask_logits, target, weights),
           'bce': masks.bce_loss(mask_logits, target, weights)}
  return weighting.weighted_sum(terms, settings), terms


def _keep(value: jax.Array, flags: jax.Array, fill: float = 0.0) -> jax.Array:
  """`value` [B, ...] where `flags` [B], else `fill`."""
  return jnp.where(flags.reshape((-1,) + (1,) * (value.ndim - 1)), value,
                   jnp.asarray(fill, value.dtype))
