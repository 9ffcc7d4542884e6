"""Referring-expression-segmentation (RES) metrics as mergeable accumulators.

All metrics are scored per expression at the image's ORIGINAL resolution:

* IoU = |P ∩ G| / |P ∪ G|, with P = {response > threshold} inside the
  original image and G the ground-truth mask.
* mIoU = mean IoU over expressions.
* oIoU (a.k.a. cIoU) = Σ|P ∩ G| / Σ|P ∪ G| over expressions.
* prec@X = fraction of expressions with IoU > X (strictly greater).
* PointM = fraction of expressions whose response-map argmax over the valid
  original pixels lies inside G.

Edge-case conventions:

* Empty union (P and G both empty): IoU = 1, so it counts as a hit at every
  prec@X; it adds 0 to both oIoU sums.
* Empty P with non-empty G: IoU = 0.
* Empty G: PointM miss.
* Σ|P ∪ G| = 0: oIoU = 0.
* No (valid) expressions at all: every rate is 0 and num_expressions is 0.
* PointM argmax ties resolve to the first pixel in row-major order.

Geometry contract of the input pipeline: an (H, W) image is resized by
`S / max(H, W)` to content size (h, w) and placed at the top-left of an S×S
canvas (`config.data.resize='letterbox'`), or stretched to the whole
canvas, (h, w) = (S, S) (`'stretch'`); the ground truth is an (H, W) mask
zero-padded bottom/right to M×M.
"""

from __future__ import annotations

from typing import Any

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

# prec@X thresholds in tenths, so that IoU > X is decided exactly on the
# integer counts (10 * I > k * U) rather than on a rounded float32 IoU.
# Exact as long as 10 * M * M < 2**31, i.e. M < 14654.
PREC_THRESHOLDS_TENTHS = (5, 6, 7, 8, 9)
PREC_KEYS = tuple(f'prec@{k / 10:.1f}' for k in PREC_THRESHOLDS_TENTHS)

# Dataset-wide pixel sums overflow int32 (e.g. 10k expressions × 300k
# pixels), and x64 is off by default in JAX, so they are kept as two int32
# limbs (high, low) with value = high * 2**_LIMB_BITS + low, 0 <= low < 2**24.
# This is exact up to 2**55 pixels.
_LIMB_BITS = 24
_LIMB_MASK = (1 << _LIMB_BITS) - 1


def _to_limbs(total: jnp.ndarray) -> jnp.ndarray:
  """Splits a non-negative int32 scalar into normalised [high, low] limbs."""
  return jnp.stack([total >> _LIMB_BITS, total & _LIMB_MASK])


