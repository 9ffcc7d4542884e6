"""Shatter and Gather (SaG): text-supervised RES with entity slots.

Kim et al., ICCV 2023. With its official options this computes what the
official code (`kdwonn/SaG`, run as its `train_eval_unc.sh`) computes,
checked tensor by tensor against it (tests/test_sag_parity.py):

    image -> ViT -> patch tokens -> Linear(width -> dim)
      '-> entity discovery ("shatter"): K = K_g x K_s slots, slot k drawn
          from Gaussian g; T weight-shared iterations of
            aggregation: pre-LN slot attention over the pixels, keys and
              values LN(features + 2-D sine position), no q/k/v bias,
              softmax over SLOTS then renormalised over pixels,
              S <- S + W_o(A V), then S <- S + MLP(LN S) (exact GELU)
            interaction: self-attention among the K_s slots of a Gaussian
          -> Linear + LayerNorm
    text -> BERT [CLS] -> Linear(hidden -> dim) = x_t
    fusion ("gather"): x_t queries the K slots (pre-LN, softmax over
      slots): z = x_t + MHA(x_t, slots); z = z + MLP(LN z); z / |z|.
      A_fuse = its attention, averaged over heads.
    or, instead (`gather='slot_max'`, not in the official code): slot
      matching, A_fuse = softmax over the slots of cos(x_t, W slot) / tau,
      the image's score their logsumexp (`SlotMatching`).
    mask(p) = sum_k A_fuse[k] A_slot[k, p] on the patch grid (A_slot: the
      last iteration's slot attention, head-averaged), bilinear to the
      image, min-max normalised over the image, thresholded at 0.5.

Every LayerNorm has PyTorch's epsilon 1e-5 and every Linear PyTorch's
default initialisation; dropout (`SaG.dropout`) follows the `train` flag
on the attention outputs and MLPs of aggregation and interaction and on
the fusion's attention output, as in the official layers.

Training fuses every expression with every image of the batch (the C^3
loss in `refseg_jax.losses`), as one batched computation: text [T, dim]
against slots [I, K, dim] gives z [T, I, dim].

Slots are random: the model draws them from the 'slots' rng stream,
which `apply` must be given, at training and at evaluation alike
(the official code resamples them at every forward pass). The train loop
folds the step into its slot key; evaluation uses one fixed key, so that
scores are reproducible (see `refseg_jax.train`).
"""

from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refseg_jax.models import bert
from refseg_jax.models import layers
from refseg_jax.models import pks
from refseg_jax.models import vit

Dtype = Any
_EPS = 1e-8
# PyTorch's LayerNorm epsilon (flax's default is 1e-6).
LAYER_NORM_EPSILON = 1e-5
# The official slot attention renormalises over the pixels with this.
_RENORMALISE_EPS = 1e-7


# The 2-D sine position encodings `sine_position_encoding` lays out.
POSITION_ENCODINGS = ('detr', 'centred')


def sine_position_encoding(height: int, width: int, dim: int,
                           layout: str = 'detr',
                           temperature: float = 10_000.0) -> jax.Array:
  """A 2-D sine position encoding [H * W, dim], row-major over the grid.

  Both layouts put y in the first half of the channels and x in the
  second, each over dim / 4 frequencies temperature ** (-m / (dim / 4)):
    'detr': DETR's `PositionEmbeddingSine(dim // 2, normalize=True)` (the
      official SaG): row i and column j at angles (i + 1) / (H + 1e-6) *
      2 pi and (j + 1) / (W + 1e-6) * 2 pi, sin and cos interleaved
      (channel pair (2m, 2m + 1) at frequency m).
    'centred': this codebase's encoding before the official one: cell
      centres (i + 0.5) / max(H, W) * 2 pi, [sin | cos] blocks per axis.
  """
  if dim % 4:
    raise ValueError(f'Sine position encoding needs dim % 4 == 0, not {dim}.')
  if layout not in POSITION_ENCODINGS:
    raise ValueError(f'Unknown sine position encoding {layout!r}; known: '
                     f'{list(POSITION_ENCODINGS)}.')
  quarter = dim // 4
  frequency = temperature ** (-np.arange(quarter) / quarter)

  def encode(count):  # [count, dim / 2]
    if layout == 'detr':
      angles = ((np.arange(count) + 1) / (count + 1e-6) * 2 * np.pi)[:, None]
      angles = angles * frequency
      return np.stack([np.sin(angles), np.cos(angles)], -1).reshape(count, -1)
    angles = ((np.arange(count) + 0.5) / max(height, width)
              * 2 * np.pi)[:, None] * frequency
    return np.concatenate([np.sin(angles), np.cos(angles)], -1)

  y, x = encode(height), encode(width)  # [H, dim / 2], [W, dim / 2]
  half = dim // 2
  grid = np.concatenate([np.broadcast_to(y[:, None], (height, width, half)),
                         np.broadcast_to(x[None], (height, width, half))], -1)
  return jnp.asarray(grid.reshape(height * width, dim), jnp.float32)


