"""Losses for PKS-style referring segmentation (full supervision).

Conventions: points and boxes are canvas-normalised (fractions of the canvas
side S) as in `refseg_jax.data.pipeline`; heatmaps and mask logits live on
the model's grids (heatmap at stride 8, mask logits at the mask stride; see
`refseg_jax.models.pks`). Ground-truth masks arrive at S x S and are
average-pooled onto the mask grid (`downsample_mask`), giving soft targets:
the fraction of each cell the referent covers. Pooling the target, not upsampling the logits, keeps the
loss as cheap as the head and never invents sub-cell detail the head cannot
produce.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from refseg_jax.models import pks

DEFAULT_WEIGHTS = {'heatmap': 1.0, 'box': 5.0, 'dice': 1.0, 'bce': 1.0}
_EPS = 1e-5


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


def focal_heatmap_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4).

  Positives are the cells where `target == 1`; the `(1 - target)^4` factor
  spares the negatives next to a centre. The sum over the batch is divided
  by the number of positives (at least 1).

  Args:
    logits: [B, H, W] heatmap logits.
    target: [B, H, W] from `gaussian_heatmap`.

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
  return -(pos_term.sum() + neg_term.sum()) / jnp.maximum(pos.sum(), 1.0)


def box_l1_loss(pred_box_at_centre: jax.Array, box: jax.Array) -> jax.Array:
  """Mean absolute error over the batch and the 4 canvas-normalised coords."""
  return jnp.mean(jnp.abs(pred_box_at_centre - box))


def _masked_mean(per_example: jax.Array,
                 valid: Optional[jax.Array]) -> jax.Array:
  """Mean over the examples where `valid` (all when None)."""
  if valid is None:
    return per_example.mean()
  valid = valid.astype(jnp.float32)
  return (per_example * valid).sum() / jnp.maximum(valid.sum(), 1.0)


def dice_loss(mask_logits: jax.Array, mask: jax.Array,
              valid: Optional[jax.Array] = None) -> jax.Array:
  """CondInst's Dice loss, 1 - 2|pm| / (|p|^2 + |m|^2), per example.

  Args:
    mask_logits: [B, H, W].
    mask: [B, H, W] targets in [0, 1] on the same grid.
    valid: Optional bool [B]; invalid examples are left out of the mean.

  Returns:
    Scalar loss: 0 for a perfect mask, 1 for a disjoint one (up to eps).
  """
  prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32)).reshape(
      mask_logits.shape[0], -1)
  mask = mask.astype(jnp.float32).reshape(prob.shape)
  inter = (prob * mask).sum(-1)
  union = (prob**2).sum(-1) + (mask**2).sum(-1)
  return _masked_mean(1 - 2 * inter / (union + _EPS), valid)


def bce_loss(mask_logits: jax.Array, mask: jax.Array,
             valid: Optional[jax.Array] = None) -> jax.Array:
  """Per-pixel sigmoid cross entropy, averaged per example then over `valid`.

  Args:
    mask_logits: [B, H, W].
    mask: [B, H, W] (soft) targets in [0, 1] on the same grid.
    valid: Optional bool [B].

  Returns:
    Scalar loss.
  """
  per_pixel = optax.sigmoid_binary_cross_entropy(
      mask_logits.astype(jnp.float32), mask.astype(jnp.float32))
  return _masked_mean(per_pixel.reshape(mask.shape[0], -1).mean(-1), valid)


def downsample_mask(mask: jax.Array, shape: Tuple[int, int]) -> jax.Array:
  """Average-pools [B, S, S] masks (0/1) onto an (H, W) grid dividing S."""
  batch, side_y, side_x = mask.shape
  height, width = shape
  if side_y % height or side_x % width:
    raise ValueError(f'Mask {mask.shape[1:]} is not a multiple of {shape}.')
  cells = mask.astype(jnp.float32).reshape(
      batch, height, side_y // height, width, side_x // width)
  return cells.mean(axis=(2, 4))


def full_supervision_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
    weights: Optional[Mapping[str, float]] = None,
    sigma: float = 1.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Focal heatmap + L1 box + Dice + BCE mask losses.

  Args:
    outputs: `PKS` outputs, run with `centre=batch['clicks'][:, 0]` so that
      the box and mask are read at the ground-truth centre.
    batch: A 'full' supervision batch (clicks, box, mask at S x S).
    weights: Per-term weights keyed 'heatmap', 'box', 'dice', 'bce';
      missing keys take `DEFAULT_WEIGHTS`.
    sigma: Standard deviation of the heatmap target, in cells.

  Returns:
    (weighted total, {term: unweighted value}).
  """
  weights = {**DEFAULT_WEIGHTS, **(weights or {})}
  target = gaussian_heatmap(batch['clicks'][:, 0],
                           outputs['heatmap'].shape[1:], sigma)
  mask = downsample_mask(batch['mask'], outputs['mask_logits'].shape[1:])
  terms = {
      'heatmap': focal_heatmap_loss(outputs['heatmap'], target),
      'box': box_l1_loss(outputs['box_at_centre'], batch['box']),
      'dice': dice_loss(outputs['mask_logits'], mask),
      'bce': bce_loss(outputs['mask_logits'], mask),
  }
  total = sum(weights[k] * v for k, v in terms.items())
  return total, terms
