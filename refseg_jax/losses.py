"""Losses for PKS-style referring segmentation, full and click supervision.

Conventions: points and boxes are canvas-normalised (fractions of the canvas
side S) as in `refseg_jax.data.pipeline`; heatmaps and mask logits live on
the model's grids (heatmap at stride 8, mask logits at the mask stride; see
`refseg_jax.models.pks`). Ground-truth masks arrive at S x S and are
average-pooled onto the mask grid (`downsample_mask`), giving soft targets:
the fraction of each cell the referent covers. Pooling the target, not upsampling the logits, keeps the
loss as cheap as the head and never invents sub-cell detail the head cannot
produce.

Click supervision (BoxInst, Tian et al. CVPR 2021, as AdelaiDet's CondInst
implements it) never reads a mask: the heatmap and box heads learn from the
clicks as under full supervision, and the mask head from the box the corner
clicks span (projection loss), from colour affinity between neighbouring
cells inside that box (pairwise loss), from the centre click as a positive
point, and from the cells outside the box as negatives.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from refseg_jax.models import pks

DEFAULT_WEIGHTS = {'heatmap': 1.0, 'box': 5.0, 'dice': 1.0, 'bce': 1.0}
CLICK_DEFAULT_WEIGHTS = {'heatmap': 1.0, 'box': 5.0, 'projection': 1.0,
                         'pairwise': 1.0, 'point': 1.0, 'outside': 1.0}
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


def _dice_per_example(prob: jax.Array, target: jax.Array) -> jax.Array:
  """1 - 2|pt| / (|p|^2 + |t|^2) [B] of probabilities and targets [B, ...]."""
  prob = prob.reshape(prob.shape[0], -1)
  target = target.astype(jnp.float32).reshape(prob.shape)
  inter = (prob * target).sum(-1)
  union = (prob**2).sum(-1) + (target**2).sum(-1)
  return 1 - 2 * inter / (union + _EPS)


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
  prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  return _masked_mean(_dice_per_example(prob, mask), valid)


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

  The soft analogue of `downsample_mask` for a box-shaped mask, so that
  boxes of a few pixels still reach the coarse mask grid.
  """
  rows = _interval_coverage(box[:, 0], box[:, 2], shape[0])
  cols = _interval_coverage(box[:, 1], box[:, 3], shape[1])
  return rows[:, :, None] * cols[:, None, :]


def projection_loss(mask_logits: jax.Array, box: jax.Array) -> jax.Array:
  """BoxInst's projection loss: the mask's projections match the box's.

  Dice between the maximum of the mask probability over rows and the box's
  extent along x, plus the same along y: zero for any mask that touches
  every row and column of the box and nothing outside it.

  Args:
    mask_logits: [B, H, W].
    box: [B, 4] canvas-normalised (ymin, xmin, ymax, xmax).

  Returns:
    Scalar loss in [0, 2].
  """
  prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  target = box_coverage(box, mask_logits.shape[1:])
  return (_dice_per_example(prob.max(axis=1), target.max(axis=1)).mean()
          + _dice_per_example(prob.max(axis=2), target.max(axis=2)).mean())


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


def neighbour_offsets(size: int = 3, dilation: int = 2
                      ) -> list[Tuple[int, int]]:
  """(dy, dx) of a size x size neighbourhood with `dilation`, centre left
  out (BoxInst: 3 x 3, dilation 2 -> 8 offsets)."""
  half = size // 2
  return [(dilation * i, dilation * j)
          for i in range(-half, half + 1) for j in range(-half, half + 1)
          if (i, j) != (0, 0)]


def pairwise_colour_loss(mask_logits: jax.Array, images: jax.Array,
                         box: jax.Array, size: int = 3, dilation: int = 2,
                         threshold: float = 0.3) -> jax.Array:
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
    size: Neighbourhood side.
    dilation: Spacing of the neighbourhood, in cells.
    threshold: Colour similarity a pair needs to count.

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
    total += (-log_same * weight).sum()
    count += weight.sum()
  return total / jnp.maximum(count, 1.0)


def outside_box_loss(mask_logits: jax.Array, box: jax.Array) -> jax.Array:
  """Mean -log(1 - p) over the cells outside the box (weighted 1 - coverage).

  The object lies inside the box its corner clicks span, so every cell
  outside is background (as in BBTP, Hsu et al. NeurIPS 2019). BoxInst
  reaches the same prior only through the projections, whose gradient
  vanishes once the sigmoid saturates; this term keeps the mask from
  flooding the image while the centre-click term pulls it up.
  """
  outside = 1.0 - box_coverage(box, mask_logits.shape[1:])
  per_cell = jax.nn.softplus(mask_logits.astype(jnp.float32))
  return (per_cell * outside).sum() / jnp.maximum(outside.sum(), 1.0)


def point_loss(mask_logits: jax.Array, point: jax.Array) -> jax.Array:
  """Mean -log p of the mask cell holding each canvas-normalised point."""
  batch, height, width = mask_logits.shape
  iy, ix = pks.point_to_cell(point, height, width)
  logits = mask_logits[jnp.arange(batch), iy, ix].astype(jnp.float32)
  return -jnp.mean(jax.nn.log_sigmoid(logits))


