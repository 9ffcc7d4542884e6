"""Click supervision: BoxInst's projection and pairwise losses, click terms.

Click supervision (BoxInst, Tian et al. CVPR 2021, as AdelaiDet's CondInst
implements it) never reads a mask: the heatmap and box heads learn from the
clicks as under full supervision, and the mask head from the box the corner
clicks span (projection loss), from colour affinity between neighbouring
cells inside that box (pairwise loss), from the centre click as a positive
point, and from the cells outside the box as negatives.

Points and boxes are canvas-normalised (fractions of the canvas side S);
mask logits live on the model's mask grid (see `refseg_jax.models.pks`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from refseg_jax.losses import masks
from refseg_jax.models import pks

# sRGB (D65) -> CIE XYZ, and the D65 white point, as skimage.color.rgb2lab.
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """CIE L*a*b* [..., 3] of sRGB colours [..., 3] in [0, 1] (skimage's)."""
  rgb = rgb.astype(jnp.float32)
  linear = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055)**2.4, rgb / 12.92)
  xyz = linear @ jnp.asarray(_RGB_TO_XYZ).T / jnp.asarray(_D65_WHITE)
  f = jnp.where(xyz > 0.008856, jnp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  return jnp.stack([116.0 * f[..., 1] - 16.0,
                    500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def _interval_coverage(low: jax.Array, high: jax.Array, cells: int
                       ) -> jax.Array:
  """Fraction [B, cells] of each of `cells` equal cells of [0, 1] that
  the intervals [low, high] ([B] each) cover."""
  edges = jnp.arange(cells + 1, dtype=jnp.float32) / cells
  overlap = (jnp.minimum(high[:, None], edges[None, 1:])
             - jnp.maximum(low[:, None], edges[None, :-1]))
  return jnp.clip(overlap * cells, 0.0, 1.0)


def box_coverage(box: jax.Array, shape: Tuple[int, int]) -> jax.Array:
  """Fraction [B, H, W] of each grid cell inside canvas-normalised boxes.

  The soft analogue of `masks.downsample_mask` for a box-shaped mask, so
  that boxes of a few pixels still reach the coarse mask grid.
  """
  rows = _interval_coverage(box[:, 0], box[:, 2], shape[0])
  cols = _interval_coverage(box[:, 1], box[:, 3], shape[1])
  return rows[:, :, None] * cols[:, None, :]


def projection_loss(mask_logits: jax.Array, box: jax.Array,
                    weights: Optional[jax.Array] = None) -> jax.Array:
  """BoxInst's projection loss: the mask's projections match the box's.

  Dice between the maximum of the mask probability over rows and the box's
  extent along x, plus the same along y: zero for any mask that touches
  every row and column of the box and nothing outside it.

  Args:
    mask_logits: [B, H, W].
    box: [B, 4] canvas-normalised (ymin, xmin, ymax, xmax).
    weights: Optional bool or float [B] of the mean over examples.

  Returns:
    Scalar loss in [0, 2].
  """
  prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  target = box_coverage(box, mask_logits.shape[1:])
  along = lambda axis: masks.masked_mean(masks.dice_per_example(
      prob.max(axis=axis), target.max(axis=axis)), weights)
  return along(1) + along(2)


def _neighbour(x: jax.Array, dy: int, dx: int) -> Tuple[jax.Array, jax.Array]:
  """x[:, i + dy, j + dx] at every (i, j) of x [B, H, W, ...] (zero outside),
  and whether that neighbour lies inside the grid, [H, W]."""
  height, width = x.shape[1:3]
  pad = max(abs(dy), abs(dx))
  padded = jnp.pad(x, [(0, 0), (pad, pad), (pad, pad)]
                   + [(0, 0)] * (x.ndim - 3))
  shifted = padded[:, pad + dy:pad + dy + height, pad + dx:pad + dx + width]
  rows = jnp.arange(height)[:, None] + dy
  cols = jnp.arange(width)[None, :] + dx
  inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
  return shifted, inside


def neighbour_offsets(size: int, dilation: int) -> list[Tuple[int, int]]:
  """(dy, dx) of a size x size neighbourhood with `dilation`, centre left
  out (BoxInst: 3 x 3, dilation 2 -> 8 offsets)."""
  half = size // 2
  return [(dilation * i, dilation * j)
          for i in range(-half, half + 1) for j in range(-half, half + 1)
          if (i, j) != (0, 0)]


def pairwise_colour_loss(mask_logits: jax.Array, images: jax.Array,
                         box: jax.Array, size: int, dilation: int,
                         threshold: float,
                         weights: Optional[jax.Array] = None) -> jax.Array:
  """BoxInst's pairwise loss: similar-coloured neighbours share a label.

  The images are average-pooled to the mask grid and converted to L*a*b*;
  a pair of cells (i, j) counts when i lies in the box (coverage >= 0.5)
  and their colour similarity exp(-|lab_i - lab_j| / 2) >= `threshold`.
  Each counted pair costs -log P(same label) = -log(p_i p_j + (1 - p_i)
  (1 - p_j)); the loss is their mean.

  Args:
    mask_logits: [B, H, W].
    images: uint8 [B, S, S, 3] (or [B / k, ...] grouped by image), S a
      multiple of H and W.
    box: [B, 4] canvas-normalised (ymin, xmin, ymax, xmax).
    size: Neighbourhood side (BoxInst: 3).
    dilation: Spacing of the neighbourhood, in cells (BoxInst: 2).
    threshold: Colour similarity a pair needs to count (BoxInst: 0.3).
    weights: Optional bool or float [B]: each example's pairs count with
      its weight (None = 1).

  Returns:
    Scalar loss (0 when no pair counts).
  """
  batch, height, width = mask_logits.shape
  side_y, side_x = images.shape[1:3]
  pooled = images.astype(jnp.float32).reshape(
      images.shape[0], height, side_y // height, width, side_x // width,
      3).mean((2, 4))
  # Grouped batches hold one image per k expressions (see `pks.PKS`).
  lab = jnp.repeat(rgb_to_lab(pooled / 255.0), batch // images.shape[0],
                   axis=0)
  in_box = box_coverage(box, (height, width)) >= 0.5
  logits = mask_logits.astype(jnp.float32)
  log_fg, log_bg = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  total, count = 0.0, 0.0
  for dy, dx in neighbour_offsets(size, dilation):
    lab_j, inside = _neighbour(lab, dy, dx)
    similarity = jnp.exp(-jnp.linalg.norm(lab - lab_j, axis=-1) * 0.5)
    weight = ((similarity >= threshold) & in_box & inside).astype(jnp.float32)
    log_same = jnp.logaddexp(log_fg + _neighbour(log_fg, dy, dx)[0],
                             log_bg + _neighbour(log_bg, dy, dx)[0])
    if weights is not None:  # An example's pairs count with its weight.
      weight = weight * weights.astype(jnp.float32)[:, None, None]
    total += (-log_same * weight).sum()
    count += weight.sum()
  return total / jnp.maximum(count, 1.0)


def widen_box(box: jax.Array, margin: float) -> jax.Array:
  """Boxes [B, 4] grown by `margin` times their height (width) above and
  below (left and right), clipped to the canvas."""
  size = jnp.tile(box[:, 2:] - box[:, :2], 2)
  sign = jnp.array([-1.0, -1.0, 1.0, 1.0])
  return jnp.clip(box + sign * margin * size, 0.0, 1.0)


def outside_box_loss(mask_logits: jax.Array, box: jax.Array,
                     weights: Optional[jax.Array] = None,
                     margin: float = 0.0) -> jax.Array:
  """Mean -log(1 - p) over the cells outside the box (weighted 1 - coverage,
  times the example's bool or float `weights` [B] when given), the box
  first widened by `margin` (`widen_box`).

  The object lies inside the box its corner clicks span, so every cell
  outside is background (as in BBTP, Hsu et al. NeurIPS 2019). BoxInst
  reaches the same prior only through the projections, whose gradient
  vanishes once the sigmoid saturates; this term keeps the mask from
  flooding the image while the centre-click term pulls it up. Clicks
  placed with noise span a box whose edges miss the object's by about the
  noise: only the cells beyond a margin of that size are surely
  background, while a box too small on one side would push the object's
  own edge down.
  """
  outside = 1.0 - box_coverage(widen_box(box, margin), mask_logits.shape[1:])
  per_cell = jax.nn.softplus(mask_logits.astype(jnp.float32))
  if weights is not None:
    outside = outside * weights.astype(jnp.float32)[:, None, None]
  return (per_cell * outside).sum() / jnp.maximum(outside.sum(), 1.0)


def point_loss(mask_logits: jax.Array, point: jax.Array,
               weights: Optional[jax.Array] = None) -> jax.Array:
  """Mean -log p of the mask cell holding each canvas-normalised point
  (over the examples with bool or float `weights` [B] when given)."""
  batch, height, width = mask_logits.shape
  iy, ix = pks.point_to_cell(point, height, width)
  logits = mask_logits[jnp.arange(batch), iy, ix].astype(jnp.float32)
  return masks.masked_mean(-jax.nn.log_sigmoid(logits), weights)
