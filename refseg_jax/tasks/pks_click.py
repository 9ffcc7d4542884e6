"""PKS under click supervision: a centre and two corner clicks, no mask.

The position branch learns from the clicks as under full supervision
(`pks_full.position_terms`); the mask head from BoxInst (Tian et al. CVPR
2021, as AdelaiDet's CondInst implements it): the projection loss on the
box the corner clicks span, colour affinity between neighbouring cells
inside it (pairwise, ramped in), the centre click as a positive point and
the cells outside the box as negatives. No term reads a mask.
"""

from __future__ import annotations

from typing import Optional

import jax

from refseg_jax.losses import boxinst
from refseg_jax.losses import weighting
from refseg_jax.tasks import base
from refseg_jax.tasks import pks_full


class PKSClick(pks_full.PKSFull):
  """PKS trained on clicks: the full task's model, inputs and response."""

  supervision = 'click'

  def loss(self, outputs, batch, step):
    return click_supervision_loss(outputs, batch, step, **self.config.loss)


def click_supervision_loss(
    outputs: base.Outputs, batch: base.Batch, step: jax.Array, *,
    heatmap: float, box: float, projection: float, pairwise: float,
    point: float, outside: float, outside_margin: float,
    heatmap_sigma: float, pairwise_size: int, pairwise_dilation: int,
    colour_threshold: float, pairwise_warmup_steps: int,
    weights: Optional[jax.Array] = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Click-supervised PKS loss (module doc).

  Args:
    outputs: `PKS` outputs, run with `centre=batch['clicks'][:, 0]`.
    batch: A 'click' batch (image, clicks, box = the corner clicks' span).
    step: The training step, for the pairwise warm-up.
    heatmap, box, projection, pairwise, point, outside: the terms' weights.
    outside_margin: The outside term's box grows by this fraction of its
      size on each side (`boxinst.widen_box`).
    heatmap_sigma: Standard deviation of the heatmap target, in cells.
    pairwise_size: Neighbourhood side of the pairwise term.
    pairwise_dilation: Its dilation, in mask cells.
    colour_threshold: L*a*b* similarity a neighbour pair needs to count.
    pairwise_warmup_steps: Steps over which the pairwise weight ramps.
    weights: Optional bool or float [B]: every term is over these examples
      only; None = all.

  Returns:
    (weighted total, {term: unweighted value}).
  """
  mask_logits = outputs['mask_logits']
  terms = {
      **pks_full.position_terms(outputs, batch, heatmap_sigma, weights),
      'projection': boxinst.projection_loss(mask_logits, batch['box'],
                                            weights),
      'pairwise': boxinst.pairwise_colour_loss(
          mask_logits, batch['image'], batch['box'], pairwise_size,
          pairwise_dilation, colour_threshold, weights),
      'point': boxinst.point_loss(mask_logits, batch['clicks'][:, 0],
                                  weights),
      'outside': boxinst.outside_box_loss(mask_logits, batch['box'],
                                          weights, outside_margin),
  }
  weights = dict(heatmap=heatmap, box=box, projection=projection,
                 pairwise=pairwise, point=point, outside=outside)
  scales = {'pairwise': weighting.linear_warmup(step, pairwise_warmup_steps)}
  return weighting.weighted_sum(terms, weights, scales), terms
