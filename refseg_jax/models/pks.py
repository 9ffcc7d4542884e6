"""PKS (position - kernel - segmentation) for referring expression segmentation.

Li et al., TCSVT 2023 (arXiv 2212.10278) released neither text nor code, so
this is OUR FAITHFUL RECONSTRUCTION from the abstract's design: localisation
and segmentation run in parallel, and language only ever reaches the
localisation step.

    image -> ResNet -> FPN neck (stages 2-4 -> stride 8, `dim` channels;
                                 + stage 1 -> stride 4 for the masks)
      |-- position branch: pixel-word attention with the BERT words, then
      |     transformer layers over the grid (relations need the whole
      |     image), centre heatmap logits [B, H, W] and box map [B, H, W, 4]
      |-- kernel branch (vision only): a CondInst kernel per location
      '-- segmentation branch (vision only): mask features [B, H', W', 8]
    kernel at the centre -> dynamic mask head over the mask features
      -> mask logits [B, H, W]

H, W = S / 8; H', W' = S / `mask_stride` (8, or 4 where small objects
need finer masks). Design choices:

* Fusion: pixel-word cross attention (masked by `text_mask`), then an
  element-wise product of the visual features with the attended words, as in
  LAVT's PWAM. The product lets language gate which pixels look like the
  referent; the fused map feeds the position heads only.
* Cells: cell (i, j) of the stride-8 grid spans canvas-normalised
  [i/H, (i+1)/H) x [j/W, (j+1)/W) and sits at ((i+0.5)/H, (j+0.5)/W). A
  point maps to the cell containing it.
* Box map: non-negative (softplus) distances (top, left, bottom, right) from
  each cell's centre to the box edges, in canvas-normalised units (fractions
  of S), so that they do not depend on the canvas size. 'box_at_centre'
  decodes the selected cell into (ymin, xmin, ymax, xmax).
* Dynamic mask head (CondInst): the mask features plus the (y, x) position
  of every cell relative to the centre (canvas-normalised) pass through
  three 1x1 convs 10 -> 8 -> 8 -> 1 (ReLU between), whose 169 weights and
  biases are the kernel (`dynamic_param_count`).
* Mask logits stay at the mask stride: the losses average-pool the ground
  truth to that grid (`refseg_jax.losses`); evaluation upsamples the
  logits bilinearly to S.
* Centre: in training the cell holding the ground-truth centre click (so
  the kernel branch learns from the right location even while the heatmap
  is poor); otherwise the heatmap's argmax cell. Either way the kernel and
  the relative coordinates come from that cell's centre, and no gradient
  flows through the choice.
"""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from refseg_jax.models import bert
from refseg_jax.models import layers
from refseg_jax.models import resnet

Dtype = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CenterNet's heatmap bias: sigmoid(-2.19) = 0.1, so the many negative cells
# do not swamp the focal loss at the start of training.
_HEATMAP_PRIOR_BIAS = -2.19


def dynamic_param_count(in_channels: int = 8, channels: int = 8,
                        layers: int = 3) -> int:
  """Weights + biases of a CondInst dynamic mask head.

  Args:
    in_channels: Mask-feature channels; 2 relative coordinates are appended.
    channels: Width of the hidden 1x1 convs.
    layers: Number of 1x1 convs; the last has one output.

  Returns:
    The kernel length (169 for the CondInst defaults).
  """
  widths = _head_widths(in_channels, channels, layers)
  return sum(i * o + o for i, o in zip(widths[:-1], widths[1:]))


def _head_widths(in_channels: int, channels: int, layers: int) -> list[int]:
  """Channel widths through the dynamic head, input first."""
  return [in_channels + 2] + [channels] * (layers - 1) + [1]


# Per-channel (mean, std) of the [0, 1] pixels, by name: ImageNet's, or
# 0.5 for both, as timm's ViT-S/16 @384 and the official SaG data use.
NORMALISATIONS = {'imagenet': (IMAGENET_MEAN, IMAGENET_STD),
                  'half': ((0.5,) * 3, (0.5,) * 3)}


def normalise_images(images: jax.Array, dtype: Dtype,
                     normalisation: str = 'imagenet') -> jax.Array:
  """uint8 [B, S, S, 3] -> `dtype` images, (x / 255 - mean) / std with the
  mean and std of `NORMALISATIONS[normalisation]`."""
  if normalisation not in NORMALISATIONS:
    raise ValueError(f'Unknown image normalisation {normalisation!r}; known: '
                     f'{sorted(NORMALISATIONS)}.')
  mean, std = NORMALISATIONS[normalisation]
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean)) / jnp.asarray(std)
  return x.astype(dtype)