def _add_limbs(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Adds normalised limb arrays of shape [..., 2], carrying low → high."""
  total = a + b
  low = total[..., 1]
  return jnp.stack(
    [total[..., 0] + (low >> _LIMB_BITS), low & _LIMB_MASK], axis=-1)


def _limbs_to_int(limbs: Any) -> int:
  """Converts a concrete [high, low] limb array to an exact Python int."""
  high, low = (int(v) for v in np.asarray(limbs))
  return (high << _LIMB_BITS) + low


def _axis_weights(
    out_size: int, content: jnp.ndarray, orig: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Linear-interpolation taps along one axis from original to canvas.

  Output pixel i samples canvas coordinate (i + 0.5) * content / orig - 0.5
  (pixel-centre convention), clamped into [0, content - 1].

  Args:
    out_size: Number of output pixels M along the axis (static).
    content: Scalar int, content extent on the canvas (h or w).
    orig: Scalar int, original image extent (H or W).

  Returns:
    (lo, hi, frac): int32 [M] lower/upper canvas indices and float32 [M]
    weight of `hi`. Both indices stay inside the content region.
  """
  i = jnp.arange(out_size, dtype=jnp.int32)
  # Integer numerator/denominator: one correctly rounded float32 division.
  numerator = (2 * i + 1) * content - orig
  coord = numerator.astype(jnp.float32) / (2 * orig).astype(jnp.float32)
  coord = jnp.clip(coord, 0.0, (content - 1).astype(jnp.float32))
  lo = jnp.floor(coord).astype(jnp.int32)
  # Clamping `hi` (instead of reading lo + 1 with weight 0) keeps padded
  # canvas values, which may be ±inf logits, from leaking in as NaN.
  hi = jnp.minimum(lo + 1, content - 1)
  return lo, hi, coord - lo.astype(jnp.float32)


def _resize_one(
    canvas: jnp.ndarray,
    content_size: jnp.ndarray,
    orig_size: jnp.ndarray,
    out_size: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Single-example body of `resize_to_original` ([S, S] → [M, M])."""
  i = jnp.arange(out_size)
  region = (i[:, None] < orig_size[0]) & (i[None, :] < orig_size[1])
  # Dummy padding rows may carry zero sizes; keep the arithmetic finite.
  content_size = jnp.maximum(content_size, 1)
  orig_size = jnp.maximum(orig_size, 1)
  y_lo, y_hi, y_frac = _axis_weights(out_size, content_size[0], orig_size[0])
  x_lo, x_hi, x_frac = _axis_weights(out_size, content_size[1], orig_size[1])
  # Bilinear interpolation is separable: rows first ([M, S]), then columns.
  rows = (canvas[y_lo] * (1.0 - y_frac)[:, None]
      + canvas[y_hi] * y_frac[:, None])
  out = rows[:, x_lo] * (1.0 - x_frac) + rows[:, x_hi] * x_frac
  return jnp.where(region, out, 0.0), region


def resize_to_original(
    response: jnp.ndarray,
    content_size: jnp.ndarray,
    orig_size: jnp.ndarray,
    out_size: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Bilinearly resamples canvas response maps to original resolution.

  Original pixel (i, j) takes the bilinear value of the canvas content region
  at (y, x) = ((i + 0.5) * h / H - 0.5, (j + 0.5) * w / W - 0.5), each
  clamped into [0, h - 1] × [0, w - 1]; the canvas padding is never read.
  Jit-able with `out_size` static.

  Args:
    response: [B, S, S] canvas response maps (content at the top-left).
    content_size: int [B, 2], (h, w) of the content on the canvas.
    orig_size: int [B, 2], original (H, W).
    out_size: Static M >= max(H, W); outputs are zero-padded bottom/right.

  Returns:
    (maps, region): float32 [B, M, M] resampled maps, 0 outside the image,
    and bool [B, M, M] marking the original pixels (i < H and j < W).
  """
  return jax.vmap(_resize_one, in_axes=(0, 0, 0, None))(
    response.astype(jnp.float32),
    jnp.asarray(content_size, jnp.int32),
    jnp.asarray(orig_size, jnp.int32),
    out_size,
  )


def expression_stats(
    response_orig: jnp.ndarray,
    gt: jnp.ndarray,
    region: jnp.ndarray,
    threshold: float | jnp.ndarray,
) -> dict[str, jnp.ndarray]:
  """Per-expression IoU statistics at original resolution.

  The prediction is `response_orig > threshold` restricted to `region`
  (threshold 0.0 for logits, 0.5 for probabilities). See the module
  docstring for edge-case conventions.

  Args:
    response_orig: [B, M, M] response maps at original resolution.
    gt: [B, M, M] ground-truth masks (0/1 or bool).
    region: bool [B, M, M], valid original pixels.
    threshold: Scalar binarisation threshold.

  Returns:
    Dict of [B] arrays: 'intersection' and 'union' (int32 pixel counts),
    'iou' (float32), 'prec_hits' (bool [B, len(PREC_THRESHOLDS_TENTHS)],
    IoU > X), and 'point_hit' (bool, argmax over `region` lies in `gt`).
  """
  pred = (response_orig > threshold) & region
  gt = gt.astype(bool) & region
  intersection = jnp.sum(pred & gt, axis=(1, 2), dtype=jnp.int32)
  union = jnp.sum(pred | gt, axis=(1, 2), dtype=jnp.int32)
  empty = union == 0
  iou = jnp.where(
    empty, 1.0, intersection / jnp.maximum(union, 1).astype(jnp.float32))
  tenths = jnp.asarray(PREC_THRESHOLDS_TENTHS, jnp.int32)
  prec_hits = empty[:, None] | (
    10 * intersection[:, None] > tenths * union[:, None])
  batch = response_orig.shape[0]
  flat_response = jnp.where(region, response_orig, -jnp.inf)
  argmax = jnp.argmax(flat_response.reshape(batch, -1), axis=1)
  point_hit = jnp.take_along_axis(
    gt.reshape(batch, -1), argmax[:, None], axis=1)[:, 0]
  return {
    'intersection': intersection,
    'union': union,
    'iou': iou.astype(jnp.float32),
    'prec_hits': prec_hits,
    'point_hit': point_hit,
  }


@flax.struct.dataclass
class RESMetrics(clu_metrics.Metric):
  """Sums behind mIoU, oIoU, prec@X and PointM; mergeable in any order.

  Only sums are stored, so the result does not depend on how a split is cut
  into batches, devices or hosts. States with a leading axis (e.g. gathered
  from hosts) can be combined with `reduce()`.

  Attributes:
    intersection: int32 [2], Σ|P ∩ G| as (high, low) limbs.
    union: int32 [2], Σ|P ∪ G| as (high, low) limbs.
    iou_sum: float32, Σ IoU.
    prec_hits: int32 [len(PREC_THRESHOLDS_TENTHS)], # expressions IoU > X.
    point_hits: int32, # PointM hits.
    count: int32, # expressions.
  """

  intersection: jnp.ndarray
  union: jnp.ndarray
  iou_sum: jnp.ndarray
  prec_hits: jnp.ndarray
  point_hits: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def empty(cls) -> RESMetrics:
    return cls(
      intersection=jnp.zeros((2,), jnp.int32),
      union=jnp.zeros((2,), jnp.int32),
      iou_sum=jnp.array(0.0, jnp.float32),
      prec_hits=jnp.zeros((len(PREC_THRESHOLDS_TENTHS),), jnp.int32),
      point_hits=jnp.array(0, jnp.int32),
      count=jnp.array(0, jnp.int32),
    )

  @classmethod
  def from_model_output(
      cls,
      response: jnp.ndarray,
      eval_mask: jnp.ndarray,
      orig_size: jnp.ndarray,
      content_size: jnp.ndarray,
      valid: jnp.ndarray,
      threshold: float = 0.0,
      **_,
  ) -> RESMetrics:
    """Scores one batch; works under `jax.jit`.

    Args:
      response: [B, S, S] canvas response maps (higher = more referent).
      eval_mask: [B, M, M] original-resolution ground truth, zero-padded.
      orig_size: int [B, 2], original (H, W).
      content_size: int [B, 2], (h, w) of the content on the canvas.
      valid: [B] bool or 0/1; rows with 0 are padding and count nowhere.
      threshold: Binarisation threshold (0.0 for logits, 0.5 for probs).

    Returns:
      The batch's state. The per-batch pixel sums must fit in int32
      (B * M * M < 2**31).
    """
    maps, region = resize_to_original(
      response, content_size, orig_size, eval_mask.shape[-1])
    stats = expression_stats(maps, eval_mask, region, threshold)
    valid = jnp.asarray(valid).astype(bool)

    def valid_sum(x: jnp.ndarray, dtype: Any) -> jnp.ndarray:
      mask = valid.reshape(valid.shape + (1,) * (x.ndim - 1))
      return jnp.sum(jnp.where(mask, x, 0), axis=0, dtype=dtype)

    return cls(
      intersection=_to_limbs(
        valid_sum(stats['intersection'], jnp.int32)),
      union=_to_limbs(valid_sum(stats['union'], jnp.int32)),
      iou_sum=valid_sum(stats['iou'], jnp.float32),
      prec_hits=valid_sum(stats['prec_hits'], jnp.int32),
      point_hits=valid_sum(stats['point_hit'], jnp.int32),
      count=valid_sum(jnp.ones_like(valid), jnp.int32),
    )

  def merge(self, other: RESMetrics) -> RESMetrics:
    return type(self)(
      intersection=_add_limbs(self.intersection, other.intersection),
      union=_add_limbs(self.union, other.union),
      iou_sum=self.iou_sum + other.iou_sum,
      prec_hits=self.prec_hits + other.prec_hits,
      point_hits=self.point_hits + other.point_hits,
      count=self.count + other.count,
    )

  def compute(self) -> dict[str, float | int]:
    """Final metrics as Python numbers; call on host with concrete state.

    Returns:
      Dict with 'mIoU', 'oIoU', 'prec@0.5' … 'prec@0.9', 'PointM'
      (floats) and 'num_expressions' (int).
    """
    count = int(self.count)
    intersection = _limbs_to_int(self.intersection)
    union = _limbs_to_int(self.union)

    def rate(total: Any) -> float:
      return float(total) / count if count else 0.0

    result = {
      'mIoU': rate(self.iou_sum),
      'oIoU': intersection / union if union else 0.0,
    }
    for key, hits in zip(PREC_KEYS, np.asarray(self.prec_hits)):
      result[key] = rate(hits)
    result['PointM'] = rate(self.point_hits)
    result['num_expressions'] = count
    return result