def _symmetric_uniform(bound: float) -> nn.initializers.Initializer:
  """U(-bound, bound)."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


# The initialisations of SaG's own layers, by name (`SaG.initialisation`):
# 'official', PyTorch's (Linear weights and biases U(+-1 / sqrt(in))) and
# the official slot distributions (`_slot_mean_init`); 'from_scratch',
# flax's Dense default (LeCun normal, zero bias) and Gaussians whose means
# are spread as N(0, 1), variances 1 / D, which train the tiny model from
# scratch on ref_shapes far better (docs/results.md, issue 21).
INITIALISATIONS = ('official', 'from_scratch')


def linear(layer: nn.Module, x: jax.Array, features: int, name: str,
           use_bias: bool = True) -> jax.Array:
  """A Linear on x [..., in] inside the compact module `layer` (which
  holds it as `name`), with `layer.dtype` and the `layer.initialisation`
  initialisation (`INITIALISATIONS`); float32 params."""
  if layer.initialisation == 'official':
    inits = dict(kernel_init=nn.initializers.variance_scaling(
        1 / 3, 'fan_in', 'uniform'),
                 bias_init=_symmetric_uniform(x.shape[-1]**-0.5))
  elif layer.initialisation == 'from_scratch':
    inits = {}
  else:
    raise ValueError(f'Unknown SaG initialisation={layer.initialisation!r}; '
                     f'known: {INITIALISATIONS}.')
  return layers.dense(features, layer.dtype, name, use_bias=use_bias,
                      **inits)(x)


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  """A LayerNorm with PyTorch's epsilon."""
  return layers.layer_norm(dtype, name, epsilon=LAYER_NORM_EPSILON)


def _project_heads(layer: nn.Module, x: jax.Array, name: str) -> jax.Array:
  """The linear map `name` of x [..., D] onto the heads of the attention
  `layer` (with `heads`, `head_dim`, `dtype` and `qkv_bias`, the official
  False): [..., heads, head_dim]."""
  return linear(layer, x, layer.heads * layer.head_dim, name,
                use_bias=layer.qkv_bias).reshape(*x.shape[:-1], layer.heads,
                                                 layer.head_dim)


def _attention_output(layer: nn.Module, read: jax.Array, dim: int,
                      train: bool) -> jax.Array:
  """The heads' read [..., heads, head_dim] merged, mapped back to `dim`
  (with bias) and dropped out at `layer.dropout` in training."""
  merged = read.reshape(*read.shape[:-2], -1)
  return nn.Dropout(layer.dropout, deterministic=not train)(
      linear(layer, merged, dim, 'output'))


class _Mlp(nn.Module):
  """dim -> ratio * dim (exact GELU, dropout) -> dim."""
  ratio: int = 4
  dropout: float = 0.0
  initialisation: str = 'official'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    hidden = nn.gelu(linear(self, x, self.ratio * x.shape[-1], 'fc1'),
                     approximate=False)
    hidden = nn.Dropout(self.dropout, deterministic=not train)(hidden)
    return linear(self, hidden, x.shape[-1], 'fc2')


