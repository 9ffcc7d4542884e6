"""PKS under full supervision: heatmap, box and mask from pixel masks.

The position branch learns CenterNet's focal heatmap loss at the centre
click and L1 on the box read there; the mask head, run with the kernel at
the ground-truth centre, learns Dice + BCE against the mask average-pooled
onto its grid. At inference the kernel is read at the heatmap peak.
"""

from __future__ import annotations

from typing import Optional

import jax

from refseg_jax.losses import heatmap as heatmap_losses
from refseg_jax.losses import masks
from refseg_jax.losses import weighting
from refseg_jax.models import pks
from refseg_jax.tasks import base


def position_terms(outputs: base.Outputs, batch: base.Batch,
                   heatmap_sigma: float,
                   weights: Optional[jax.Array] = None
                   ) -> dict[str, jax.Array]:
  """Focal heatmap at the centre click, L1 on the box read there: the
  position branch's terms under full and click supervision alike (over the
  examples with `weights` [B], when given)."""
  target = heatmap_losses.gaussian_heatmap(
      batch['clicks'][:, 0], outputs['heatmap'].shape[1:], heatmap_sigma)
  return {
      'heatmap': heatmap_losses.focal_heatmap_loss(outputs['heatmap'], target,
                                                   weights),
      'box': heatmap_losses.box_l1_loss(outputs['box_at_centre'],
                                        batch['box'], weights),
  }


class PKSFull(base.Task):
  """PKS (`refseg_jax.models.pks`) trained on masks."""

  supervision = 'full'
  module = pks.PKS

  def train_inputs(self, batch: base.Batch) -> dict[str, jax.Array]:
    # The kernel is read at the ground-truth centre in training.
    return {'centre': batch['clicks'][:, 0]}

  def loss(self, outputs, batch, step):
    del step  # No term is scheduled.
    return full_supervision_loss(outputs, batch, **self.config.loss)

  def response_map(self, outputs, size, content_size):
    """The mask logits (kernel at the heatmap peak) bilinearly upsampled to
    the canvas (thresholded at 0, so the padding does not matter)."""
    del content_size
    logits = outputs['mask_logits']
    return jax.image.resize(logits, (logits.shape[0], size, size), 'bilinear')


def full_supervision_loss(outputs: base.Outputs, batch: base.Batch, *,
                          heatmap: float, box: float, dice: float, bce: float,
                          heatmap_sigma: float,
                          weights: Optional[jax.Array] = None
                          ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Focal heatmap + L1 box + Dice + BCE mask losses.

  Args:
    outputs: `PKS` outputs, run with `centre=batch['clicks'][:, 0]`.
    batch: A 'full' batch (clicks, box, mask at S x S).
    heatmap, box, dice, bce: the terms' weights.
    heatmap_sigma: Standard deviation of the heatmap target, in cells.
    weights: Optional bool or float [B]: every term is over these examples
      only (`masks.masked_mean`); None = all.

  Returns:
    (weighted total, {term: unweighted value}).
  """
  mask = masks.downsample_mask(batch['mask'], outputs['mask_logits'].shape[1:])
  terms = {
      **position_terms(outputs, batch, heatmap_sigma, weights),
      'dice': masks.dice_loss(outputs['mask_logits'], mask, weights),
      'bce': masks.bce_loss(outputs['mask_logits'], mask, weights),
  }
  weights = dict(heatmap=heatmap, box=box, dice=dice, bce=bce)
  return weighting.weighted_sum(terms, weights), terms
