"""Tests of the Flax BERT encoder: numerics, masking, HF compatibility."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from refseg_jax.models import bert

VOCAB = 43  # ref_shapes' vocabulary.
# Two sentences of 5 and 3 real tokens, padded to 7 with id 0.
TOKENS = np.array([[1, 7, 12, 30, 2, 0, 0], [1, 40, 2, 0, 0, 0, 0]], np.int32)
MASK = (np.arange(7)[None] < np.array([[5], [3]])).astype(np.int32)


def _model(layers=2, dtype=jnp.float32, **overrides):
  config = bert.preset('tiny', VOCAB, num_hidden_layers=layers, **overrides)
  return bert.BertEncoder(config, dtype)


def _params(model, seed=0):
  """Random float32 params with non-trivial LayerNorms and biases.

  Drawn with numpy on the shapes of `init`, which avoids compiling jax's
  random ops per shape (slow on CPU); `init` itself is tested for bf16.
  """
  init = functools.partial(model.init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), TOKENS, MASK)['params']
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    x = 0.2 * rng.standard_normal(shape.shape)
    if path[-1].key == 'scale':
      x = 1 + x / 2
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _apply(model, params, tokens=TOKENS, mask=MASK, **kwargs):
  return model.apply({'params': params}, tokens, mask, train=False, **kwargs)


# --- numpy reference (float64) ----------------------------------------------

_erf = np.vectorize(math.erf)


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _layer_norm(x, p, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def _np_embeddings(tokens, p):
  x = (p['word_embeddings']['embedding'][tokens]
       + p['position_embeddings']['embedding'][:tokens.shape[1]]
       + p['token_type_embeddings']['embedding'][0])
  return _layer_norm(x, p['LayerNorm'])


def _np_ffn(x, p):
  h = _dense(x, p['intermediate']['dense'])
  h = 0.5 * h * (1 + _erf(h / math.sqrt(2)))
  return _layer_norm(x + _dense(h, p['output']['dense']),
                     p['output']['LayerNorm'])


def _np_layer(x, mask, p, heads):
  b, length, d = x.shape
  att = p['attention']

  def split(name):
    return _dense(x, att['self'][name]).reshape(b, length, heads, -1)

  q, k, v = split('query'), split('key'), split('value')
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d // heads)
  logits = np.where(mask[:, None, None, :] > 0, logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ctx = np.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, length, d)
  x = _layer_norm(x + _dense(ctx, att['output']['dense']),
                  att['output']['LayerNorm'])
  return _np_ffn(x, p)


# --- tests ------------------------------------------------------------------


def _hf_param_count(cfg: transformers.BertConfig) -> int:
  """Parameters of HF `BertModel` (with pooler), by arithmetic."""
  d, i = cfg.hidden_size, cfg.intermediate_size
  embeddings = ((cfg.vocab_size + cfg.max_position_embeddings
                 + cfg.type_vocab_size) * d + 2 * d)  # + LayerNorm.
  layer = (4 * (d * d + d)  # query, key, value, attention output.
           + (d * i + i) + (i * d + d)  # intermediate, output.
           + 2 * 2 * d)  # two LayerNorms.
  pooler = d * d + d
  return embeddings + cfg.num_hidden_layers * layer + pooler


def test_base_param_count_matches_hf_bert_base_uncased():
  hf_config = transformers.BertConfig()  # Defaults are bert-base-uncased.
  assert _hf_param_count(hf_config) == 109_482_240
  config = bert.preset('base')
  assert config.vocab_size == hf_config.vocab_size == 30522
  assert config.max_position_embeddings == hf_config.max_position_embeddings
  init = functools.partial(bert.BertEncoder(config).init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                          jnp.ones((1, 8), jnp.int32))
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
  assert count == 109_482_240


def _hf_to_flax(key: str) -> str:
  """The renaming rule of the module docstring (shape handling aside)."""
  key = key.removeprefix('bert.')
  key = re.sub(r'encoder\.layer\.(\d+)\.', r'encoder.layer_\1.', key)
  parts = key.split('.')
  if parts[-1] in ('weight', 'gamma'):
    owner = parts[-2]
    parts[-1] = ('scale' if owner == 'LayerNorm' else
                 'embedding' if owner.endswith('_embeddings') else 'kernel')
  elif parts[-1] == 'beta':
    parts[-1] = 'bias'
  return '/'.join(parts)


def test_param_names_follow_hf_state_dict_rule():
  hf_keys = ['embeddings.word_embeddings.weight',
             'embeddings.position_embeddings.weight',
             'embeddings.token_type_embeddings.weight',
             'embeddings.LayerNorm.weight', 'embeddings.LayerNorm.bias',
             'pooler.dense.weight', 'pooler.dense.bias']
  for i in range(2):
    for module in ('attention.self.query', 'attention.self.key',
                   'attention.self.value', 'attention.output.dense',
                   'attention.output.LayerNorm', 'intermediate.dense',
                   'output.dense', 'output.LayerNorm'):
      hf_keys += [f'encoder.layer.{i}.{module}.weight',
                  f'encoder.layer.{i}.{module}.bias']
  params = _params(_model())
  flat = {'/'.join(k.key for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert {_hf_to_flax(k) for k in hf_keys} == flat
  # Also with a BertFor* prefix and old-style LayerNorm names.
  assert (_hf_to_flax('bert.encoder.layer.1.output.LayerNorm.gamma')
          == 'encoder/layer_1/output/LayerNorm/scale')


def test_embeddings_are_layer_norm_of_word_position_type_sum():
  model = _model()
  params = _params(model)
  embeddings = bert.BertEmbeddings(model.config).apply(
      {'params': params['embeddings']}, TOKENS, train=False)
  expected = _np_embeddings(TOKENS, _np(params['embeddings']))
  np.testing.assert_allclose(embeddings, expected, atol=1e-5)


def test_zeroed_attention_output_makes_layer_a_per_token_ffn():
  # With the attention output projection zeroed, x + attention(x) = x, so the
  # layer is LN2(h + FFN(h)) with h = LN1(x): no token sees another one.
  model = _model(layers=1)
  params = _params(model)
  dense = params['encoder']['layer_0']['attention']['output']['dense']
  dense['kernel'] = jnp.zeros_like(dense['kernel'])
  dense['bias'] = jnp.zeros_like(dense['bias'])
  p = _np(params)
  x = _np_embeddings(TOKENS, p['embeddings'])
  ln1 = p['encoder']['layer_0']['attention']['output']['LayerNorm']
  h = _layer_norm(x, ln1)
  expected = _np_ffn(h, p['encoder']['layer_0'])
  out = _apply(model, params)
  np.testing.assert_allclose(out['hidden'], expected, atol=1e-5)
  # Hence un-masking every token changes nothing either.
  out_all = _apply(model, params, mask=np.ones_like(MASK))
  np.testing.assert_allclose(out_all['hidden'], out['hidden'], atol=1e-6)


def test_matches_numpy_reference():
  model = _model()
  params = _params(model)
  p = _np(params)
  x = _np_embeddings(TOKENS, p['embeddings'])
  for i in range(2):
    x = _np_layer(x, MASK, p['encoder'][f'layer_{i}'], heads=2)
  pooled = np.tanh(_dense(x[:, 0], p['pooler']['dense']))
  out = _apply(model, params)
  np.testing.assert_allclose(out['hidden'], x, atol=1e-5)
  np.testing.assert_allclose(out['pooled'], pooled, atol=1e-5)
  np.testing.assert_array_equal(out['cls'], out['hidden'][:, 0])


def test_real_positions_invariant_to_padding():
  model = _model()
  params = _params(model)
  out = _apply(model, params)
  real = MASK.astype(bool)

  # Other pad values.
  other = np.where(real, TOKENS, np.array([[9, 33, 0, 0, 0, 0, 0]]) + 3)
  out_other = _apply(model, params, tokens=other)
  # More padding, with nonzero pad ids.
  longer = np.pad(TOKENS, ((0, 0), (0, 5)), constant_values=17)
  out_longer = _apply(model, params, tokens=longer,
                      mask=np.pad(MASK, ((0, 0), (0, 5))))

  for o in (out_other, out_longer):
    np.testing.assert_allclose(
        o['hidden'][:, :7][real], out['hidden'][real], atol=1e-5)
    np.testing.assert_allclose(o['pooled'], out['pooled'], atol=1e-5)
  # The pad positions themselves did change: the test is not vacuous.
  assert not np.allclose(out_other['hidden'][~real], out['hidden'][~real])


def test_attention_mask_matters():
  model = _model()
  params = _params(model)
  out = _apply(model, params)
  unmasked = MASK.copy()
  unmasked[1, 3] = 1  # One pad token of the short sentence joins in.
  out_unmasked = _apply(model, params, mask=unmasked)
  diff = np.abs(out_unmasked['hidden'][1, :3] - out['hidden'][1, :3]).max()
  assert diff > 1e-3
  # The other sentence is untouched.
  np.testing.assert_allclose(out_unmasked['hidden'][0], out['hidden'][0],
                             atol=1e-6)


def test_dropout_only_in_train():
  model = _model()
  params = {'params': _params(model)}
  eval_a = model.apply(params, TOKENS, MASK, train=False,
                       rngs={'dropout': jax.random.key(1)})
  eval_b = model.apply(params, TOKENS, MASK, train=False)
  np.testing.assert_array_equal(eval_a['hidden'], eval_b['hidden'])

  def train(seed):
    return model.apply(params, TOKENS, MASK, train=True,
                       rngs={'dropout': jax.random.key(seed)})['hidden']

  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  assert not np.allclose(train(1), eval_a['hidden'])
  with pytest.raises(Exception, match='dropout'):
    model.apply(params, TOKENS, MASK, train=True)


def test_bfloat16_compute_float32_params():
  model = _model(dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), TOKENS, MASK, train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = model.apply(variables, TOKENS, MASK, train=False)
  assert {k: v.dtype for k, v in out.items()} == {
      'hidden': jnp.bfloat16, 'pooled': jnp.bfloat16, 'cls': jnp.bfloat16}
  assert out['hidden'].shape == (2, 7, 64)
  # Same params in float32 give nearly the same result.
  out32 = _model().apply(variables, TOKENS, MASK, train=False)
  np.testing.assert_allclose(out['hidden'].astype(np.float32),
                             out32['hidden'], atol=0.1)