class _SlotAttention(nn.Module):
  """Fields of the attention layers among slots.

  Attributes:
    heads: Attention heads.
    head_dim: Width of each head.
    dropout: On the attention's output and inside its MLP, in training.
    initialisation: Of the layers, one of `INITIALISATIONS`.
    qkv_bias: Biases on the query, key and value maps (the official has
      none).
    dtype: Computation dtype.
  """
  heads: int
  head_dim: int
  dropout: float = 0.0
  initialisation: str = 'official'
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32


class SlotAggregation(_SlotAttention):
  """One aggregation step: slots attend over the pixels, competing for them."""

  @nn.compact
  def __call__(self, slots: jax.Array, inputs: jax.Array, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """slots [B, K, D], normalised inputs [B, N, D] (keys and values)
    -> (slots, attention).

    The attention [B, K, N] is softmaxed over the K slots at each pixel
    (and averaged over heads); the update reads the values with it
    renormalised over the pixels of each slot.
    """
    q = _project_heads(self, layer_norm(self.dtype, 'norm_slots')(slots),
                       'query')
    k = _project_heads(self, inputs, 'key')
    v = _project_heads(self, inputs, 'value')
    logits = jnp.einsum('bkhd,bnhd->bhkn', q, k).astype(jnp.float32)
    attention = jax.nn.softmax(logits / np.sqrt(self.head_dim), axis=2)
    weights = attention / (attention.sum(-1, keepdims=True) + _RENORMALISE_EPS)
    updates = jnp.einsum('bhkn,bnhd->bkhd', weights.astype(self.dtype), v)
    slots = slots + _attention_output(self, updates, slots.shape[-1], train)
    slots = slots + _Mlp(dropout=self.dropout,
                          initialisation=self.initialisation,
                          dtype=self.dtype, name='mlp')(
        layer_norm(self.dtype, 'norm_mlp')(slots), train)
    return slots, attention.mean(1)


class SlotInteraction(_SlotAttention):
  """Self-attention (+ MLP) among the slots drawn from one Gaussian."""

  @nn.compact
  def __call__(self, slots: jax.Array, train: bool) -> jax.Array:
    """[B, K_g, K_s, D] -> [B, K_g, K_s, D]."""
    normed = layer_norm(self.dtype, 'norm_attention')(slots)
    q, k, v = (_project_heads(self, normed, name)
               for name in ('query', 'key', 'value'))
    logits = jnp.einsum('bgqhd,bgkhd->bghqk', q, k).astype(jnp.float32)
    attention = jax.nn.softmax(logits / np.sqrt(self.head_dim), axis=-1)
    read = jnp.einsum('bghqk,bgkhd->bgqhd', attention.astype(self.dtype), v)
    slots = slots + _attention_output(self, read, slots.shape[-1], train)
    return slots + _Mlp(dropout=self.dropout,
                          initialisation=self.initialisation,
                          dtype=self.dtype, name='mlp')(
        layer_norm(self.dtype, 'norm_mlp')(slots), train)


class _EntityHeads(nn.Module, kw_only=True):
  """The attention shapes of entity discovery.

  `EntityDiscovery` and `SaG` (which passes them on) share these fields.
  They are keyword-only, so that a module's own fields come first in its
  constructor (and may go without a default).

  Attributes:
    heads, head_dim: Aggregation attention.
    interaction_heads, interaction_head_dim: Interaction attention.
  """
  heads: int
  head_dim: int
  interaction_heads: int
  interaction_head_dim: int


def _slot_mean_init(key, shape, dtype=jnp.float32):
  """The official Gaussians' means: `xavier_uniform_` of a [1, G, D]
  tensor (fan in G * D, fan out D), here [G, D]."""
  groups, dim = shape
  bound = np.sqrt(6 / ((groups + 1) * dim))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _slot_log_var_init(key, shape, dtype=jnp.float32):
  """The official log-variances: the same draw as the means, plus
  log(1 / D), so that |sigma| is about 1 (`--agg_var_scaling 1`)."""
  return _slot_mean_init(key, shape, dtype) + np.log(1 / shape[1])


def _slot_inits(initialisation: str
                ) -> tuple[nn.initializers.Initializer, ...]:
  """The (mean, log-variance) initialisers of the slot Gaussians."""
  if initialisation == 'official':
    return _slot_mean_init, _slot_log_var_init
  return (nn.initializers.normal(1.0),
          lambda key, shape, dtype=jnp.float32: jnp.full(
              shape, np.log(1 / shape[1]), dtype))


class EntityDiscovery(_EntityHeads):
  """Shatters pixel features into K_g x K_s entity slots.

  Attributes:
    groups: K_g, the number of learned Gaussians.
    slots_per_group: K_s, slots drawn from each.
    iterations: T, weight-shared aggregation + interaction steps.
    dropout: Of the aggregation and interaction layers, in training.
    initialisation: One of `INITIALISATIONS`.
    qkv_bias: Of the aggregation and interaction (see `_SlotAttention`).
    position_after_norm: Keys and values are LayerNorm(features) +
      position, the position added after the norm, not the official
      LayerNorm(features + position).
    remat: Rematerialisation policy of each aggregation and interaction
      step (`layers.REMAT_POLICIES`).
    heads, head_dim, interaction_heads, interaction_head_dim: Keyword-only
      (see `_EntityHeads`).
    dtype: Computation dtype.
  """
  groups: int
  slots_per_group: int
  iterations: int
  dropout: float = 0.0
  initialisation: str = 'official'
  qkv_bias: bool = False
  position_after_norm: bool = False
  remat: str = 'none'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, position: jax.Array, train: bool
               ) -> tuple[jax.Array, jax.Array]:
    """features [B, N, D], position [N, D] -> slots [B, K, D], A_slot [B, K, N].

    Draws the initial slots from the 'slots' rng stream: slot g * K_s + s
    is mean_g + exp(log_var_g / 2) * noise[:, g, s].
    """
    batch, _, dim = features.shape
    mean_init, log_var_init = _slot_inits(self.initialisation)
    mean = self.param('mean', mean_init, (self.groups, dim))
    log_var = self.param('log_var', log_var_init, (self.groups, dim))
    noise = self.draw_noise(batch, dim)
    slots = (mean[:, None] + jnp.exp(0.5 * log_var)[:, None] * noise).reshape(
        batch, -1, dim).astype(self.dtype)
    # Keys and values: LayerNorm(features + position), as the official
    # pre-norm attention normalises its context (or with the position
    # added after the norm).
    position = position.astype(features.dtype)
    norm = layer_norm(self.dtype, 'norm_inputs')
    inputs = (norm(features) + position if self.position_after_norm
              else norm(features + position))
    layer_fields = dict(dropout=self.dropout,
                        initialisation=self.initialisation,
                        qkv_bias=self.qkv_bias, dtype=self.dtype)
    aggregate = layers.remat(SlotAggregation, self.remat, (3,))(
        self.heads, self.head_dim, name='aggregation', **layer_fields)
    interact = layers.remat(SlotInteraction, self.remat, (2,))(
        self.interaction_heads, self.interaction_head_dim, name='interaction',
        **layer_fields)
    for _ in range(self.iterations):
      slots, attention = aggregate(slots, inputs, train)
      slots = interact(slots.reshape(batch, self.groups, -1, dim),
                       train).reshape(batch, -1, dim)
    slots = layer_norm(self.dtype, 'norm_output')(
        linear(self, slots, dim, 'output'))
    return slots, attention


  def draw_noise(self, batch: int, dim: int) -> jax.Array:
    """The standard-normal draw [B, K_g, K_s, D] the initial slots are made
    of, from the 'slots' rng stream (a method, so that a test can put the
    official code's draw in its place with `nn.intercept_methods`)."""
    return jax.random.normal(self.make_rng('slots'), (
        batch, self.groups, self.slots_per_group, dim))


