"""Shared pieces of the `configs/*.py` files: variant arguments, PKS configs.

A config file's `get_config(arg)` takes a big_vision-style argument string,
`configs/full.py:data=ref_shapes,model=tiny`, parsed by `parse_arg` against
the variants the file offers; anything it does not know is an error that
names the key and lists the choices.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from refseg_jax.data import pipeline
from refseg_jax.data import refcoco

# The RefCOCO-family configs of `refseg_jax.data.refcoco`, with the splits
# their papers report: all but train (after training; `val` also picks the
# best params).
REFER_FINAL_SPLITS = {
    name: tuple(split for split in config.splits if split != 'train')
    for name, config in refcoco.CONFIGS.items()}

# Named data variants: the data config entries each one sets.
DATA_VARIANTS: dict[str, dict[str, Any]] = {
    # The built-in benchmark (128 px, 70,787 training expressions).
    'ref_shapes': dict(name='ref_shapes', image_size=128, eval_mask_size=128),
    # Its 64 px, 240-image config, for tests and smoke runs.
    'ref_shapes_tiny': dict(name='ref_shapes/tiny', image_size=64,
                            eval_mask_size=64, shuffle_buffer=256),
    # RefCOCO, RefCOCO+, RefCOCOg (build them first: docs/refcoco.md; they
    # need --config.data.tokenizer): 480 px as LAVT, masks scored at the
    # original size (COCO sides <= 640), a shuffle buffer of 2,000 JPEGs
    # (~0.3 GB).
    **{name: dict(name=f'refcoco/{name}', image_size=480, eval_mask_size=640,
                  shuffle_buffer=2_000) for name in REFER_FINAL_SPLITS},
}

# The evaluation entries a data variant sets, where its split names are not
# ref_shapes' (the defaults of `_training_config`).
DATA_EVAL_VARIANTS: dict[str, dict[str, Any]] = {
    name: dict(splits=('val',), final_splits=splits, best_split='val')
    for name, splits in REFER_FINAL_SPLITS.items()}

# Named PKS model variants. 'tiny' trains on a 2-core CPU in minutes; the
# others are the paper-scale backbones (ResNet-50/101 with BERT-base), which
# want pretrained weights and an accelerator.
PKS_MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    'tiny': dict(resnet_preset='tiny', bert_preset='tiny', dim=32,
                 text_dropout=0.0),
    'r50': dict(resnet_preset='resnet50', bert_preset='base', dim=256,
                dtype='bfloat16'),
    'r101': dict(resnet_preset='resnet101', bert_preset='base', dim=256,
                 dtype='bfloat16'),
}


# Named SaG model variants. 'paper' is the official setting (ViT-S/16 at
# 384 px, BERT-base, 18 x 2 slots, 6 iterations, drop-path 0.1), which wants
# pretrained weights and an accelerator.
SAG_MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    'tiny': dict(vit_preset='tiny', bert_preset='tiny', dim=64, groups=8,
                 slots_per_group=2, iterations=3, heads=2, head_dim=32,
                 interaction_heads=2, interaction_head_dim=32,
                 decoder_hidden=64, reconstruct='pixels', text_pooling='mean',
                 text_dropout=0.0, gather='slot_max', slot_temperature=0.1,
                 max_slot_area=0.2),
    'paper': dict(vit_preset='s16', bert_preset='base', dim=512, groups=18,
                  slots_per_group=2, iterations=6, heads=4, head_dim=256,
                  interaction_heads=4, interaction_head_dim=128,
                  decoder_hidden=512, reconstruct='features',
                  text_pooling='cls', drop_path=0.1, gather='fusion',
                  slot_temperature=0.1, max_slot_area=1.0),
}


def parse_arg(arg: str | None, **defaults: str) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' against the allowed keys and defaults.

  Args:
    arg: the part of `--config` after the colon (None or '' = defaults).
    **defaults: every allowed key with its default value.

  Raises:
    ValueError: naming an unknown key or a malformed item.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Config argument {item!r} is not key=value '
                       f'(keys: {sorted(defaults)}).')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: '
                       f'{sorted(defaults)}.')
    values[key] = value
  return ml_collections.ConfigDict(values)


def choose(variants: Mapping[str, dict[str, Any]], name: str,
           kind: str) -> dict[str, Any]:
  """The variant `name`, or a ValueError listing the `kind`'s choices."""
  if name not in variants:
    raise ValueError(f'Unknown {kind} variant {name!r}; known: '
                     f'{sorted(variants)}.')
  return dict(variants[name])


