"""CenterNet heatmap and box losses.

Conventions: points and boxes are canvas-normalised (fractions of the canvas
side S) as in `refseg_jax.data.pipeline`; heatmaps live on the model's grid
at stride 8 (see `refseg_jax.models.pks`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from refseg_jax.losses import masks
from refseg_jax.models import pks


def gaussian_heatmap(centre: jax.Array, shape: Tuple[int, int],
                     sigma: float) -> jax.Array:
  """CenterNet target: a Gaussian around the cell that holds each centre.

  The Gaussian is centred on the integer cell (as in CenterNet), so the
  target is exactly 1 there, the only positive for the focal loss.

  Args:
    centre: [B, 2] canvas-normalised (y, x).
    shape: (H, W) of the grid.
    sigma: Standard deviation in cells.

  Returns:
    float32 [B, H, W] in (0, 1].
  """
  height, width = shape
  iy, ix = pks.point_to_cell(centre, height, width)
  dy = jnp.arange(height)[None, :, None] - iy[:, None, None]
  dx = jnp.arange(width)[None, None, :] - ix[:, None, None]
  return jnp.exp(-(dy**2 + dx**2) / (2.0 * sigma**2)).astype(jnp.float32)


def focal_heatmap_loss(logits: jax.Array, target: jax.Array,
                       weights: Optional[jax.Array] = None) -> jax.Array:
  """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4).

  Positives are the cells where `target == 1`; the `(1 - target)^4` factor
  spares the negatives next to a centre. The sum over the batch is divided
  by the number of positives (at least 1).

  Args:
    logits: [B, H, W] heatmap logits.
    target: [B, H, W] from `gaussian_heatmap`.
    weights: Optional bool or float [B]: each example's sum (and its
      positives) count with its weight; None = all 1.

  Returns:
    Scalar loss.
  """
  logits = logits.astype(jnp.float32)
  prob = jax.nn.sigmoid(logits)
  pos = (target == 1).astype(jnp.float32)
  # log_sigmoid keeps log(p) and log(1 - p) finite for saturated logits.
  pos_term = pos * (1 - prob)**2 * jax.nn.log_sigmoid(logits)
  neg_term = ((1 - pos) * (1 - target)**4 * prob**2
              * jax.nn.log_sigmoid(-logits))
  if weights is None:
    return -(pos_term.sum() + neg_term.sum()) / jnp.maximum(pos.sum(), 1.0)
  weights = weights.astype(jnp.float32)
  per_example = (pos_term + neg_term).sum((1, 2))
  return (-(per_example * weights).sum()
          / jnp.maximum((pos.sum((1, 2)) * weights).sum(), 1.0))


def box_l1_loss(pred_box_at_centre: jax.Array, box: jax.Array,
                weights: Optional[jax.Array] = None) -> jax.Array:
  """Mean absolute error over the 4 canvas-normalised coords and the batch
  (weighted by bool or float `weights` [B], `masks.masked_mean`)."""
  if weights is None:
    return jnp.mean(jnp.abs(pred_box_at_centre - box))
  return masks.masked_mean(jnp.abs(pred_box_at_centre - box).mean(-1),
                           weights)