def unit_vectors(x: jax.Array) -> jax.Array:
  """x / max(|x|, 1e-12) along the last axis (`F.normalize`), in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class TextSlotFusion(nn.Module):
  """Gathers slots with the text as the query (one pre-LN layer).

  Attributes:
    heads, head_dim: Attention over the slots.
    dropout: On the attention's output, in training (the official fusion
      layer's MLP has none).
    initialisation: Of the layers, one of `INITIALISATIONS`.
    qkv_bias: Biases on the query, key and value maps (the official has
      none).
    dtype: Computation dtype.
  """
  heads: int = 4
  head_dim: int = 256
  dropout: float = 0.0
  initialisation: str = 'official'
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, slots: jax.Array, paired: bool,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Fuses text [T, D] with slots [I, K, D].

    Args:
      text: [T, D] expression embeddings.
      slots: [I, K, D] the images' slots.
      paired: I == T and text t goes with slots t only; otherwise every
        text is fused with every image.
      train: Dropout on.

    Returns:
      z [T, I', D] (L2-normalised) and A_fuse [T, I', K] (softmax over the
      slots, averaged over heads); I' = 1 when paired, else I.
    """
    q = _project_heads(self, layer_norm(self.dtype, 'norm_text')(text),
                       'query')
    normed = layer_norm(self.dtype, 'norm_slots')(slots)
    k = _project_heads(self, normed, 'key')
    v = _project_heads(self, normed, 'value')
    if paired:  # Text t with slots t: T fusions, laid out as [T, 1, ...].
      logits = jnp.einsum('thd,tkhd->thk', q, k)[:, None]
      gather = lambda a: jnp.einsum('tihk,tkhd->tihd', a, v)
    else:       # Every text with every image: T x I fusions.
      logits = jnp.einsum('thd,ikhd->tihk', q, k)
      gather = lambda a: jnp.einsum('tihk,ikhd->tihd', a, v)
    attention = jax.nn.softmax(
        logits.astype(jnp.float32) / np.sqrt(self.head_dim), axis=-1)
    read = gather(attention.astype(self.dtype))
    z = text[:, None] + _attention_output(self, read, text.shape[-1], train)
    z = z + _Mlp(initialisation=self.initialisation, dtype=self.dtype,
                 name='mlp')(
        layer_norm(self.dtype, 'norm_mlp')(z), train)
    return unit_vectors(z), attention.mean(2)


