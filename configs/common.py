"""What every config shares: the data variants, the training defaults, PKS.

`configs/full.py`, `click.py` and `text.py` start from `training(data)` and
add their task, model and loss; full and click share `pks_model(variant)`.
Every value a config uses is in its own file or here, once.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from refseg_jax import config_lib
from refseg_jax.data.refcoco import builder as refcoco

# The RefCOCO-family configs of `refseg_jax.data.refcoco`, with the splits
# their papers report: all but train (after training; `val` also picks the
# best params).
REFER_FINAL_SPLITS = {
    name: tuple(split for split in config.splits if split != 'train')
    for name, config in refcoco.CONFIGS.items()}

# Named data variants: the data entries each one sets over `data_config`.
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

# Named PKS model variants (configs/full.py and click.py). 'tiny' trains on
# a 2-core CPU in minutes; the others are the paper-scale backbones
# (ResNet-50/101 with BERT-base), which want pretrained weights and an
# accelerator.
PKS_MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    'tiny': dict(resnet_preset='tiny', bert_preset='tiny', dim=32,
                 text_dropout=0.0),
    # Neither scanned nor rematerialised: on this CPU the scanned ResNet
    # stages made r50's step 6.4x slower (480 px, batch 8: 131 s against
    # 20.6 s), and remat alone saved no memory and cost 15 %. Both
    # together are what fits r101's batch of 32 at 480 px in 24 GB (23.6
    # instead of 31.7 GB of arguments and temporaries, float32):
    # --config.model.scan_layers=True
    # --config.model.remat=nothing_saveable (docs/training.md).
    'r50': dict(resnet_preset='resnet50', bert_preset='base', dim=256,
                dtype='bfloat16'),
    'r101': dict(resnet_preset='resnet101', bert_preset='base', dim=256,
                 dtype='bfloat16'),
}


def data_config(variant: str) -> ml_collections.ConfigDict:
  """The data section (`refseg_jax.data.pipeline`) of the named variant."""
  config = ml_collections.ConfigDict(dict(
      name='ref_shapes',          # TFDS name[/config].
      # TFDS data dir; None = TFDS default. (Placeholders: None values that
      # `--config.data.data_dir=...` can still set.)
      data_dir=config_dict.placeholder(str),
      # Build the dataset first if it is missing (ref_shapes needs no
      # download; manual-download datasets say which files they need).
      prepare=True,
      image_size=128,             # Side S of the square canvas.
      # How an image fits the canvas (`pipeline.fit_image`): 'letterbox'
      # keeps its aspect (zero padding bottom-right); 'stretch' resizes it
      # to S x S, as the official Shatter-and-Gather code does.
      resize='letterbox',
      eval_mask_size=128,         # M >= every original side in eval splits.
      max_text_len=20,            # Tokens, [CLS] and [SEP] included.
      # vocab.txt or local HF tokenizer directory; None = the dataset's own.
      tokenizer=config_dict.placeholder(str),
      shuffle_buffer=10_000,      # Expressions (images when grouped).
      # Checkpoints carry each host's input position (tf.data's iterator
      # state, the shuffle buffer's encoded examples included: ~360 MB per
      # host for ref_shapes' 10,000 images), so that a resumed run reads
      # on where it stopped. False: a resume skips the batches trained on
      # instead (same batches, re-reading the records up to that point).
      checkpoint_iterator=True,
      # Training only: 0 = every expression once per epoch, shuffled across
      # images; k >= 1 = batches of batch/k images with k expressions each.
      # 2: the image side runs once for both, so a PKS step costs 160 ms
      # instead of 250 on 2 CPU cores, and the pair often contrasts two
      # objects of one scene (4 repeats the many images that have fewer
      # expressions and trained worse).
      expressions_per_image=2,
      flip=True,                  # Train-time horizontal flip.
      # Click (and mixed) supervision only: annotator noise on the training
      # clicks, the standard deviation of each click's shift as a fraction
      # of the box's height (y) and width (x); 0 = the exact clicks.
      click_noise=0.0,
      # And the probability that the centre click misses: it lands anywhere
      # in the box, uniformly (`pipeline.click_labels`).
      click_miss=0.0,
  ))
  config.update(config_lib.choose(DATA_VARIANTS, variant, 'data'))
  return config


def training(data: str) -> ml_collections.ConfigDict:
  """What every task's config shares: data, optimiser, mesh, evaluation.

  Unlocked; each config file adds `task`, `model` and `loss`, then locks it.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = data_config(data)

  # Pretrained weights of the encoders, by top-level module: a Hugging Face
  # directory, a timm / torchvision / HF .safetensors or .bin file, or an
  # orbax checkpoint of `python -m refseg_jax.models.convert`
  # (docs/pretrained.md). None keeps the random initialisation.
  config.model_init = ml_collections.ConfigDict(dict(
      backbone=config_dict.placeholder(str),
      text=config_dict.placeholder(str)))

  config.batch_size = 32            # Expressions, over all hosts and devices.
  # ref_shapes is far from converged in the README's 10-minute budget (the
  # loss still falls at the end), so the default takes as many steps as fit
  # in it on 2 CPU cores with the final validation (~216 ms a step there;
  # 2,600 steps took 10.5 min); 2,050 steps left the full default at 69-70
  # validation mIoU, seed to seed (docs/results.md).
  config.total_steps = 2_400
  # The run's length in epochs of the training split instead; None = use
  # total_steps. When set, `train.train_and_evaluate` overwrites
  # total_steps with ceil(total_epochs * training expressions / batch_size)
  # before anything reads it (the checkpoints' config then holds that
  # value). eval.every_steps below is not rescaled: set it too.
  config.total_epochs = config_dict.placeholder(float)
  # `refseg_jax.optimizer.make`'s arguments.
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, weight_decay=1e-4, b1=0.9, b2=0.999,
      warmup_steps=100, end_learning_rate_fraction=0.01, grad_clip_norm=1.0,
      # Learning-rate multipliers of top-level modules (pretrained encoders
      # usually train slower); unlisted modules train at 1x.
      lr_multipliers=dict(backbone=1.0, text=1.0),
      # `optimizer.SCHEDULES`: 'warmup_cosine' (linear warm-up over
      # warmup_steps, cosine to end_learning_rate_fraction) or
      # 'constant_then_cosine' (the official SaG's: the peak for
      # warmup_steps, then a cosine over the whole run towards 0; needs
      # end_learning_rate_fraction=0).
      schedule='warmup_cosine',
      # True: weight decay on every parameter (the official SaG's AdamW);
      # False: not on biases, norm scales, position embeddings, the class
      # token and slot distributions (`optimizer.NO_DECAY_SUFFIXES`).
      decay_all_params=False))
  # Decay of the params' exponential moving average, which evaluation and
  # the best checkpoint then use; 0 = evaluate the params themselves. Off
  # by default: after the cosine decay to 1 % it changed nothing (full,
  # seed 2, 2,600 steps, 0.999: validation mIoU 72.42 vs 72.37 raw).
  config.ema_decay = 0.0
  # A step whose loss or gradient is not finite stops the run with an error
  # naming it (the last checkpoint is from before it). True instead keeps
  # the state as it was before that step (params, optimiser, batch
  # statistics, EMA) and counts it in train/skipped_updates.
  config.skip_nonfinite_updates = False

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
      # by default: no mid-run validation (~25 s there with the eval step's
      # compilation), and `test` (~20 s) and `test_novel` (~15 s) only when
      # asked for, as the supervision benchmark does:
      # --config.eval.final_splits=validation,test,test_novel.
      final_splits=('validation',),
      every_steps=config.total_steps, batch_size=64, num_overlays=8,
      best_split='validation'))         # Its mIoU picks the best checkpoint.
  if data in REFER_FINAL_SPLITS:
    config.eval.update(splits=('val',), final_splits=REFER_FINAL_SPLITS[data],
                       best_split='val')
  return config