def cell_centres(height: int, width: int) -> jax.Array:
  """Canvas-normalised (y, x) centres of a grid's cells, [H, W, 2]."""
  ys = (jnp.arange(height) + 0.5) / height
  xs = (jnp.arange(width) + 0.5) / width
  return jnp.stack(jnp.meshgrid(ys, xs, indexing='ij'), axis=-1)


def point_to_cell(points: jax.Array, height: int,
                  width: int) -> tuple[jax.Array, jax.Array]:
  """Row and column [B] of the cells containing canvas-normalised points."""
  iy = jnp.clip(jnp.floor(points[:, 0] * height), 0, height - 1)
  ix = jnp.clip(jnp.floor(points[:, 1] * width), 0, width - 1)
  return iy.astype(jnp.int32), ix.astype(jnp.int32)


def heatmap_peak(heatmap: jax.Array) -> jax.Array:
  """Canvas-normalised (y, x) [B, 2] of the argmax cell's centre."""
  _, height, width = heatmap.shape
  flat = jnp.argmax(heatmap.reshape(heatmap.shape[0], -1), axis=-1)
  iy, ix = jnp.divmod(flat, width)
  return jnp.stack([(iy + 0.5) / height, (ix + 0.5) / width], axis=-1)


def decode_box(box_map: jax.Array, centre: jax.Array) -> jax.Array:
  """(ymin, xmin, ymax, xmax) [B, 4] predicted at the cells of `centre`.

  Args:
    box_map: [B, H, W, 4] distances (top, left, bottom, right) from each
      cell's centre to the box edges, canvas-normalised.
    centre: [B, 2] canvas-normalised (y, x).
  """
  batch, height, width, _ = box_map.shape
  iy, ix = point_to_cell(centre, height, width)
  dist = box_map[jnp.arange(batch), iy, ix]
  anchor = cell_centres(height, width)[iy, ix]
  return jnp.concatenate([anchor - dist[:, :2], anchor + dist[:, 2:]], -1)


def dynamic_mask_head(mask_features: jax.Array, kernel: jax.Array,
                      centre: jax.Array, channels: int = 8,
                      layers: int = 3) -> jax.Array:
  """Applies per-example CondInst 1x1 convs to the mask features.

  Args:
    mask_features: [B, H, W, C] vision-only features.
    kernel: [B, dynamic_param_count(C, channels, layers)], per layer the
      weights ([in, out], row-major) then the biases.
    centre: [B, 2] canvas-normalised (y, x) that the coordinates are
      relative to, so the same kernel can tell its object from look-alikes.
    channels: Hidden width.
    layers: Number of 1x1 convs.

  Returns:
    Mask logits [B, H, W].
  """
  batch, height, width, in_channels = mask_features.shape
  rel = cell_centres(height, width)[None] - centre[:, None, None, :]
  x = jnp.concatenate([mask_features, rel.astype(mask_features.dtype)], -1)
  widths = _head_widths(in_channels, channels, layers)
  offset = 0
  for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
    w = kernel[:, offset:offset + n_in * n_out].reshape(batch, n_in, n_out)
    offset += n_in * n_out
    b = kernel[:, offset:offset + n_out]
    offset += n_out
    x = jnp.einsum('bhwi,bio->bhwo', x, w) + b[:, None, None, :]
    if k < layers - 1:
      x = nn.relu(x)
  return x[..., 0]


class Neck(nn.Module):
  """FPN-like top-down merge of the ResNet stages into stride-8 and -4 maps.

  Attributes:
    dim: Output channels.
    dtype: Computation dtype.
    with_stride4: Also merge stage 1 into a stride-4 map.
  """

  dim: int
  dtype: Dtype = jnp.float32
  with_stride4: bool = False

  @nn.compact
  def __call__(self, features: Dict[str, jax.Array]) -> Dict[int, jax.Array]:
    """{8: [B, S/8, S/8, dim]} (and 4: [B, S/4, S/4, dim]) from the stages."""
    stages = ('stage4', 'stage3', 'stage2') + (
        ('stage1',) if self.with_stride4 else ())
    outputs, x = {}, None
    for stage in stages:
      lateral = layers.conv(self.dim, 1, self.dtype, f'lateral_{stage}')(
          features[stage])
      if x is not None:
        # Resize to the exact lateral shape: stage sizes are rounded up.
        x = jax.image.resize(x, lateral.shape, 'nearest')
        lateral = lateral + x
      x = lateral
      # Stage 2 is the stride-8 level, stage 1 the stride-4 one.
      stride = {'stage2': 8, 'stage1': 4}.get(stage)
      if stride:
        name = 'output' if stride == 8 else 'output_stride4'
        outputs[stride] = nn.relu(
            layers.conv(self.dim, 3, self.dtype, name)(x))
    return outputs