class SlotMatching(nn.Module):
  """Gathers by matching the text with each slot (multiple instances).

  The alternative to `TextSlotFusion` (`SaG.gather='slot_max'`): each slot
  is embedded on its own, s_{t,i,k} = cos(x_t, W slot_{i,k}) / temperature,
  A_fuse = softmax_k s_{t,i,k} and the image's score is the soft maximum
  logsumexp_k s_{t,i,k}. An image then matches an expression only through
  one of its slots, so C^3 has to find the slot the words describe: the
  fusion layer's query can instead read a mixture of slots that matches
  the image as a whole (README.md has the measured difference).

  Attributes:
    temperature: of the cosine similarities.
    dtype: Computation dtype.
  """
  temperature: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array, slots: jax.Array, paired: bool,
               candidates: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Matches text [T, D] with slots [I, K, D] (`paired` as in
    `TextSlotFusion`); only the slots where bool `candidates` [I, K] is
    True, when given.

    Returns:
      Scores [T, I'] (logsumexp of s over the slots) and A_fuse [T, I', K]
      (softmax of s over the slots); I' = 1 when paired, else I.
    """
    keys = unit_vectors(
        layers.dense(slots.shape[-1], self.dtype, 'slot_embedding')(slots))
    similarity = (jnp.einsum('td,tkd->tk', unit_vectors(text), keys)[:, None]
                  if paired else
                  jnp.einsum('td,ikd->tik', unit_vectors(text), keys))
    logits = similarity / self.temperature
    if candidates is not None:
      logits = jnp.where(candidates[:, None] if paired else candidates[None],
                         logits, -jnp.inf)
    return jax.nn.logsumexp(logits, -1), jax.nn.softmax(logits, -1)


class SlotDecoder(nn.Module):
  """Spatial-broadcast decoder: each slot paints features and an alpha.

  Attributes:
    num_positions: N patch positions.
    features: Width of the reconstructed patch features.
    hidden: Width of the 4-layer ReLU MLP (the official: the slot width).
    initialisation: Of the layers, one of `INITIALISATIONS`.
    dtype: Computation dtype.

  The official decoder adds learned row and column embeddings
  ([x_j | y_i] of two `nn.Embedding(50, D / 2)`); `position` holds their
  sum for each of the N positions (`refseg_jax.models.convert` builds it).
  """
  num_positions: int
  features: int
  hidden: int = 512
  initialisation: str = 'official'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, slots: jax.Array) -> jax.Array:
    """slots [B, K, D] -> reconstruction [B, N, features] (float32)."""
    position = self.param('position', nn.initializers.normal(0.02),
                          (self.num_positions, slots.shape[-1]))
    x = slots[:, :, None] + position.astype(self.dtype)  # [B, K, N, D]
    for i in range(3):
      x = nn.relu(linear(self, x, self.hidden, f'layer_{i}'))
    out = linear(self, x, self.features + 1, 'layer_3').astype(
        jnp.float32)
    alpha = jax.nn.softmax(out[..., -1], axis=1)  # Over the slots.
    return jnp.einsum('bkn,bknf->bnf', alpha, out[..., :-1])


def patch_pixels(images: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """[B, H, W, C] images -> [B, grid_h * grid_w, p_h * p_w * C] patches,
  row-major over the grid, each patch flattened (row, column, channel)."""
  batch, height, width, channels = images.shape
  p_h, p_w = height // grid_h, width // grid_w
  patches = images[:, :grid_h * p_h, :grid_w * p_w].reshape(
      batch, grid_h, p_h, grid_w, p_w, channels).transpose(0, 1, 3, 2, 4, 5)
  return patches.reshape(batch, grid_h * grid_w, p_h * p_w * channels)


def pool_text(encoded: Dict[str, jax.Array], text_mask: jax.Array,
              pooling: str) -> jax.Array:
  """[T, D] expression vectors from `bert.BertEncoder` outputs: the [CLS]
  state ('cls') or the mean of the real tokens' states ('mean')."""
  if pooling == 'cls':
    return encoded['cls']
  if pooling == 'mean':
    weights = text_mask.astype(encoded['hidden'].dtype)[..., None]
    return (encoded['hidden'] * weights).sum(1) / jnp.maximum(
        weights.sum(1), 1.0)
  raise ValueError(f"Unknown SaG text_pooling={pooling!r}; known: "
                   "['cls', 'mean'].")