def loss_config(supervision: str) -> ml_collections.ConfigDict:
  """Loss weights and settings of PKS under 'full' or 'click' supervision.

  Weights are those of `refseg_jax.losses.DEFAULT_WEIGHTS` (full) and
  `CLICK_DEFAULT_WEIGHTS` (click); the click settings are BoxInst's
  (AdelaiDet defaults) except the pairwise warm-up, which BoxInst runs over
  10,000 of ~90,000 iterations: a ninth of the run, 150 steps here (the
  default run was 1,300 steps when this was set; grouped batches have
  since made it 2,050).
  """
  if supervision == 'full':
    return ml_collections.ConfigDict(dict(
        heatmap=1.0, box=5.0, dice=1.0, bce=1.0, heatmap_sigma=1.0))
  if supervision == 'click':
    return ml_collections.ConfigDict(dict(
        heatmap=1.0, box=5.0, projection=1.0, pairwise=1.0, point=1.0,
        outside=1.0, heatmap_sigma=1.0,
        pairwise_size=3,            # Neighbourhood side, in mask cells,
        pairwise_dilation=2,        # and its spacing.
        colour_threshold=0.3,       # L*a*b* similarity a pair needs.
        pairwise_warmup_steps=150))
  raise ValueError(f'Unknown supervision {supervision!r}; known: '
                   "['click', 'full'].")


def _training_config(supervision: str, data: str
                     ) -> ml_collections.ConfigDict:
  """What every model's config shares: data, optimiser, mesh, evaluation.

  Unlocked; the model configs add `model` and `loss`, then lock it.
  """
  config = ml_collections.ConfigDict()
  config.supervision = supervision
  config.seed = 0

  config.data = pipeline.default_config()
  # Two expressions of each image per batch: the image side runs once for
  # both, so a PKS step costs 160 ms instead of 250 on 2 CPU cores, and the
  # pair often contrasts two objects of one scene. (4 repeats the many
  # images that have fewer expressions and trained worse.)
  config.data.expressions_per_image = 2
  config.data.update(choose(DATA_VARIANTS, data, 'data'))

  # Pretrained weights of the encoders, by top-level module: a Hugging Face
  # directory, a timm / torchvision / HF .safetensors or .bin file, or an
  # orbax checkpoint of `python -m refseg_jax.models.convert`
  # (docs/pretrained.md). None keeps the random initialisation.
  config.model_init = ml_collections.ConfigDict(dict(
      backbone=config_dict.placeholder(str),
      text=config_dict.placeholder(str)))

  config.batch_size = 32            # Expressions, over all hosts and devices.
  config.total_steps = 2_050
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, weight_decay=1e-4, b1=0.9, b2=0.999,
      warmup_steps=100, end_learning_rate_fraction=0.01, grad_clip_norm=1.0,
      # Learning-rate multipliers of top-level modules (pretrained encoders
      # usually train slower); unlisted modules train at 1x.
      lr_multipliers=dict(backbone=1.0, text=1.0)))

  # Devices as [(axis, size)], -1 = the rest; batches split over every axis,
  # parameters >= fsdp_min_size elements sharded over `fsdp_axis`.
  config.mesh = [('data', -1)]
  config.fsdp_axis = ''
  config.fsdp_min_size = 2**14

  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2
  config.eval = ml_collections.ConfigDict(dict(
      splits=('validation',),           # Evaluated periodically and at the end.
      # The README's main command must fit in 10 minutes on 2 CPU cores, so
      # by default: no mid-run validation (~17 s there), and `test_novel`
      # (~11 s) only when asked for, as the supervision benchmark does:
      # --config.eval.final_splits=validation,test,test_novel.
      final_splits=('validation', 'test'),
      every_steps=2_050, batch_size=64, num_overlays=8,
      best_split='validation'))         # Its mIoU picks the best checkpoint.
  config.eval.update(DATA_EVAL_VARIANTS.get(data, {}))
  return config


