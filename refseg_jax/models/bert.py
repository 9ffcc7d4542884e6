"""A BERT text encoder in Flax linen.

Same architecture as Hugging Face `BertModel` (post-LN Transformer encoder,
exact-erf GELU, LayerNorm eps 1e-12, tanh pooler on [CLS]).

Parameters are named so that a Hugging Face state dict maps onto them by a
simple rule. For an HF key such as
`encoder.layer.3.attention.self.query.weight`:

1. Drop a `bert.` prefix if present (checkpoints of `BertFor*` models).
2. `encoder.layer.{i}.` becomes `encoder/layer_{i}/`; every other `.` is `/`.
3. The leaf is renamed by the kind of module that owns it:
   * `nn.Linear` `weight` -> `kernel`, TRANSPOSED (torch stores [out, in],
     flax [in, out]);
   * `nn.Embedding` `weight` -> `embedding` (the `*_embeddings` modules);
   * `LayerNorm` `weight` / `gamma` -> `scale`, `bias` / `beta` -> `bias`;
   * `bias` -> `bias`.

So the key above is `params/encoder/layer_3/attention/self/query/kernel`.
The buffer `embeddings.position_ids` and task heads (`cls.*`, ...) have no
counterpart here.

Tokens carry no segment ids: every token has token type 0, as for a single
referring expression.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from refseg_jax.models import layers

BERT_VOCAB_SIZE = 30522


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (names follow HF `BertConfig`).

  Attributes:
    vocab_size: Number of word-piece (or word) ids.
    hidden_size: Width D of the hidden states.
    num_hidden_layers: Number of encoder layers.
    num_attention_heads: Number of heads; must divide `hidden_size`.
    intermediate_size: Width of the feed-forward hidden layer.
    max_position_embeddings: Longest sequence the model accepts.
    type_vocab_size: Number of token types (segments).
    hidden_dropout_prob: Dropout on embeddings and on each residual branch.
    attention_probs_dropout_prob: Dropout on the attention probabilities.
    layer_norm_eps: LayerNorm epsilon.
    initializer_range: Standard deviation of the normal weight init.
  """
  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02


PRESETS = {
    'tiny': BertConfig(BERT_VOCAB_SIZE, 64, 2, 2, 128),
    'mini': BertConfig(BERT_VOCAB_SIZE, 256, 4, 4, 1024),
    'small': BertConfig(BERT_VOCAB_SIZE, 512, 4, 8, 2048),
    'base': BertConfig(BERT_VOCAB_SIZE, 768, 12, 12, 3072),
}


def preset(name: str, vocab_size: int = BERT_VOCAB_SIZE,
           dropout: float | None = None, **overrides: Any) -> BertConfig:
  """The preset `name` of `PRESETS` with its vocabulary size set.

  Args:
    name: One of 'tiny', 'mini', 'small', 'base'.
    vocab_size: Vocabulary size (BERT's 30522 by default; ref_shapes has 43).
    dropout: Both dropout rates (hidden and attention); None keeps the
      preset's (0.1).
    **overrides: Further `BertConfig` fields to replace.

  Returns:
    The config.
  """
  if dropout is not None:
    overrides.update(hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
  return dataclasses.replace(PRESETS[name], vocab_size=vocab_size, **overrides)


def attention_bias(text_mask: jnp.ndarray) -> jnp.ndarray:
  """Additive attention bias [B, 1, 1, L] from a [B, L] mask (1 = real).

  Float32 and the most negative finite value, as HF does: exp() of a masked
  logit underflows to exactly 0, and a fully masked row stays finite.
  """
  neg = jnp.finfo(jnp.float32).min
  bias = (1.0 - text_mask.astype(jnp.float32)) * neg
  return bias[:, None, None, :]


def _dense(config: BertConfig, features: int, dtype: Any,
           name: str) -> nn.Dense:
  """A linear layer with BERT's normal(initializer_range) kernel init."""
  return layers.dense(
      features, dtype, name,
      kernel_init=nn.initializers.normal(config.initializer_range))


def _layer_norm(config: BertConfig, dtype: Any) -> nn.LayerNorm:
  """BERT's LayerNorm (HF module name `LayerNorm`, eps `layer_norm_eps`)."""
  return layers.layer_norm(dtype, 'LayerNorm', epsilon=config.layer_norm_eps)


def _embed(config: BertConfig, num: int, dtype: Any, name: str) -> nn.Embed:
  return nn.Embed(
      num,
      config.hidden_size,
      dtype=dtype,
      param_dtype=jnp.float32,
      embedding_init=nn.initializers.normal(config.initializer_range),
      name=name)


class _BertModule(nn.Module):
  """Fields every BERT module shares: the architecture and compute dtype."""
  config: BertConfig
  dtype: Any = jnp.float32


class BertEmbeddings(_BertModule):
  """LayerNorm(word + position + token-type embeddings), then dropout."""

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool) -> jnp.ndarray:
    """Embeds int tokens [B, L] into [B, L, D]."""
    cfg = self.config
    length = tokens.shape[1]
    words = _embed(cfg, cfg.vocab_size, self.dtype, 'word_embeddings')(tokens)
    positions = _embed(cfg, cfg.max_position_embeddings, self.dtype,
                       'position_embeddings')(jnp.arange(length)[None])
    types = _embed(cfg, cfg.type_vocab_size, self.dtype,
                   'token_type_embeddings')(jnp.zeros_like(tokens))
    x = _layer_norm(cfg, self.dtype)(words + positions + types)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=not train)