def content_region(content_size: jax.Array, size: int) -> jax.Array:
  """bool [B, size, size]: the canvas pixels an image of int [B, 2]
  `content_size` (h, w) covers (top-left; the rest is padding)."""
  index = jnp.arange(size)
  return ((index[None, :, None] < content_size[:, 0, None, None])
          & (index[None, None, :] < content_size[:, 1, None, None]))


def min_max_normalise(maps: jax.Array, region: jax.Array) -> jax.Array:
  """Per-example (x - min) / (max - min + 1e-9) of [B, H, W] maps, with
  the minimum and maximum taken over the bool [B, H, W] `region` only."""
  low = jnp.where(region, maps, jnp.inf).min((1, 2), keepdims=True)
  high = jnp.where(region, maps, -jnp.inf).max((1, 2), keepdims=True)
  return (maps - low) / (high - low + 1e-9)


def response_map(mask: jax.Array, size: int,
                 content_size: jax.Array) -> jax.Array:
  """SaG's masks [B, h, w] -> canvas responses [B, size, size] that are
  positive on the predicted referent: bilinear to the canvas, min-max
  normalised over the image (int [B, 2] `content_size` at the top-left;
  never over the padding, so the threshold does not move with the aspect
  ratio), minus the official threshold 0.5."""
  mask = jax.image.resize(mask.astype(jnp.float32),
                          (mask.shape[0], size, size), 'bilinear')
  return min_max_normalise(mask, content_region(content_size, size)) - 0.5


