"""Every config and every named variant: its keys are read, and it builds.

Each variant is built as training would build it, its model initialised
and one train step and one evaluation step traced with `jax.eval_shape`
(no FLOPs spent), so a broken paper-scale variant fails here. The model,
loss and optimiser sections are passed as keyword arguments (`PKS(**model)`,
`loss(**config.loss)`, `optimizer.make(**config.optimizer)`), so building
them already refuses a key nothing reads; the other sections' keys must be
named somewhere in `refseg_jax/`.
"""

import ast
import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from refseg_jax import config_lib
from refseg_jax import optimizer
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax import train_state
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator
from refseg_jax.models import bert

REPO = pathlib.Path(__file__).parents[1]
CONFIG_FILES = sorted(p for p in (REPO / 'configs').glob('*.py')
                      if p.name != 'common.py')


def _variant_specs() -> list[str]:
  """'file.py:key=name' for every named variant of every config file, each
  name once (with the other arguments at their defaults)."""
  specs = []
  for path in CONFIG_FILES:
    variants = config_lib.import_sibling(str(path), path.stem).VARIANTS
    specs += [f'{path}:{key}={name}' for key, names in variants.items()
              for name in names]
  return specs


SPECS = _variant_specs()


def _spec_id(spec: str) -> str:
  return spec.rpartition('/')[2]


@functools.cache
def _names_in_code() -> frozenset[str]:
  """Every attribute, string constant and parameter name in refseg_jax/."""
  names = set()
  for path in (REPO / 'refseg_jax').rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Attribute):
        names.add(node.attr)
      elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        names.add(node.value)
      elif isinstance(node, ast.arg):
        names.add(node.arg)
  return frozenset(names)


def _leaf_paths(config: ml_collections.ConfigDict, prefix=()):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaf_paths(value, prefix + (key,))
    else:
      yield prefix + (key,)


def test_every_config_file_has_variants():
  assert {p.name for p in CONFIG_FILES} == {'click.py', 'full.py',
                                             'mixed.py', 'text.py'}
  assert len(SPECS) == 7 + 3 + 7 + 3 + 2 + 3 + 2 + 7 + 2


@pytest.mark.parametrize('spec', SPECS, ids=_spec_id)
def test_every_key_is_named_in_the_code(spec):
  config = config_lib.load(spec)
  unread = ['.'.join(path) for path in _leaf_paths(config)
            if not set(path) <= _names_in_code()]
  assert not unread, f'{spec}: keys no code in refseg_jax/ reads: {unread}'


def test_the_walk_catches_a_dead_key():
  config = config_lib.load(str(REPO / 'configs' / 'full.py'))
  with config.unlocked():
    config.loss.forgotten_weight = 1.0
  assert any(path[-1] not in _names_in_code()
             for path in _leaf_paths(config))
  task = tasks.build(config, 43)
  with pytest.raises(TypeError, match='forgotten_weight'):
    task.loss({}, {}, 0)


def _vocab_size(config: ml_collections.ConfigDict) -> int:
  """The dataset's own vocabulary's size; BERT's for the RefCOCO family
  (the tokenizer they are built with is bert-base-uncased)."""
  if config.data.name.startswith('ref_shapes'):
    return pipeline.load_tokenizer(None, config.data.name).vocab_size
  return bert.BERT_VOCAB_SIZE