class BertSelfAttention(_BertModule):
  """Multi-head scaled dot-product self-attention (HF `attention.self`)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray,
               train: bool) -> jnp.ndarray:
    """Attends [B, L, D] to itself under the additive `bias` [B, 1, 1, L]."""
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads

    def split(name):  # [B, L, D] -> [B, L, H, Dh], as HF's view().
      y = _dense(cfg, cfg.hidden_size, self.dtype, name)(x)
      return y.reshape(y.shape[:2] + (heads, head_dim))

    q, k, v = split('query'), split('key'), split('value')
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim)
    # Softmax in float32 for bf16 stability; the bias is float32 anyway.
    probs = nn.softmax(logits.astype(jnp.float32) + bias).astype(self.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
        probs, deterministic=not train)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return out.reshape(x.shape[:2] + (cfg.hidden_size,))


class BertResidualOutput(_BertModule):
  """LayerNorm(residual + dropout(dense(x))): HF `*.output` blocks."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, residual: jnp.ndarray,
               train: bool) -> jnp.ndarray:
    """Projects `x` to D and adds it to `residual` [B, L, D] (post-LN)."""
    cfg = self.config
    y = _dense(cfg, cfg.hidden_size, self.dtype, 'dense')(x)
    y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=not train)
    return _layer_norm(cfg, self.dtype)(residual + y)


class BertIntermediate(_BertModule):
  """gelu(dense(x)), the feed-forward expansion (HF `intermediate`)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Maps [B, L, D] to [B, L, intermediate_size]."""
    cfg = self.config
    h = _dense(cfg, cfg.intermediate_size, self.dtype, 'dense')(x)
    return nn.gelu(h, approximate=False)  # BERT's exact erf GELU.


class BertAttention(_BertModule):
  """Self-attention and its residual output (HF `attention`)."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray,
               train: bool) -> jnp.ndarray:
    """Maps [B, L, D] to [B, L, D]."""
    y = BertSelfAttention(self.config, self.dtype, name='self')(x, bias, train)
    return BertResidualOutput(self.config, self.dtype, name='output')(
        y, x, train)


class BertLayer(_BertModule):
  """One post-LN encoder layer: attention, then the GELU feed-forward."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray,
               train: bool) -> jnp.ndarray:
    """Maps [B, L, D] to [B, L, D]."""
    cfg = self.config
    x = BertAttention(cfg, self.dtype, name='attention')(x, bias, train)
    h = BertIntermediate(cfg, self.dtype, name='intermediate')(x)
    return BertResidualOutput(cfg, self.dtype, name='output')(h, x, train)