class PixelWordFusion(nn.Module):
  """Pixel-word cross attention and the sentence gate the visual features.

  Attributes:
    dim: Channels of the visual features and of the output.
    dtype: Computation dtype.
  """

  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visual: jax.Array, words: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    """Fuses words [B, L, D] into visual features [B, H, W, dim]."""
    dense = lambda name: layers.dense(self.dim, self.dtype, name)
    q = dense('query')(visual)
    k = dense('key')(words)
    v = dense('value')(words)
    logits = jnp.einsum('bhwd,bld->bhwl', q, k).astype(jnp.float32)
    logits = logits / jnp.sqrt(self.dim) + bert.attention_bias(text_mask)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    context = jnp.einsum('bhwl,bld->bhwd', attn, v)
    # The whole sentence also gates every pixel (FiLM-like): a pixel's own
    # words say what it may be, the sentence which attributes are asked for.
    valid = text_mask.astype(self.dtype)[..., None]
    sentence = (words * valid).sum(1) / jnp.maximum(valid.sum(1), 1)
    gate = (dense('context')(context)
            + dense('sentence')(sentence)[:, None, None, :])
    return nn.relu(dense('output')(visual * gate))


class SpatialContext(nn.Module):
  """Pre-LN transformer encoder layers over the cells of the fused grid.

  Relations ('left of the green star') and absolute locations ('the
  topmost') need the whole image: these layers let every cell see every
  other, with the cell's position added first (a conv stack only knows
  position from padding).

  Attributes:
    layers: Number of encoder layers (0 = position only).
    heads: Attention heads.
    dtype: Computation dtype.
  """

  layers: int
  heads: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, D] -> [B, H, W, D]."""
    batch, height, width, dim = x.shape
    position = layers.dense(dim, self.dtype, 'position')(
        cell_centres(height, width) * 2 - 1)
    x = (x + position).reshape(batch, height * width, dim)
    for i in range(self.layers):
      y = layers.layer_norm(self.dtype, f'ln_attention_{i}')(x)
      x = x + nn.MultiHeadDotProductAttention(
          self.heads, dtype=self.dtype, param_dtype=jnp.float32,
          name=f'attention_{i}')(y, y)
      y = layers.layer_norm(self.dtype, f'ln_mlp_{i}')(x)
      y = nn.gelu(layers.dense(2 * dim, self.dtype, f'mlp_in_{i}')(y))
      x = x + layers.dense(dim, self.dtype, f'mlp_out_{i}')(y)
    return x.reshape(batch, height, width, dim)


def group_size(num_images: int, num_expressions: int) -> int:
  """Expressions per image k of a batch (1 when ungrouped)."""
  if num_expressions % num_images:
    raise ValueError(f'{num_expressions} expressions cannot be split evenly '
                     f'over {num_images} images.')
  return num_expressions // num_images


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """x in the forward pass; the gradient through it times `scale`."""
  if scale == 1.0:
    return x
  return scale * x + (1.0 - scale) * jax.lax.stop_gradient(x)


def _head(x: jax.Array, dim: int, out: int, dtype: Dtype, name: str,
          **out_kwargs: Any) -> jax.Array:
  """3x3 conv + ReLU + 1x1 conv prediction head (`out_kwargs`: its init)."""
  x = nn.relu(layers.conv(dim, 3, dtype, f'{name}_conv')(x))
  return layers.conv(out, 1, dtype, f'{name}_out', **out_kwargs)(x)


class PKS(bert.TextConditioned):
  """PKS referring segmentation model (our reconstruction; see module doc).

  The text vocabulary and encoder, and the computation dtype, are the
  keyword-only fields of `bert.TextConditioned`.

  Attributes:
    resnet_preset: Name in `resnet.PRESETS`.
    dim: Channels of the neck and branch features.
    mask_channels: Channels of the mask features and dynamic head.
    mask_layers: Number of 1x1 convs in the dynamic head.
    mask_stride: Stride of the mask features and logits, 8 or 4 (the neck
      then also merges ResNet stage 1).
    context_layers: Transformer layers over the fused grid before the
      position heads (`SpatialContext`).
    mask_trunk_gradient: Scale of the mask losses' gradient into the shared
      backbone and neck (1 = unscaled; weak mask losses are noisier).
    kernel_init_std: Standard deviation of the normal initialisation of
      the layer that generates the dynamic mask kernels (CondInst: 0.01).
    frozen_bn: Always use the ResNet's BN running averages.
  """

  resnet_preset: str
  dim: int
  mask_channels: int
  mask_layers: int
  mask_stride: Literal[4, 8]
  context_layers: int
  mask_trunk_gradient: float
  kernel_init_std: float
  frozen_bn: bool

  def __post_init__(self):
    if self.mask_stride not in (4, 8):
      raise ValueError(f'PKS mask_stride must be 4 or 8, not '
                       f'{self.mask_stride}.')
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, text_tokens: jax.Array,
               text_mask: jax.Array, train: bool,
               centre: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    """Predicts the referent's position and mask.

    Args:
      images: uint8 [B, S, S, 3], or [B / k, S, S, 3] for batches grouped
        by image: then expressions k * i ... k * i + k - 1 refer to image i.
      text_tokens: int [B, L].
      text_mask: [B, L], 1 for real tokens.
      train: Batch-statistics BN (needs `mutable=['batch_stats']` unless
        `frozen_bn`) and BERT dropout (needs a 'dropout' rng).
      centre: [B, 2] canvas-normalised (y, x) where the kernel is taken
        (the ground-truth centre click in training); None = heatmap argmax.

    Returns:
      float32 'heatmap' logits [B, H, W]; 'box' distance map [B, H, W, 4];
      'box_at_centre' (ymin, xmin, ymax, xmax) [B, 4]; 'centre' [B, 2];
      'mask_logits' [B, H', W'] and 'mask_features' [B, H', W',
      mask_channels]. H, W = S / 8; H', W' = S / mask_stride.
    """
    features = resnet.ResNet(
        **resnet.PRESETS[self.resnet_preset], dtype=self.dtype,
        frozen_bn=self.frozen_bn, remat=self.remat,
        scan_layers=self.scan_layers, name='backbone')(
            normalise_images(images, self.dtype), train)
    levels = Neck(self.dim, self.dtype, self.mask_stride == 4,
                  name='neck')(features)
    visual = levels[8]
    words = self.encode_text(text_tokens, text_mask, train)['hidden']

    # Grouped batches (k expressions per image, image-major): the image side
    # ran once per image; each expression reads its image's features.
    group = group_size(images.shape[0], text_tokens.shape[0])
    image_of = jnp.arange(text_tokens.shape[0]) // group
    fused = PixelWordFusion(self.dim, self.dtype, name='fusion')(
        visual[image_of], words, text_mask)
    fused = SpatialContext(self.context_layers, dtype=self.dtype,
                           name='context')(fused)
    heatmap = _head(fused, self.dim, 1, self.dtype, 'heatmap',
                    bias_init=nn.initializers.constant(_HEATMAP_PRIOR_BIAS))
    heatmap = heatmap[..., 0].astype(jnp.float32)
    box = nn.softplus(
        _head(fused, self.dim, 4, self.dtype, 'box').astype(jnp.float32))

    # Language never reaches these two vision-only branches.
    n_kernel = dynamic_param_count(self.mask_channels, self.mask_channels,
                                   self.mask_layers)
    # CondInst's controller init (normal, std 0.01): small dynamic weights
    # start the mask logits near 0, where every mask loss has a gradient
    # (lecun-normal kernels start them at |logit| ~ 10, saturated).
    trunk = lambda x: scale_gradient(x, self.mask_trunk_gradient)
    kernels = _head(trunk(visual), self.dim, n_kernel, self.dtype, 'kernel',
                    kernel_init=nn.initializers.normal(self.kernel_init_std))
    mask_features = _head(trunk(levels[self.mask_stride]), self.dim,
                          self.mask_channels, self.dtype, 'mask')

    if centre is None:
      centre = heatmap_peak(heatmap)
    iy, ix = point_to_cell(centre.astype(jnp.float32), *heatmap.shape[1:])
    # The centre of the chosen cell, as at inference (the heatmap peak is a
    # cell): the relative coordinates the mask head learns from must be the
    # ones it will see.
    centre = cell_centres(*heatmap.shape[1:])[iy, ix]
    kernel = kernels[image_of, iy, ix]
    mask_features = mask_features[image_of]
    mask_logits = dynamic_mask_head(mask_features, kernel, centre,
                                    self.mask_channels, self.mask_layers)
    return {
        'heatmap': heatmap,
        'box': box,
        'box_at_centre': decode_box(box, centre),
        'mask_logits': mask_logits.astype(jnp.float32),
        'mask_features': mask_features.astype(jnp.float32),
        'centre': centre,
    }