def linear_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
  """min(step / warmup_steps, 1); 1 throughout when warmup_steps is 0."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def click_supervision_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
    step: jax.Array, weights: Optional[Mapping[str, float]] = None,
    sigma: float = 1.0, pairwise_size: int = 3, pairwise_dilation: int = 2,
    colour_threshold: float = 0.3, pairwise_warmup_steps: int = 10_000
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Click-supervised PKS loss: no term reads a mask.

  Focal heatmap on the centre click, L1 on the box the corner clicks span,
  BoxInst projection and pairwise losses on the mask (the pairwise term
  ramps in linearly over `pairwise_warmup_steps`), the centre click as a
  positive mask point and the cells outside the box as negatives.

  Args:
    outputs: `PKS` outputs, run with `centre=batch['clicks'][:, 0]`.
    batch: A 'click' batch (image, clicks, box = the corner clicks' span).
    step: The training step, for the pairwise warm-up.
    weights: Per-term weights keyed as `CLICK_DEFAULT_WEIGHTS`.
    sigma: Standard deviation of the heatmap target, in cells.
    pairwise_size: Neighbourhood side of the pairwise term.
    pairwise_dilation: Its dilation, in mask cells.
    colour_threshold: L*a*b* similarity a neighbour pair needs to count.
    pairwise_warmup_steps: Steps over which the pairwise weight ramps.

  Returns:
    (weighted total, {term: unweighted value}).
  """
  weights = {**CLICK_DEFAULT_WEIGHTS, **(weights or {})}
  mask_logits = outputs['mask_logits']
  target = gaussian_heatmap(batch['clicks'][:, 0],
                            outputs['heatmap'].shape[1:], sigma)
  terms = {
      'heatmap': focal_heatmap_loss(outputs['heatmap'], target),
      'box': box_l1_loss(outputs['box_at_centre'], batch['box']),
      'projection': projection_loss(mask_logits, batch['box']),
      'pairwise': pairwise_colour_loss(
          mask_logits, batch['image'], batch['box'], pairwise_size,
          pairwise_dilation, colour_threshold),
      'point': point_loss(mask_logits, batch['clicks'][:, 0]),
      'outside': outside_box_loss(mask_logits, batch['box']),
  }
  scale = {'pairwise': linear_warmup(step, pairwise_warmup_steps)}
  total = sum(weights[k] * scale.get(k, 1.0) * v for k, v in terms.items())
  return total, terms


# ----------------------------------------- text supervision (Shatter and Gather)

TEXT_DEFAULT_WEIGHTS = {'c3': 1.0, 'reconstruction': 1.0}


def same_image_pairs(image_ids: jax.Array, image_of: jax.Array) -> jax.Array:
  """bool [T, I]: image i shows expression t's image but is not its own
  entry (the same image twice in a batch).

  Args:
    image_ids: [I] the batch images' dataset ids.
    image_of: [T] the index of each expression's own image.
  """
  own = image_ids[image_of]
  return ((image_ids[None, :] == own[:, None])
          & (jnp.arange(image_ids.shape[0])[None, :] != image_of[:, None]))


def c3_loss(scores: jax.Array, image_of: jax.Array,
            excluded: Optional[jax.Array] = None) -> jax.Array:
  """SaG's contrastive cycle-consistency loss (InfoNCE, temperature 1).

  Args:
    scores: [T, I] s_{t,i} = stopgrad(x_t) . z_{t,i}.
    image_of: [T] index of each expression's own image, the positive.
    excluded: optional bool [T, I] pairs left out of the softmax (same-image
      pairs that are not the positive).

  Returns:
    Mean over the expressions of -log softmax_i(s_{t,i})[image_of[t]].
  """
  scores = scores.astype(jnp.float32)
  if excluded is not None:
    scores = jnp.where(excluded, -jnp.inf, scores)
  return optax.softmax_cross_entropy_with_integer_labels(
      scores, image_of).mean()


def reconstruction_loss(reconstruction: jax.Array,
                        target: jax.Array) -> jax.Array:
  """MSE of the slot decoder's output to its (detached) target: the ViT
  patch features or the patch pixels (`SaG.reconstruct`)."""
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  return jnp.mean((reconstruction.astype(jnp.float32) - target)**2)


def text_supervision_loss(
    outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
    step: jax.Array, weights: Optional[Mapping[str, float]] = None,
    mask_same_image: bool = True, warmup_steps: int = 5_000
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """SaG's loss: C^3 + reconstruction, scaled by min(step / warmup, 1).

  Args:
    outputs: `SaG` outputs run with `all_pairs=True`.
    batch: A 'text' batch (image, tokens, image_id).
    step: The training step, for the warm-up scaling.
    weights: Keyed as `TEXT_DEFAULT_WEIGHTS`.
    mask_same_image: Leave other expressions' copies of an expression's
      own image out of its negatives (the official code counts them).
    warmup_steps: Steps over which the loss scale ramps from 0 to 1.

  Returns:
    (weighted, scaled total, {term: unscaled value}).
  """
  weights = {**TEXT_DEFAULT_WEIGHTS, **(weights or {})}
  num_texts, num_images = outputs['scores'].shape
  image_of = jnp.arange(num_texts) // pks.group_size(num_images, num_texts)
  excluded = (same_image_pairs(batch['image_id'], image_of)
              if mask_same_image else None)
  terms = {
      'c3': c3_loss(outputs['scores'], image_of, excluded),
      'reconstruction': reconstruction_loss(outputs['reconstruction'],
                                            outputs['reconstruction_target']),
  }
  total = sum(weights[k] * v for k, v in terms.items())
  return linear_warmup(step, warmup_steps) * total, terms