# The named variants of configs/full.py and click.py, by argument (the first
# is the default).
PKS_VARIANTS = dict(data=tuple(DATA_VARIANTS), model=tuple(PKS_MODEL_VARIANTS))


def default_args(variants: dict[str, tuple[str, ...]]) -> dict[str, str]:
  """{argument: its default (first) variant}, for `config_lib.parse_arg`."""
  return {key: names[0] for key, names in variants.items()}


def pks_training(arg: str | None, task: str, **more_args: str
                 ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(config, parsed arg) of a PKS task: `training` with `task` and the
  PKS model of the `model=` variant; unlocked, without `loss`.
  `more_args`: the config file's own arguments, with their defaults."""
  args = config_lib.parse_arg(arg, **default_args(PKS_VARIANTS), **more_args)
  config = training(args.data)
  config.task = task
  config.model = pks_model(args.model)
  return config, args


def pks_model(variant: str) -> ml_collections.ConfigDict:
  """The fields of `refseg_jax.models.pks.PKS` for the named variant."""
  model = ml_collections.ConfigDict(dict(
      resnet_preset='tiny', bert_preset='tiny', dim=64,
      mask_channels=8, mask_layers=3, mask_stride=4, context_layers=1,
      mask_trunk_gradient=1.0,
      # Normal std of the dynamic mask kernels' generator (CondInst's).
      kernel_init_std=0.01,
      # BERT's dropout rates; None keeps the preset's (0.1).
      text_dropout=config_dict.placeholder(float), dtype='float32',
      frozen_bn=False,
      # Rematerialisation of the ResNet's and BERT's blocks, a name in
      # `refseg_jax.models.layers.REMAT_POLICIES` ('none': keep every
      # activation); memory for time, no number changes. BERT's layers
      # and each ResNet stage's blocks after the first as one scan
      # (stacked parameters; where XLA:CPU honours remat).
      remat='none', scan_layers=False))
  model.update(config_lib.choose(PKS_MODEL_VARIANTS, variant, 'model'))
  return model


# On ref_shapes (the tiny model), four changes to BoxInst's and CondInst's
# settings together took click-supervised validation mIoU over seeds 0-2
# from 58.98 +- 8.34 to 67.86 +- 1.62, and with noisy clicks (sigma 0.05)
# from 52.00 +- 1.96 to 67.12 +- 2.74; with 10 % masks (configs/mixed.py)
# from 67.97 +- 1.32 to 71.26 +- 0.34 (docs/results.md): the mask kernels'
# generator at 3 x CondInst's std; the outside term at 10 x, since as a
# mean over every cell outside the box a look-alike object barely moves it
# at 1 x; its box widened (outside_margin); and a pairwise term that links
# the images' textured background (threshold 0.05, dilation 1: 89 % of
# neighbouring background cells, against 26 % at BoxInst's 0.3 and 2).
# The paper variants keep BoxInst's and CondInst's settings.


def click_kernel_init_std(model_variant: str) -> float:
  """The mask kernels' generator's init std under click supervision."""
  return 0.03 if model_variant == 'tiny' else 0.01


def click_loss(model_variant: str) -> dict[str, float | int]:
  """The click task's loss weights and settings (`tasks.pks_click`)."""
  tiny = model_variant == 'tiny'
  return dict(
      heatmap=1.0, box=5.0, projection=1.0, pairwise=1.0, point=1.0,
      outside=10.0 if tiny else 1.0,
      # The outside term's box widened by this fraction of its size on
      # each side (`boxinst.outside_box_loss`). At 10 x that term pushes
      # down the object's own edge cells, which straddle the box's edge on
      # the stride-4 grid, and a corner click moved by noise cuts further
      # in: on ref_shapes 0.1 gave the masks their edges back (noisy clicks:
      # 64.78 +- 2.04 without it).
      outside_margin=0.1 if tiny else 0.0,
      heatmap_sigma=1.0,          # Heatmap target's standard deviation, cells.
      pairwise_size=3,            # Neighbourhood side, in mask cells,
      pairwise_dilation=1 if tiny else 2,   # and its spacing.
      colour_threshold=0.05 if tiny else 0.3,  # L*a*b* similarity a pair needs.
      # BoxInst ramps the pairwise term in over 10,000 of ~90,000
      # iterations: at paper scale that; on ref_shapes a ninth of the run
      # as it was when this was set (1,300 steps; now 2,400).
      pairwise_warmup_steps=150 if tiny else 10_000)
