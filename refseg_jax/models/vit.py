"""Plain Vision Transformer backbones (timm `vit_*_patch16_*` architecture).

Patch-embedding conv, a class token, learned absolute position embeddings,
pre-LN blocks (multi-head self-attention + GELU MLP, both with stochastic
depth) and a final LayerNorm. There is no classification head.

Name scheme (for converters) mirrors timm: `.` becomes `/` and the block
index is joined with `_`:

  patch_embed.proj.{weight,bias}  -> patch_embed/proj/{kernel,bias}
  cls_token, pos_embed            -> cls_token, pos_embed (same shapes)
  blocks.{i}.norm{1,2}.*          -> blocks_{i}/norm{1,2}/{scale,bias}
  blocks.{i}.attn.{qkv,proj}.*    -> blocks_{i}/attn/{qkv,proj}/{kernel,bias}
  blocks.{i}.mlp.{fc1,fc2}.*      -> blocks_{i}/mlp/{fc1,fc2}/{kernel,bias}
  norm.*                          -> norm/{scale,bias}

With `scan_layers` the blocks are one scanned `blocks/...`, each leaf with
a leading [depth] axis (the converter stacks the `blocks_{i}`).

Linear kernels are (in, out) (torch weights need a transpose); the patch
kernel is HWIO. `pos_embed` is [1, 1 + gh * gw, D] with the class token's
position first, as in timm.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refseg_jax.models import layers

Dtype = Any
Grid = Tuple[int, int]

PRESETS: Dict[str, Dict[str, Any]] = {
  'tiny': dict(width=64, depth=2, num_heads=2, patch_size=8),
  'ti16': dict(width=192, depth=12, num_heads=3, patch_size=16),
  's16': dict(width=384, depth=12, num_heads=6, patch_size=16),
  'b16': dict(width=768, depth=12, num_heads=12, patch_size=16),
}

# timm's trunc_normal_(std=0.02) for linears and embeddings.
_INIT = nn.initializers.truncated_normal(0.02)


def _linear_resize_matrix(old: int, new: int) -> np.ndarray:
  """[new, old] matrix of 1-D linear interpolation with aligned corners."""
  if old == 1 or new == 1:
    # Degenerate grids: replicate (upsampling) or average (downsampling).
    return np.full((new, old), 1.0 / old)
  pos = np.arange(new) * (old - 1) / (new - 1)
  lo = np.minimum(np.floor(pos).astype(int), old - 2)
  frac = pos - lo
  matrix = np.zeros((new, old))
  matrix[np.arange(new), lo] = 1.0 - frac
  matrix[np.arange(new), lo + 1] = frac
  return matrix


def interpolate_pos_embed(pos_embed: jax.Array, old_grid: Grid,
                          new_grid: Grid,
                          num_prefix_tokens: int = 0) -> jax.Array:
  """Bilinearly resizes position embeddings laid out on a row-major grid.

  Corners are aligned (grid point i of n sits at i / (n - 1)), so the
  resize is exact on embeddings that are linear in the grid coordinates and
  the identity when the grids match.

  Args:
    pos_embed: [..., num_prefix_tokens + old_h * old_w, D].
    old_grid: (old_h, old_w) of `pos_embed`.
    new_grid: (new_h, new_w) to resize to.
    num_prefix_tokens: Leading tokens (e.g. the class token, as stored by
      timm) copied unchanged.

  Returns:
    [..., num_prefix_tokens + new_h * new_w, D] in the dtype of `pos_embed`.
  """
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if old_grid == new_grid:
    return pos_embed
  prefix = pos_embed[..., :num_prefix_tokens, :]
  grid = pos_embed[..., num_prefix_tokens:, :]
  grid = grid.reshape(*grid.shape[:-2], *old_grid, grid.shape[-1])
  rows = jnp.asarray(_linear_resize_matrix(old_grid[0], new_grid[0]),
                     jnp.float32)
  cols = jnp.asarray(_linear_resize_matrix(old_grid[1], new_grid[1]),
                     jnp.float32)
  grid = jnp.einsum('yh,xw,...hwd->...yxd', rows, cols,
                    grid.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
  grid = grid.reshape(*grid.shape[:-3], -1, grid.shape[-1])
  return jnp.concatenate([prefix, grid.astype(pos_embed.dtype)], axis=-2)


class DropPath(nn.Module):
  """Per-example stochastic depth on a residual branch."""

  @nn.compact
  def __call__(self, x: jax.Array, rate: float | jax.Array,
               train: bool) -> jax.Array:
    """Zeroes `x` for dropped examples and rescales the kept ones.

    `rate`, the probability of dropping the branch for an example, may be
    traced (a block's rate inside a scan over blocks); a Python 0.0 draws
    nothing.
    """
    if not train or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (timm layout).

  Attributes:
    num_heads: Number of attention heads.
    dtype: Computation dtype.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Attends over the tokens of `x` [B, N, D]."""
    b, n, d = x.shape
    qkv = _dense(3 * d, self.dtype, 'qkv')(x)
    # timm splits the fused output as (3, heads, head_dim).
    q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).transpose(2, 0, 1, 3, 4)
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k) / np.sqrt(q.shape[-1])
    # Softmax in float32 for stability under bf16 computation.
    weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
    y = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, n, d)
    return _dense(d, self.dtype, 'proj')(y)


