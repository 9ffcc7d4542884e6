"""ResNet v1.5 backbones (torchvision layout) returning multi-scale features.

v1.5 means the stride of a downsampling bottleneck block sits in its 3x3 conv
(as in torchvision), not in the first 1x1 conv.

Name scheme (for converters): a torchvision parameter name maps to a Flax path
by replacing the `.` that precedes a container index with `_` and the
remaining `.` with `/`:

  conv1.weight                     -> params/conv1/kernel
  bn1.{weight,bias}                -> params/bn1/{scale,bias}
  bn1.{running_mean,running_var}   -> batch_stats/bn1/{mean,var}
  layer{s}.{i}.conv{j}.weight      -> params/layer{s}_{i}/conv{j}/kernel
  layer{s}.{i}.bn{j}.*             -> {params,batch_stats}/layer{s}_{i}/bn{j}/*
  layer{s}.{i}.downsample.0.weight -> params/layer{s}_{i}/downsample_0/kernel
  layer{s}.{i}.downsample.1.*      -> .../layer{s}_{i}/downsample_1/*

Conv kernels are HWIO (torch OIHW needs a transpose). There is no `fc`: the
backbone ends at `layer4`. Hugging Face `ResNetModel` names map onto the same
scheme (embedder -> conv1/bn1, encoder.stages.{s-1}.layers.{i} ->
layer{s}_{i}, shortcut -> downsample_0/1).

Normalisation: `nn.BatchNorm` with torchvision's epsilon and momentum. By
default it uses batch statistics when `train=True` and running averages
otherwise; `frozen_bn=True` always uses the running averages (and never
updates them), the usual choice when fine-tuning for RES with small
per-device batches. Freezing BN scale/bias is left to the optimizer.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from refseg_jax.models import layers

Dtype = Any

PRESETS: Dict[str, Dict[str, Any]] = {
  'tiny': dict(block='basic', stage_sizes=(1, 1, 1, 1),
               widths=(16, 32, 64, 128)),
  'resnet18': dict(block='basic', stage_sizes=(2, 2, 2, 2),
                   widths=(64, 128, 256, 512)),
  'resnet34': dict(block='basic', stage_sizes=(3, 4, 6, 3),
                   widths=(64, 128, 256, 512)),
  'resnet50': dict(block='bottleneck', stage_sizes=(3, 4, 6, 3),
                   widths=(64, 128, 256, 512)),
  'resnet101': dict(block='bottleneck', stage_sizes=(3, 4, 23, 3),
                    widths=(64, 128, 256, 512)),
}

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _layers(dtype: Dtype, frozen_bn: bool, train: bool):
  """Returns `(conv, bn)` layer constructors bound to the shared settings."""

  def conv(features: int, kernel: int, stride: int = 1,
           name: str | None = None) -> nn.Conv:
    # Explicit symmetric padding like torch; 'SAME' pads asymmetrically for
    # stride 2 and would break weight compatibility with torchvision.
    pad = kernel // 2
    return layers.conv(features, kernel, dtype, name,
                       strides=(stride, stride),
                       padding=((pad, pad), (pad, pad)), use_bias=False,
                       kernel_init=_CONV_INIT)

  def bn(name: str | None = None) -> nn.BatchNorm:
    # torch momentum 0.1 == Flax momentum 0.9.
    return nn.BatchNorm(use_running_average=frozen_bn or not train,
                        momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)

  return conv, bn


class _Block(nn.Module):
  """Fields shared by the residual blocks.

  Attributes:
    width: Output channels (BasicBlock) or inner channels (Bottleneck, whose
      output has `4 * width`).
    stride: Spatial stride of the block's 3x3 conv.
    dtype: Computation dtype.
    frozen_bn: Always use BN running averages.
  """

  width: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  frozen_bn: bool = False


class BasicBlock(_Block):
  """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block to NHWC `x`."""
    conv, bn = _layers(self.dtype, self.frozen_bn, train)
    y = nn.relu(bn(name='bn1')(conv(self.width, 3, self.stride, 'conv1')(x)))
    y = bn(name='bn2')(conv(self.width, 3, name='conv2')(y))
    return nn.relu(y + _shortcut(x, self.width, self.stride, conv, bn))


class Bottleneck(_Block):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs with 4x channel expansion."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the block to NHWC `x`."""
    conv, bn = _layers(self.dtype, self.frozen_bn, train)
    out = 4 * self.width
    y = nn.relu(bn(name='bn1')(conv(self.width, 1, name='conv1')(x)))
    y = nn.relu(bn(name='bn2')(conv(self.width, 3, self.stride, 'conv2')(y)))
    y = bn(name='bn3')(conv(out, 1, name='conv3')(y))
    return nn.relu(y + _shortcut(x, out, self.stride, conv, bn))


def _shortcut(x: jax.Array, features: int, stride: int, conv, bn) -> jax.Array:
  """Identity, or a strided 1x1 conv + BN when the shape changes."""
  if stride == 1 and x.shape[-1] == features:
    return x
  return bn(name='downsample_1')(conv(features, 1, stride, 'downsample_0')(x))


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ResNet(nn.Module):
  """ResNet backbone returning the outputs of its four stages.

  Attributes:
    block: 'basic' or 'bottleneck'.
    stage_sizes: Number of blocks per stage.
    widths: Block width per stage; the stem has `widths[0]` channels.
    dtype: Computation dtype; parameters are always float32.
    frozen_bn: Always use BN running averages (see module docstring).
    remat: Rematerialisation policy of each residual block
      (`layers.REMAT_POLICIES`).
    scan_layers: Run the blocks after the first of each stage as one scan
      (`layers.stack_blocks`): `layer{s}_0`, then `layer{s}` stacked.
  """

  block: str
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  dtype: Dtype = jnp.float32
  frozen_bn: bool = False
  remat: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    """Computes multi-scale features.

    Args:
      images: Normalised float images [B, H, W, 3].
      train: Whether BN uses (and updates) batch statistics; then
        `mutable=['batch_stats']` is needed unless `frozen_bn`.

    Returns:
      {'stage1': [B, H/4, W/4, C1], 'stage2': stride 8, 'stage3': stride 16,
      'stage4': stride 32}, NHWC in `dtype` (sizes rounded up).
    """
    conv, bn = _layers(self.dtype, self.frozen_bn, train)
    x = nn.relu(bn(name='bn1')(conv(self.widths[0], 7, 2, 'conv1')(images)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = _BLOCKS[self.block]
    features = {}
    for s, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      # Block 0 changes the shape (stride, channels); the others repeat.
      x = layers.remat(block_cls, self.remat, static_argnums=(2,))(
          width, 2 if s > 0 else 1, self.dtype, self.frozen_bn,
          name=f'layer{s + 1}_0')(x, train)
      x = layers.stack_blocks(
          block_cls, dict(width=width, stride=1, dtype=self.dtype,
                          frozen_bn=self.frozen_bn), x, (train,),
          depth=size - 1, name=f'layer{s + 1}', remat_policy=self.remat,
          scan=self.scan_layers, static_argnums=(2,), first_index=1)
      features[f'stage{s + 1}'] = x
    return features