class BertLayerStack(_BertModule):
  """The encoder layers `layer_0` ... `layer_{n-1}` (HF `encoder`), each
  rematerialised by the `remat` policy (`layers.REMAT_POLICIES`); with
  `scan_layers`, one scan over the layers, stacked under `layer`
  (`layers.stack_blocks`)."""
  remat: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, bias: jnp.ndarray,
               train: bool) -> jnp.ndarray:
    """Maps [B, L, D] to [B, L, D]."""
    return layers.stack_blocks(
        BertLayer, dict(config=self.config, dtype=self.dtype), x,
        (bias, train), depth=self.config.num_hidden_layers, name='layer',
        remat_policy=self.remat, scan=self.scan_layers, static_argnums=(3,))


class BertPooler(_BertModule):
  """tanh(dense(hidden[:, 0])): HF `pooler`."""

  @nn.compact
  def __call__(self, hidden: jnp.ndarray) -> jnp.ndarray:
    """Pools [B, L, D] into [B, D] from the [CLS] position."""
    dense = _dense(self.config, self.config.hidden_size, self.dtype, 'dense')
    return jnp.tanh(dense(hidden[:, 0]))


class BertEncoder(_BertModule):
  """BERT text encoder (HF `BertModel` with pooler).

  Attributes:
    config: The hyper-parameters, e.g. `preset('base', vocab_size=43)`.
    dtype: Computation dtype (e.g. jnp.bfloat16); params stay float32.
    remat: Rematerialisation policy of each layer (`layers.REMAT_POLICIES`).
    scan_layers: Scan over the layers (see `BertLayerStack`).
  """
  remat: str = 'none'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, text_mask: jnp.ndarray,
               train: bool) -> dict[str, jnp.ndarray]:
    """Encodes a batch of token sequences.

    Args:
      tokens: int [B, L] token ids, [CLS] first.
      text_mask: [B, L], 1 for real tokens and 0 for padding.
      train: Enables dropout (needs an rng named 'dropout').

    Returns:
      'hidden': [B, L, D] last hidden states; 'pooled': [B, D] the pooler
      output; 'cls': [B, D] the [CLS] hidden state, hidden[:, 0].
    """
    x = BertEmbeddings(self.config, self.dtype, name='embeddings')(
        tokens, train)
    hidden = BertLayerStack(self.config, self.dtype, self.remat,
                            self.scan_layers, name='encoder')(
                                x, attention_bias(text_mask), train)
    pooled = BertPooler(self.config, self.dtype, name='pooler')(hidden)
    return {'hidden': hidden, 'pooled': pooled, 'cls': hidden[:, 0]}


class TextConditioned(nn.Module, kw_only=True):
  """Base of the models that read an expression with a `BertEncoder`.

  Its fields are keyword-only, so that a model's own fields come first in
  its constructor (and may go without a default).

  Attributes:
    vocab_size: Text vocabulary size.
    bert_preset: Name in `PRESETS`.
    text_dropout: BERT's dropout rates; None keeps the preset's (0.1).
    dtype: Computation dtype (e.g. jnp.bfloat16); params stay float32.
    remat: Rematerialisation policy of the encoders' repeated blocks (BERT's
      layers, and the model's image backbone), one of
      `layers.REMAT_POLICIES`; it changes memory and time, no number.
    scan_layers: Scan over BERT's layers and the image backbone's blocks
      (`layers.stack_blocks`): their parameters stacked, one block
      compiled, and where XLA:CPU honours `remat`.
  """
  vocab_size: int
  bert_preset: str
  text_dropout: float | None
  dtype: Any
  remat: str = 'none'
  scan_layers: bool = False

  def encode_text(self, text_tokens: jnp.ndarray, text_mask: jnp.ndarray,
                  train: bool) -> dict[str, jnp.ndarray]:
    """The outputs of `BertEncoder` (the submodule 'text') for [T, L] tokens.

    Call it from a compact method.
    """
    return BertEncoder(
        preset(self.bert_preset, self.vocab_size, self.text_dropout),
        self.dtype, self.remat, self.scan_layers, name='text')(
            text_tokens, text_mask, train)