class Mlp(nn.Module):
  """Two-layer GELU MLP.

  Attributes:
    hidden: Hidden width.
    dtype: Computation dtype.
  """

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies fc1 -> exact GELU (as torch nn.GELU) -> fc2."""
    y = nn.gelu(_dense(self.hidden, self.dtype, 'fc1')(x), approximate=False)
    return _dense(x.shape[-1], self.dtype, 'fc2')(y)


class Block(nn.Module):
  """Pre-LN transformer block.

  Attributes:
    num_heads: Attention heads.
    mlp_ratio: MLP hidden width over model width.
    dtype: Computation dtype.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool,
               drop_path: float | jax.Array = 0.0) -> jax.Array:
    """Applies attention and MLP residual branches to `x` [B, N, D], each
    dropped (in training) with probability `drop_path` (see `DropPath`)."""
    drop = DropPath()
    y = Attention(self.num_heads, self.dtype, name='attn')(
        _layer_norm(self.dtype, 'norm1')(x))
    x = x + drop(y, drop_path, train)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name='mlp')(
        _layer_norm(self.dtype, 'norm2')(x))
    return x + drop(y, drop_path, train)


class PatchEmbed(nn.Module):
  """Non-overlapping patch projection.

  Attributes:
    width: Output width D.
    patch_size: Square patch size p.
    dtype: Computation dtype.
  """

  width: int
  patch_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Maps [B, H, W, C] images to a [B, H/p, W/p, D] token grid."""
    p = self.patch_size
    return layers.conv(self.width, p, self.dtype, 'proj', strides=(p, p),
                       padding='VALID')(images)


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """A linear layer with timm's trunc_normal(0.02) kernel init."""
  return layers.dense(features, dtype, name, kernel_init=_INIT)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  """A LayerNorm with timm ViTs' eps of 1e-6."""
  return layers.layer_norm(dtype, name, epsilon=1e-6)


def _as_grid(size: Union[int, Sequence[int]]) -> Grid:
  return (size, size) if isinstance(size, int) else tuple(size)


class ViT(nn.Module):
  """Vision Transformer backbone.

  Attributes:
    width: Token width D.
    depth: Number of blocks.
    num_heads: Attention heads.
    patch_size: Square patch size p.
    image_size: (H, W) or side the position embeddings are laid out for;
      other input sizes interpolate them (see `interpolate_pos_embed`).
    mlp_ratio: MLP hidden width over D.
    drop_path_rate: Stochastic depth of the last block; it rises linearly
      from 0 at the first block (timm convention). Needs an rng named
      'dropout' when `train=True`.
    dtype: Computation dtype; parameters are always float32.
    remat: Rematerialisation policy of each block, one of
      `layers.REMAT_POLICIES` ('none': keep every activation).
    scan_layers: Run the blocks as one scan, their parameters stacked
      under `blocks` (see `layers.stack_blocks`) instead of `blocks_{i}`.
  """

  width: int
  depth: int
  num_heads: int
  patch_size: int = 16
  image_size: Union[int, Sequence[int]] = 224
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  remat: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> Dict[str, jax.Array]:
    """Encodes images into patch tokens.

    Args:
      images: Normalised float images [B, H, W, 3]; a border that does not
        fill a whole patch is ignored.
      train: Enables stochastic depth.

    Returns:
      {'tokens': [B, N, D] patch tokens (no class token), 'cls': [B, D],
      'grid': the patch tokens as [B, H/p, W/p, D]}, all after the final
      LayerNorm, in `dtype`.
    """
    x = PatchEmbed(self.width, self.patch_size, self.dtype,
                   name='patch_embed')(images)
    b, gh, gw, d = x.shape
    config_grid = tuple(s // self.patch_size for s in _as_grid(self.image_size))
    pos_embed = self.param('pos_embed', _INIT,
                           (1, 1 + config_grid[0] * config_grid[1], d),
                           jnp.float32)
    pos_embed = interpolate_pos_embed(pos_embed, config_grid, (gh, gw),
                                      num_prefix_tokens=1)
    cls = self.param('cls_token', _INIT, (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype),
                         x.reshape(b, gh * gw, d)], axis=1)
    x = x + pos_embed.astype(x.dtype)
    # Stochastic depth rises linearly over the blocks (none: no draws).
    rates = ((np.linspace(0.0, self.drop_path_rate, self.depth),)
             if self.drop_path_rate else ())
    x = layers.stack_blocks(
        Block, dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    dtype=self.dtype), x, (train,), rates, depth=self.depth,
        name='blocks', remat_policy=self.remat, scan=self.scan_layers,
        static_argnums=(2,))
    x = _layer_norm(self.dtype, 'norm')(x)
    tokens = x[:, 1:]
    return {'tokens': tokens, 'cls': x[:, 0],
            'grid': tokens.reshape(b, gh, gw, d)}
