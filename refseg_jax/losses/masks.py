"""Mask losses (Dice, BCE) and the pooling of ground-truth masks.

Mask logits live on the model's mask grid (at the mask stride; see
`refseg_jax.models.pks`). Ground-truth masks arrive at S x S and are
average-pooled onto the mask grid (`downsample_mask`), giving soft targets:
the fraction of each cell the referent covers. Pooling the target, not
upsampling the logits, keeps the loss as cheap as the head and never invents
sub-cell detail the head cannot produce.
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import optax

_EPS = 1e-5


def masked_mean(per_example: jax.Array,
                weights: Optional[jax.Array]) -> jax.Array:
  """Mean of [B] values weighted by bool or float `weights` >= 0 [B] (the
  plain mean when None; 0 when all weights are 0). The values must be
  finite: a caller that leaves an example out replaces its missing labels
  first (`refseg_jax.tasks.pks_mixed` does, once for every term).
  """
  if weights is None:
    return per_example.mean()
  weights = weights.astype(jnp.float32)
  return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1e-6)


def dice_per_example(prob: jax.Array, target: jax.Array) -> jax.Array:
  """1 - 2|pt| / (|p|^2 + |t|^2) [B] of probabilities and targets [B, ...]."""
  prob = prob.reshape(prob.shape[0], -1)
  target = target.astype(jnp.float32).reshape(prob.shape)
  inter = (prob * target).sum(-1)
  union = (prob**2).sum(-1) + (target**2).sum(-1)
  return 1 - 2 * inter / (union + _EPS)


def dice_loss(mask_logits: jax.Array, mask: jax.Array,
              weights: Optional[jax.Array] = None) -> jax.Array:
  """CondInst's Dice loss, 1 - 2|pm| / (|p|^2 + |m|^2), per example.

  Args:
    mask_logits: [B, H, W].
    mask: [B, H, W] targets in [0, 1] on the same grid.
    weights: Optional bool or float [B] of the mean over examples
      (`masked_mean`).

  Returns:
    Scalar loss: 0 for a perfect mask, 1 for a disjoint one (up to eps).
  """
  prob = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  return masked_mean(dice_per_example(prob, mask), weights)


def bce_loss(mask_logits: jax.Array, mask: jax.Array,
             weights: Optional[jax.Array] = None) -> jax.Array:
  """Per-pixel sigmoid cross entropy, averaged per example, then over the
  examples with `weights`.

  Args:
    mask_logits: [B, H, W].
    mask: [B, H, W] (soft) targets in [0, 1] on the same grid.
    weights: Optional bool or float [B] (`masked_mean`).

  Returns:
    Scalar loss.
  """
  per_pixel = optax.sigmoid_binary_cross_entropy(
      mask_logits.astype(jnp.float32), mask.astype(jnp.float32))
  return masked_mean(per_pixel.reshape(mask.shape[0], -1).mean(-1), weights)


def downsample_mask(mask: jax.Array, shape: Tuple[int, int]) -> jax.Array:
  """Average-pools [B, S, S] masks (0/1) onto an (H, W) grid dividing S."""
  batch, side_y, side_x = mask.shape
  height, width = shape
  if side_y % height or side_x % width:
    raise ValueError(f'Mask {mask.shape[1:]} is not a multiple of {shape}.')
  cells = mask.astype(jnp.float32).reshape(
      batch, height, side_y // height, width, side_x // width)
  return cells.mean(axis=(2, 4))