def _abstract_batch(config: ml_collections.ConfigDict, supervision: str,
                    train_batch: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of a global batch (`refseg_jax.data.pipeline` module doc)."""
  size, length = config.data.image_size, config.data.max_text_len
  if train_batch:  # Grouped by image, k expressions each.
    texts = config.batch_size
    images = texts // max(config.data.expressions_per_image, 1)
  else:  # Evaluation batches are not grouped.
    texts = images = config.eval.batch_size
  shapes = {'image': ((images, size, size, 3), jnp.uint8),
            'text_tokens': ((texts, length), jnp.int32),
            'text_mask': ((texts, length), jnp.int32)}
  if train_batch:
    shapes['image_id'] = ((images,), jnp.int32)
    shapes['box'] = ((texts, 4), jnp.float32)
    shapes['clicks'] = ((texts, 3, 2), jnp.float32)
    shapes['mask'] = ((texts, size, size), jnp.uint8)
    shapes['labelled_with'] = ((texts,), jnp.int32)
    fields = pipeline.SUPERVISION_FIELDS[supervision]
  else:
    mask_size = config.data.eval_mask_size
    shapes['eval_mask'] = ((texts, mask_size, mask_size), jnp.uint8)
    shapes['orig_size'] = shapes['content_size'] = ((texts, 2), jnp.int32)
    shapes['valid'] = ((texts,), jnp.bool_)
    fields = shapes
  return {k: jax.ShapeDtypeStruct(*shapes[k]) for k in fields}


@pytest.mark.parametrize('spec', SPECS, ids=_spec_id)
def test_every_variant_builds_and_traces_a_train_and_an_eval_step(spec):
  config = config_lib.load(spec)
  task = tasks.build(config, _vocab_size(config))
  mesh = sharding.make_mesh(config.mesh)
  state, shardings = train_state.shapes_and_shardings(config, task, mesh)
  # The model's own input size: SaG's ViT is laid out for the canvas.
  assert config.data.image_size == config.model.get(
      'image_size', config.data.image_size)

  step = train.make_train_step(config, task, mesh, shardings)
  new_state, metrics = jax.eval_shape(
      step, state, _abstract_batch(config, task.supervision, True))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert {'loss', 'grad_norm', 'learning_rate'} <= set(metrics)
  # Every logged term has a weight (mixed supervision: each kind's terms,
  # 'kind/term', and the kinds' shares of the batch, 'share/kind').
  terms = set(metrics) - {'loss', 'grad_norm', 'learning_rate'}
  assert {t.rpartition('/')[2] for t in terms
          if not t.startswith('share/')} <= set(config.loss)
  assert all(m.shape == () for m in metrics.values())

  eval_step = evaluator.make_eval_step(task, mesh,
                                      shardings.eval_variables())
  _, response = jax.eval_shape(
      eval_step, state.eval_variables(), _abstract_batch(config, task.supervision, False))
  size = config.data.image_size
  assert response.shape == (config.eval.batch_size, size, size)


@pytest.mark.parametrize('spec', [SPECS[0], SPECS[-1]], ids=_spec_id)
def test_optimizer_section_is_exactly_make_s_arguments(spec):
  config = config_lib.load(spec)
  optimizer.make(10, **config.optimizer)
  with pytest.raises(TypeError, match='unexpected keyword'):
    optimizer.make(10, **config.optimizer, momentum=0.9)


def test_paper_variants_are_the_paper_scale_models():
  """The numbers a reader checks against the papers."""
  sag_paper = config_lib.load(f'{REPO}/configs/text.py:model=paper')
  assert (sag_paper.model.vit_preset, sag_paper.model.bert_preset,
          sag_paper.data.image_size) == ('s16', 'base', 384)
  # The official `train_eval_unc.sh` run (docs/supervision.md's table).
  assert sag_paper.loss.to_dict() == dict(
      c3=1.0, reconstruction=1.0, mask_same_image=False, warmup_steps=5_000)
  assert {k: sag_paper.model[k] for k in (
      'groups', 'slots_per_group', 'iterations', 'heads', 'head_dim',
      'interaction_heads', 'interaction_head_dim', 'dim', 'dropout',
      'drop_path', 'gather', 'reconstruct', 'text_pooling',
      'image_normalisation', 'dtype', 'initialisation', 'qkv_bias',
      'position_after_norm', 'position_encoding')} == dict(
          groups=12, slots_per_group=3, iterations=6, heads=4, head_dim=256,
          interaction_heads=4, interaction_head_dim=128, dim=512, dropout=0.1,
          drop_path=0.1, gather='fusion', reconstruct='features',
          text_pooling='cls', image_normalisation='half', dtype='bfloat16',
          initialisation='official', qkv_bias=False,
          position_after_norm=False, position_encoding='detr')
  assert (sag_paper.data.resize, sag_paper.data.expressions_per_image,
          sag_paper.data.flip) == ('stretch', 0, False)
  assert (sag_paper.total_epochs, sag_paper.batch_size) == (50, 32)
  assert {k: sag_paper.optimizer[k] for k in (
      'learning_rate', 'schedule', 'warmup_steps', 'weight_decay',
      'decay_all_params', 'grad_clip_norm')} == dict(
          learning_rate=1e-5, schedule='constant_then_cosine',
          warmup_steps=5_000, weight_decay=1e-4, decay_all_params=True,
          grad_clip_norm=0.1)
  assert sag_paper.optimizer.lr_multipliers.to_dict() == dict(backbone=0.1,
                                                              text=1.0)
  pks_paper = config_lib.load(f'{REPO}/configs/click.py:model=r101')
  assert (pks_paper.model.resnet_preset, pks_paper.model.bert_preset,
          pks_paper.model.dtype) == ('resnet101', 'base', 'bfloat16')
  assert pks_paper.loss.pairwise_warmup_steps == 10_000
  count = lambda cfg: sum(
      np.prod(x.shape) for x in jax.tree.leaves(train_state.shapes_and_shardings(
          cfg, tasks.build(cfg, bert.BERT_VOCAB_SIZE),
          sharding.make_mesh(cfg.mesh))[0].params))
  # ResNet-101 (42.5 M without its classifier) + BERT-base (109 M with its
  # pooler) + the PKS heads; ViT-S/16 (21.7 M) + BERT-base + the slots.
  assert 150e6 < count(pks_paper) < 165e6
  assert 130e6 < count(sag_paper) < 150e6


def test_an_unknown_task_is_an_error_listing_the_known_ones():
  config = config_lib.load(str(REPO / 'configs' / 'full.py'))
  with config.unlocked():
    config.task = 'pks_boxes'
  with pytest.raises(ValueError, match=r"'pks_boxes'.*'pks_click', "
                     r"'pks_full', 'pks_mixed', 'sag_text'"):
    tasks.build(config, 43)