def pks_config(supervision: str, arg: str | None) -> ml_collections.ConfigDict:
  """The training config of a PKS model under `supervision`.

  Args:
    supervision: 'full' or 'click'.
    arg: variant string with keys `data` (see `DATA_VARIANTS`) and `model`
      (see `PKS_MODEL_VARIANTS`).

  Returns:
    A locked ConfigDict: setting a key it does not have is an error.
  """
  args = parse_arg(arg, data='ref_shapes', model='tiny')
  config = _training_config(supervision, args.data)
  config.model = ml_collections.ConfigDict(dict(
      name='pks', resnet_preset='tiny', bert_preset='tiny', dim=64,
      mask_channels=8, mask_layers=3, mask_stride=4, context_layers=1,
      mask_trunk_gradient=1.0,
      text_dropout=config_dict.placeholder(float), dtype='float32',
      frozen_bn=False))
  config.model.update(choose(PKS_MODEL_VARIANTS, args.model, 'model'))
  config.loss = loss_config(supervision)
  if supervision == 'click':
    # The weak mask losses' gradient into the shared trunk is mostly noise:
    # at a tenth of it, validation mIoU went from 55.6 to 68.3 (README).
    config.model.mask_trunk_gradient = 0.1
    if args.model != 'tiny':
      config.loss.pairwise_warmup_steps = 10_000  # BoxInst's, paper scale.
  config.lock()
  return config


def sag_config(arg: str | None) -> ml_collections.ConfigDict:
  """The training config of Shatter and Gather (text supervision).

  Args:
    arg: variant string with keys `data` (see `DATA_VARIANTS`) and `model`
      (see `SAG_MODEL_VARIANTS`; 'paper' also sets the paper's optimiser).

  Returns:
    A locked ConfigDict.
  """
  args = parse_arg(arg, data='ref_shapes', model='tiny')
  config = _training_config('text', args.data)
  config.model = ml_collections.ConfigDict(dict(
      name='sag', image_size=config.data.image_size, drop_path=0.0,
      text_dropout=config_dict.placeholder(float), dtype='float32'))
  config.model.update(choose(SAG_MODEL_VARIANTS, args.model, 'model'))
  config.loss = ml_collections.ConfigDict(dict(
      c3=1.0, reconstruction=1.0,
      # Leave other copies of an expression's own image out of its
      # negatives (the official code counts them as negatives).
      mask_same_image=True,
      # The loss is scaled by min(step / warmup_steps, 1): the official
      # 5,000 iterations are ~3 % of its run; the same share of 2,050.
      warmup_steps=60))
  # From scratch, 2e-3 (the PKS default) left C^3 at chance (log B) for
  # the whole run; at 5e-4 it learns (README).
  config.optimizer.learning_rate = 5e-4
  if args.model == 'paper':
    config.loss.warmup_steps = 5_000
    config.data.image_size = config.model.image_size = 384
    config.data.flip = False  # "No augmentation".
    config.optimizer.update(learning_rate=1e-5, warmup_steps=0,
                            grad_clip_norm=0.1,
                            lr_multipliers=dict(backbone=0.1, text=1.0))
  config.lock()
  return config


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of 'path/to/config.py[:arg]', as `--config=` reads it.

  For notebooks and tests: `load('configs/full.py:data=ref_shapes_tiny')`.
  """
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('_refseg_config', path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f'No config file {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