class SaG(bert.TextConditioned, _EntityHeads):
  """Shatter and Gather (see module doc).

  The text vocabulary and encoder, and the computation dtype, are the
  keyword-only fields of `bert.TextConditioned`.

  Attributes:
    vit_preset: Name in `vit.PRESETS`.
    image_size: The side the ViT's position embeddings are laid out for.
    dim: Slot and joint embedding width (512 in the paper).
    groups, slots_per_group, iterations: K_g, K_s, T.
    decoder_hidden: Width of the reconstruction decoder.
    reconstruct: What the slot decoder reconstructs: 'features', the ViT's
      patch tokens (the official code; its ViT is pretrained), or
      'pixels', each patch's normalised pixels, as Slot Attention does: a
      target that a ViT trained from scratch cannot make trivial.
    text_pooling: The expression's vector x_t: 'cls', BERT's [CLS] state
      (the official code; its BERT is pretrained), or 'mean', the mean of
      the token states, which a BERT trained from scratch makes differ
      between expressions from the start (a bag of words). README.md has
      the measured comparison on `ref_shapes`.
    gather: How an expression gathers slots: 'fusion', the official fusion
      layer, scores stopgrad(x_t) . z; or 'slot_max', `SlotMatching`
      (scores are soft maxima over the slots; the text is not detached,
      since it is also the query).
    slot_temperature: `SlotMatching`'s temperature.
    max_slot_area: `SlotMatching` leaves out the slots whose attention
      covers more than this fraction of the image (the smallest slot
      always stays): such a slot is background that, covering everything
      but the objects, encodes the layout, and C^3 otherwise learns to
      match spatial expressions with it. 1.0 keeps every slot.
    drop_path: The ViT's stochastic depth.
    dropout: Of the aggregation, interaction and fusion layers (0.1 in the
      official run), in training.
    image_normalisation: The pixels' mean and std, a name in
      `pks.NORMALISATIONS` ('half', mean = std = 0.5, in the official run).
    initialisation: Of SaG's own layers and slot distributions, one of
      `INITIALISATIONS` ('official' in the official run).
    qkv_bias: Biases on the query, key and value maps of the aggregation,
      interaction and fusion attention (False in the official run).
    position_after_norm: Entity discovery's keys and values are
      LayerNorm(features) + position (see `EntityDiscovery`; False in the
      official run).
    position_encoding: The sine encoding's layout, one of
      `POSITION_ENCODINGS` ('detr' in the official run; see
      `sine_position_encoding`).
    fusion_chunk: Training fuses every expression with every image (T x I
      pairs) this many expressions at a time, each chunk rematerialised
      when `remat` is not 'none', meant to keep the pairs' activations
      from growing as B^2 (what XLA's CPU schedule makes of it:
      docs/training.md); 0 fuses all at once. No number changes (with
      dropout, each chunk draws its own masks).
    heads, head_dim, interaction_heads, interaction_head_dim: Keyword-only,
      see `_EntityHeads`; heads and head_dim also shape the fusion
      attention.
  """
  vit_preset: str
  image_size: int
  dim: int
  groups: int
  slots_per_group: int
  iterations: int
  decoder_hidden: int
  reconstruct: str
  text_pooling: str
  gather: str
  slot_temperature: float
  max_slot_area: float
  drop_path: float
  dropout: float
  image_normalisation: str
  initialisation: str
  qkv_bias: bool
  position_after_norm: bool
  position_encoding: str
  fusion_chunk: int = 0

  @nn.compact
  def __call__(self, images: jax.Array, text_tokens: jax.Array,
               text_mask: jax.Array, train: bool,
               all_pairs: bool = False) -> Dict[str, jax.Array]:
    """Shatters the images, gathers for each expression.

    Args:
      images: uint8 [I, S, S, 3]; grouped batches (k expressions an image,
        image-major as `refseg_jax.models.pks.PKS` reads them) have I =
        T / k.
      text_tokens, text_mask: [T, L].
      train: ViT stochastic depth, BERT's and the slot layers' dropout
        (need a 'dropout' rng).
      all_pairs: Also fuse every expression with every image (training).

    Returns:
      'mask' [T, h, w]: A_fuse . A_slot of each expression on its own
      image's patch grid; 'reconstruction_target' [I, N, F] (see
      `reconstruct`) and 'reconstruction' [I, N, F] (the slot decoder's);
      with all_pairs,
      'scores' [T, I]: stopgrad(x_t) . z_{t,i} ('fusion') or the soft
      maximum over image i's slots ('slot_max').
    """
    pixels = pks.normalise_images(images, self.dtype,
                                  self.image_normalisation)
    tokens = vit.ViT(**vit.PRESETS[self.vit_preset],
                     image_size=self.image_size, drop_path_rate=self.drop_path,
                     dtype=self.dtype, remat=self.remat,
                     scan_layers=self.scan_layers,
                     name='backbone')(pixels, train)
    _, grid_h, grid_w, width = tokens['grid'].shape
    features = linear(self, tokens['tokens'], self.dim, 'visual_projection')
    slots, slot_attention = EntityDiscovery(
        self.groups, self.slots_per_group, self.iterations,
        dropout=self.dropout, initialisation=self.initialisation,
        qkv_bias=self.qkv_bias, position_after_norm=self.position_after_norm,
        remat=self.remat, dtype=self.dtype, heads=self.heads,
        head_dim=self.head_dim,
        interaction_heads=self.interaction_heads,
        interaction_head_dim=self.interaction_head_dim, name='entities')(
            features, sine_position_encoding(grid_h, grid_w, self.dim,
                                             self.position_encoding), train)

    encoded = self.encode_text(text_tokens, text_mask, train)
    text = linear(self, pool_text(encoded, text_mask, self.text_pooling),
                  self.dim, 'text_projection')

    num_texts, num_images = text.shape[0], images.shape[0]
    image_of = jnp.arange(num_texts) // pks.group_size(num_images, num_texts)
    # Both gatherings take (text, slots, paired, extra): the fusion layer's
    # extra is the static `train`, slot matching's its candidate slots.
    if self.gather == 'fusion':
      fusion = layers.remat(TextSlotFusion, self.remat, (3, 4))(
          self.heads, self.head_dim, self.dropout, self.initialisation,
          self.qkv_bias, self.dtype, name='fusion')
      all_extra = own_extra = train
    elif self.gather == 'slot_max':
      fusion = layers.remat(SlotMatching, self.remat, (3,))(
          self.slot_temperature, self.dtype, name='matching')
      area = slot_attention.mean(-1)  # [I, K] fractions of the image.
      all_extra = ((area <= self.max_slot_area)
                   | (area == area.min(-1, keepdims=True)))
      own_extra = all_extra[image_of]
    else:
      raise ValueError(f'Unknown SaG gather={self.gather!r}; known: '
                       "['fusion', 'slot_max'].")
    if all_pairs:
      # Every expression with every image, `fusion_chunk` expressions at a
      # time. The fusion layer returns z, scored against the detached text
      # (so z itself is not kept for the backward pass); slot matching
      # returns the scores themselves.
      scores, fuse = [], []
      for start in range(0, num_texts, self.fusion_chunk or num_texts):
        chunk = text[start:start + (self.fusion_chunk or num_texts)]
        gathered, chunk_fuse = fusion(chunk, slots, False, all_extra)
        scores.append(jnp.einsum(
            'td,tid->ti', jax.lax.stop_gradient(chunk).astype(jnp.float32),
            gathered) if self.gather == 'fusion' else gathered)
        fuse.append(chunk_fuse)
      scores = jnp.concatenate(scores)
      fuse = jnp.concatenate(fuse)[jnp.arange(num_texts), image_of]
    else:
      # Each expression with its own image only: T fusions, not T x I.
      fuse = fusion(text, slots[image_of], True, own_extra)[1][:, 0]
    mask = jnp.einsum('tk,tkn->tn', fuse, slot_attention[image_of])
    if self.reconstruct == 'features':
      target = tokens['tokens']
    elif self.reconstruct == 'pixels':
      target = patch_pixels(pixels, grid_h, grid_w)
    else:
      raise ValueError(f'Unknown SaG reconstruct={self.reconstruct!r}; '
                       "known: ['features', 'pixels'].")
    outputs = {
        'mask': mask.reshape(num_texts, grid_h, grid_w),
        'reconstruction_target': target.astype(jnp.float32),
        # The decoder broadcasts every slot to every patch ([I, K, N,
        # hidden] per layer): the largest activations of the step.
        'reconstruction': layers.remat(SlotDecoder, self.remat)(
            grid_h * grid_w, target.shape[-1], self.decoder_hidden,
            self.initialisation, self.dtype, name='decoder')(slots),
    }
    if all_pairs:
      outputs['scores'] = scores
    return outputs
