"""The tf.data input pipeline: one example per (referred object, expression).

    per-host shard -> flatten to expressions -> decode -> (train) random
    horizontal flip that swaps `left`/`right` -> fit to a square canvas ->
    batch -> tokenise -> prefetch.

How an image fits the S x S canvas is `config.data.resize` (`fit_image`):
'letterbox' (default) resizes it keeping its aspect, the longer side S,
and places it at the top-left of a zero canvas; 'stretch' (the official
Shatter-and-Gather preprocessing) resizes it to S x S, the aspect not
kept, so that it fills the canvas. Either way `content_size` (h, w) is the
part of the canvas the image covers ((S, S) when stretched).

Training batches may instead be grouped by image (`expressions_per_image`
k): the shuffle runs over images, each bringing k of its expressions, and
a batch holds B / k images with B expressions, image-major (expressions
k*i ... k*i + k - 1 refer to image i; `refseg_jax.models.pks.PKS` reads
them so).

Batches are dicts of NumPy arrays of the *host-local* batch size (global
batch / process count). Images are uint8 [B, S, S, 3] ([B / k, ...] when
grouped), the content placed at the top-left of the canvas (or filling
it: 'stretch'); points and boxes are normalised by the canvas side S, (y,
x) and (ymin, xmin, ymax, xmax). What a batch holds depends on
the supervision, so that a mode cannot see labels it must not use:

    text   image, text_tokens, text_mask, image_id (int32 [B] or [B / k])
    click  + clicks [B, 3, 2] (centre, top-left, bottom-right), box [B, 4]
           (the span of the corner clicks; see `click_labels`)
    full   + mask uint8 [B, S, S]
    mixed  image, text_tokens, text_mask, clicks, box, mask and
           labelled_with int32 [B]: each example's labels
           (`LABEL_KINDS`: 0 mask, 1 clicks, 2 text only), drawn per
           referent from `config.supervision` (`label_kinds`); the labels
           an example lacks are zeros (`hide_labels`). With
           `config.oversample_masked` r, each example (each image when
           grouped) is drawn with probability r from the masked referents
           alone instead, so masks fill more of a batch than their share of
           the referents, which stays as drawn

Evaluation batches (every mode) hold the text-mode fields plus what scoring
at the original resolution needs (see `refseg_jax.evaluation`): eval_mask
uint8 [B, M, M] (ground truth at the original size, padded to M),
orig_size and content_size int32 [B, 2], valid bool [B] (False on the
padding that completes the last batch), image_id and sentence_id int32, and
the host-only `sentence` (bytes, for pictures; never send it to a device).
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import transformers

from refseg_jax.data.ref_shapes import builder as ref_shapes

SUPERVISION_FIELDS = {
    # The image ids tell text supervision which images in a batch are the
    # same (its contrastive loss must not count them as negatives).
    'text': ('image', 'image_id', 'text_tokens', 'text_mask'),
    'click': ('image', 'text_tokens', 'text_mask', 'box', 'clicks'),
    'full': ('image', 'text_tokens', 'text_mask', 'box', 'clicks', 'mask'),
    'mixed': ('image', 'text_tokens', 'text_mask', 'box', 'clicks', 'mask',
              'labelled_with'),
}
# What a referent of a 'mixed' run is labelled with, by `labelled_with`
# index: its mask (and so its exact clicks and box), its clicks (and the box
# their corners span), or nothing beyond its sentences.
LABEL_KINDS = ('mask', 'clicks', 'text')
EVAL_FIELDS = ('image', 'text_tokens', 'text_mask', 'eval_mask', 'orig_size',
               'content_size', 'valid', 'image_id', 'sentence_id', 'sentence')
# The values of config.data.resize (`fit_image`).
RESIZE_MODES = ('letterbox', 'stretch')
# Datasets that ship their own vocabulary (used when config.tokenizer is None).
_DATASET_VOCABS = {'ref_shapes': ref_shapes.vocab_path}


def load_tokenizer(path: str | None, dataset: str
                   ) -> transformers.PreTrainedTokenizerFast:
  """A fast BERT tokenizer from a `vocab.txt` or a local HF directory.

  Args:
    path: a WordPiece `vocab.txt`, or a Hugging Face tokenizer directory; None
      takes the vocabulary that `dataset` ships (only ref_shapes has one).
    dataset: TFDS name of the dataset, for the default.
  """
  if path is None:
    base = dataset.split('/')[0]
    if base not in _DATASET_VOCABS:
      raise ValueError(f'Dataset {dataset!r} ships no vocabulary: set '
                       'config.data.tokenizer to a local tokenizer directory.')
    path = _DATASET_VOCABS[base]()
  if tf.io.gfile.isdir(path):
    return transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True, use_fast=True)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'Tokenizer {path!r} does not exist.')
  return transformers.BertTokenizerFast(vocab=path, do_lower_case=True)


def swap_left_right(sentence: tf.Tensor) -> tf.Tensor:
  """Swaps `left` and `right` at word starts (leftmost -> rightmost)."""
  # RE2 has no callback replacement: swap through a placeholder byte.
  sentence = tf.strings.regex_replace(sentence, r'\bleft', '\x00')
  sentence = tf.strings.regex_replace(sentence, r'\bright', 'left')
  return tf.strings.regex_replace(sentence, '\x00', 'right')


def _expressions(example: dict) -> tf.data.Dataset:
  """One element per expression of an image, with its object's labels."""
  objects = example['objects']
  refs = objects['refs']
  index = refs['sentence'].value_rowids()
  return tf.data.Dataset.from_tensor_slices({
      'image': tf.fill(tf.shape(index), example['image']),
      'image_id': tf.fill(tf.shape(index), example['image/id']),
      'sentence': refs['sentence'].flat_values,
      'sentence_id': refs['sentence_id'].flat_values,
      'object_id': tf.gather(objects['id'], index),
      'mask_png': tf.gather(objects['mask'], index),
      'box': tf.gather(objects['box'], index),
      'clicks': tf.gather(objects['clicks'], index),
  })


def _decode(element: dict, with_mask: bool) -> dict:
  """Decodes the image and (`with_mask`) the mask PNG(s), [...] -> [..., H, W]."""
  element = dict(element)
  element['image'] = tf.io.decode_image(
      element['image'], channels=3, expand_animations=False)
  mask_png = element.pop('mask_png')
  if with_mask:
    decode = lambda png: tf.io.decode_png(png, channels=1)[..., 0]
    element['mask'] = (decode(mask_png) if mask_png.shape.rank == 0 else
                       tf.map_fn(decode, mask_png,
                                 fn_output_signature=tf.uint8))
  return element


def _image_group(index: tf.Tensor, example: dict, size: int, seed: int,
                 eligible: tf.Tensor | None = None) -> dict:
  """`size` expressions of one image (see `expressions_per_image`).

  A random order of the image's expressions (of those where `eligible`
  [expressions] is True, if given; at least one must be), cycled when it
  has fewer than `size`; labels get a leading [size] axis, the image stays
  single.
  """
  objects = example['objects']
  refs = objects['refs']
  object_of = refs['sentence'].value_rowids()
  candidates = (tf.range(tf.size(object_of, out_type=tf.int64))
                if eligible is None else
                tf.where(eligible)[:, 0])
  count = tf.size(candidates)
  order = tf.argsort(tf.random.stateless_uniform(
      [count], seed=tf.stack([tf.cast(seed, tf.int64), index])))
  picks = tf.gather(candidates, tf.gather(order, tf.range(size) % count))
  objects_picked = tf.gather(object_of, picks)
  return {
      'image': example['image'],
      'image_id': example['image/id'],
      'sentence': tf.gather(refs['sentence'].flat_values, picks),
      'sentence_id': tf.gather(refs['sentence_id'].flat_values, picks),
      'object_id': tf.gather(objects['id'], objects_picked),
      'mask_png': tf.gather(objects['mask'], objects_picked),
      'box': tf.gather(objects['box'], objects_picked),
      'clicks': tf.gather(objects['clicks'], objects_picked),
  }


def _ungroup(batch: dict) -> dict:
  """[images, k, ...] labels -> [images * k, ...]; images stay [images, ...]."""
  return {key: value if key in ('image', 'image_id') else
          tf.reshape(value, [-1] + value.shape[2:].as_list())
          for key, value in batch.items()}


def flip(element: dict) -> dict:
  """Mirrors image, mask, box, clicks and the words left/right together.

  The labels may carry leading group axes (mask [..., H, W], box [..., 4],
  clicks [..., 3, 2], sentence [...]): all of them are mirrored.
  """
  element = dict(element)
  element['image'] = element['image'][:, ::-1]
  if 'mask' in element:
    element['mask'] = element['mask'][..., ::-1]
  ymin, xmin, ymax, xmax = tf.unstack(element['box'], axis=-1)
  element['box'] = tf.stack([ymin, 1 - xmax, ymax, 1 - xmin], axis=-1)
  clicks = element['clicks']  # Rows: centre, top-left, bottom-right.
  # The mirrored box's top-left corner is the mirror of its top-right one.
  element['clicks'] = tf.stack(
      [clicks[..., 0], 1 - tf.gather(clicks[..., 1], [0, 2, 1], axis=-1)],
      axis=-1)
  element['sentence'] = swap_left_right(element['sentence'])
  return element


def click_labels(element: dict, noise: float | tf.Tensor,
                 seed: tf.Tensor, miss: float | tf.Tensor = 0.0) -> dict:
  """What a clicking annotator gives: clicks, and the box they span.

  Each click (image-normalised) moves by a Gaussian shift with standard
  deviation `noise` x the box's height and width, clipped to the image;
  with probability `miss` the centre click instead lands anywhere in the
  box, uniformly (on the object or not: a careless annotator). The box
  becomes the span of the two corner clicks, so that click supervision
  never uses a box the clicks do not give.

  Args:
    element: with 'box' [..., 4] and 'clicks' [..., 3, 2] (centre,
      top-left, bottom-right), image-normalised.
    noise: shift scale as a fraction of the box size (0 = exact clicks);
      a scalar or one per example [...].
    seed: [2] int stateless seed of the shifts.
    miss: probability that the centre click misses; a scalar or one per
      example [...] (a Python 0 draws nothing).
  """
  ymin, xmin, ymax, xmax = tf.unstack(element['box'], axis=-1)
  size = tf.stack([ymax - ymin, xmax - xmin], axis=-1)
  scale = tf.cast(noise, tf.float32)[..., None] * size
  shift = tf.random.stateless_normal(
      tf.shape(element['clicks']), seed=seed) * scale[..., None, :]
  clicks = tf.clip_by_value(element['clicks'] + shift, 0.0, 1.0)
  if isinstance(miss, tf.Tensor) or miss:
    seeds = tf.random.experimental.stateless_split(seed, 2)
    anywhere = element['box'][..., :2] + size * tf.random.stateless_uniform(
        tf.shape(size), seed=seeds[0])
    missed = tf.random.stateless_uniform(
        tf.shape(size)[:-1], seed=seeds[1]) < miss
    clicks = tf.concat([tf.where(missed[..., None], anywhere,
                                 clicks[..., 0, :])[..., None, :],
                        clicks[..., 1:, :]], axis=-2)
  corners = clicks[..., 1:, :]
  box = tf.concat([tf.reduce_min(corners, -2), tf.reduce_max(corners, -2)],
                  axis=-1)
  return dict(element, clicks=clicks, box=box)


def label_kinds(object_id: tf.Tensor, fractions: Mapping[str, float]
                ) -> tf.Tensor:
  """int32 `LABEL_KINDS` index of each referent `object_id` [...].

  A fingerprint of the id (FarmHash, the same on every host, run and
  restart), read as a uniform number in [0, 1), falls into one of the
  consecutive intervals of `fractions` ({kind: fraction}, summing to 1;
  `check_fractions`), so each kind's share of the referents of any split
  is its fraction up to sampling noise, and a referent keeps its labels
  across epochs.
  """
  fractions = check_fractions(fractions)
  buckets = 2**30
  uniform = tf.cast(tf.strings.to_hash_bucket_fast(
      tf.strings.as_string(object_id), buckets), tf.float64) / buckets
  bounds = np.cumsum([fractions[kind] for kind in LABEL_KINDS])[:-1]
  return tf.cast(tf.reduce_sum(tf.cast(
      uniform[..., None] >= bounds, tf.int32), -1), tf.int32)


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
  """{kind: fraction} for every `LABEL_KINDS` (missing ones 0), or a
  ValueError naming the bad key or the sum."""
  unknown = sorted(set(fractions) - set(LABEL_KINDS))
  if unknown:
    raise ValueError(f'config.data.supervision has unknown kinds {unknown}; '
                     f'known: {list(LABEL_KINDS)}.')
  values = {kind: float(fractions.get(kind) or 0.0) for kind in LABEL_KINDS}
  for kind, value in values.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'config.data.supervision.{kind}={value} is not a '
                       'fraction in [0, 1].')
  if abs(sum(values.values()) - 1.0) > 1e-6:
    raise ValueError(f'config.data.supervision {values} sums to '
                     f'{sum(values.values())}, not 1.')
  return values


def hide_labels(element: dict, kind: tf.Tensor) -> dict:
  """Zeros the labels an example's `kind` [...] does not give: the mask
  unless 'mask', the clicks and box too when 'text'."""
  has_mask = tf.equal(kind, LABEL_KINDS.index('mask'))
  has_clicks = tf.not_equal(kind, LABEL_KINDS.index('text'))
  keep = lambda value, flag: tf.where(
      tf.reshape(flag, tf.concat([tf.shape(flag), tf.ones(
          [value.shape.rank - flag.shape.rank], tf.int32)], 0)),
      value, tf.zeros_like(value))
  return dict(element, mask=keep(element['mask'], has_mask),
              clicks=keep(element['clicks'], has_clicks),
              box=keep(element['box'], has_clicks), labelled_with=kind)


def content_size(orig: tf.Tensor, size: int) -> tf.Tensor:
  """int32 (h, w) an image of `orig` (H, W) takes on a size x size canvas:
  the longer side becomes `size`, the aspect is kept."""
  scale = size / tf.cast(tf.reduce_max(orig), tf.float32)
  content = tf.cast(tf.round(tf.cast(orig, tf.float32) * scale), tf.int32)
  return tf.clip_by_value(content, 1, size)


def _fit(image: tf.Tensor, content: tf.Tensor, size: int,
         method: str) -> tf.Tensor:
  """A float [H, W, C] image resized to `content` and padded bottom-right
  to size x size."""
  # Images already at the canvas size (ref_shapes) skip a costly no-op.
  resized = tf.cond(
      tf.reduce_all(content == tf.shape(image)[:2]), lambda: image,
      lambda: tf.image.resize(image, content, method=method, antialias=True))
  return tf.image.pad_to_bounding_box(resized, 0, 0, size, size)


def _canvas(image: tf.Tensor, content: tf.Tensor,
            size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 canvas, content) of a uint8 image resized to `content`."""
  canvas = _fit(tf.cast(image, tf.float32), content, size, 'bilinear')
  return tf.cast(tf.round(tf.clip_by_value(canvas, 0, 255)), tf.uint8), content


def letterbox(image: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 [size, size, 3] canvas, int32 content (h, w)) of a uint8
  [H, W, 3] image: resized keeping its aspect (bilinear, antialiased),
  placed top-left, zero padding. config.data.resize='letterbox'."""
  return _canvas(image, content_size(tf.shape(image)[:2], size), size)


def stretch(image: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 [size, size, 3] canvas, int32 content (size, size)) of a uint8
  [H, W, 3] image: resized to size x size (bilinear, antialiased), the
  aspect not kept, as the official Shatter-and-Gather code does.
  config.data.resize='stretch'."""
  return _canvas(image, tf.constant([size, size], tf.int32), size)


def check_resize(resize: str) -> str:
  """`resize` if it is one of `RESIZE_MODES`, else a ValueError naming
  config.data.resize."""
  if resize not in RESIZE_MODES:
    raise ValueError(f'Unknown config.data.resize={resize!r}; expected one '
                     f'of {RESIZE_MODES}.')
  return resize


def resize_of(config: ml_collections.ConfigDict) -> str:
  """The data config's checked `resize`; 'letterbox' for configs saved
  before the key existed (their runs letterboxed)."""
  return check_resize(config.get('resize', 'letterbox'))


def fit_image(image: tf.Tensor, size: int,
              resize: str) -> tuple[tf.Tensor, tf.Tensor]:
  """(uint8 [size, size, 3] canvas, int32 content (h, w)) of a uint8
  [H, W, 3] image, by `resize` ('letterbox' or 'stretch', see
  `letterbox` and `stretch`). Training, evaluation and prediction
  (`refseg_jax.predict`) all see images through it; the content (h, w)
  is what `refseg_jax.evaluation.metrics.resize_to_original` maps back to
  the original size."""
  fits = {'letterbox': letterbox, 'stretch': stretch}
  return fits[check_resize(resize)](image, size)


def _resize_and_pad(element: dict, size: int,
                    resize: str = 'letterbox') -> dict:
  """Fits the image (and mask, box, clicks) in a size x size canvas by
  `resize` (`fit_image`): the mask is resized as the image, then
  thresholded at 0.5; the image-normalised box and clicks become
  canvas-normalised (unchanged when stretched)."""
  element = dict(element)
  orig = tf.shape(element['image'])[:2]
  element['image'], content = fit_image(element['image'], size, resize)
  if 'mask' in element:
    mask = _fit(tf.cast(element['mask'][..., None], tf.float32), content,
                size, 'bilinear')
    element['mask'] = tf.cast(mask[..., 0] >= 0.5, tf.uint8)
  # From image-normalised to canvas-normalised coordinates (content / size
  # is exactly 1 when stretched).
  yx = tf.cast(content, tf.float32) / size
  element['box'] = element['box'] * tf.tile(yx, [2])
  element['clicks'] = element['clicks'] * yx
  element['orig_size'] = orig
  element['content_size'] = content
  return element


def _eval_fields(element: dict, mask_size: int) -> dict:
  """Keeps the original-resolution mask, padded to mask_size, for scoring."""
  mask = element['mask']
  shape = tf.shape(mask)
  with tf.control_dependencies([tf.debugging.Assert(
      tf.reduce_all(shape <= mask_size),
      ['Image', element['image_id'], 'of size', shape,
       'exceeds config.data.eval_mask_size', mask_size])]):
    # Clamped so that the Assert, not a trace-time shape error, reports it.
    padded = tf.pad(mask, tf.maximum(
        [[0, mask_size - shape[0]], [0, mask_size - shape[1]]], 0))
  element = dict(element, eval_mask=padded, valid=True,
                 image_id=tf.cast(element['image_id'], tf.int32),
                 sentence_id=tf.cast(element['sentence_id'], tf.int32))
  return {k: v for k, v in element.items() if k != 'mask'}


def tokenize(tokenizer, sentences: list[str], max_len: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """int32 (tokens, attention mask) [len(sentences), max_len]: padded, and
  truncated at `max_len` tokens (special tokens included)."""
  encoded = tokenizer(list(sentences), padding='max_length', truncation=True,
                      max_length=max_len, return_tensors='np')
  return (encoded['input_ids'].astype(np.int32),
          encoded['attention_mask'].astype(np.int32))


def _tokenize(batch: dict, tokenizer, max_len: int) -> dict:
  """Adds text_tokens and text_mask [B, max_len] (int32)."""
  tokens, mask = tf.numpy_function(
      lambda sentences: tokenize(tokenizer, [s.decode() for s in sentences],
                                 max_len),
      [batch['sentence']], (tf.int32, tf.int32), stateful=False)
  shape = [batch['sentence'].shape[0], max_len]
  return dict(batch, text_tokens=tf.ensure_shape(tokens, shape),
              text_mask=tf.ensure_shape(mask, shape))


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f'Batch size {global_batch_size} is not divisible by '
                     f'the process count {process_count}.')
  return global_batch_size // process_count


def prepared_builder(config: ml_collections.ConfigDict
                     ) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `config.name`; an error says how to build it."""
  builder = tfds.builder(config.name, data_dir=config.data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'Dataset {config.name} is not built in {builder.data_dir}: run '
        f'python -m refseg_jax.data.build --dataset={config.name}'
        + (f' --data_dir={config.data_dir}' if config.data_dir else ''))
  return builder


def eval_splits(config: ml_collections.ConfigDict) -> list[str]:
  """The splits of the built dataset an evaluation may read (all but
  'train'): ref_shapes' validation, test, test_novel; RefCOCO's val, testA,
  testB or test."""
  return [s for s in prepared_builder(config).info.splits if s != 'train']


def _host_images(config: ml_collections.ConfigDict, split: str,
                 process_index: int, process_count: int,
                 shuffle_files: bool = False,
                 seed: int | None = None) -> tf.data.Dataset:
  """This host's slice of `split`, images and masks left encoded."""
  builder = prepared_builder(config)
  host_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  return builder.as_dataset(
      split=host_split, shuffle_files=shuffle_files,
      decoders={'image': tfds.decode.SkipDecoding(),
                'objects': {'mask': tfds.decode.SkipDecoding()}},
      read_config=tfds.ReadConfig(shuffle_seed=seed))


def _examples(images: tf.data.Dataset, group: int, seed: int
              ) -> tf.data.Dataset:
  """Training examples of `images`: expressions, or (`group` k >= 1) groups
  of k expressions of one image (`_image_group`)."""
  if not group:
    return images.flat_map(_expressions)
  # The picks depend on the image's position in the (repeated) stream.
  return images.enumerate().map(lambda i, e: _image_group(i, e, group, seed),
                                num_parallel_calls=tf.data.AUTOTUNE)


def _masked_examples(images: tf.data.Dataset, group: int, seed: int,
                     fractions: Mapping[str, float]) -> tf.data.Dataset:
  """`_examples` of the referents labelled with masks only (`label_kinds`);
  in groups, the images that have one, and their masked referents' k
  expressions."""
  mask = LABEL_KINDS.index('mask')
  if not group:
    return _examples(images, group, seed).filter(
        lambda e: tf.equal(label_kinds(e['object_id'], fractions), mask))

  def with_eligible(example):  # Each expression: is its referent masked?
    objects = example['objects']
    masked = tf.equal(label_kinds(objects['id'], fractions), mask)
    return example, tf.gather(masked,
                              objects['refs']['sentence'].value_rowids())

  return (images.map(with_eligible)
          .filter(lambda _, eligible: tf.reduce_any(eligible))
          .enumerate()
          .map(lambda i, pair: _image_group(i, pair[0], group, seed,
                                            pair[1]),
               num_parallel_calls=tf.data.AUTOTUNE))


def train_dataset(config: ml_collections.ConfigDict, supervision: str,
                  global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1,
                  skip_batches: int = 0) -> tf.data.Dataset:
  """Endless, shuffled training batches of this host's share of the data.

  Args:
    config: the data config (`configs/common.py`, `data_config`).
    supervision: 'full', 'click', 'text' or 'mixed'; selects the fields
      (module doc).
    global_batch_size: examples per step over all hosts.
    seed: shuffling and flipping seed; the same seed gives the same order.
    process_index: this host.
    process_count: number of hosts.
    skip_batches: batches to leave out at the start, so that a run resumed
      at step N sees exactly the batches N, N+1, ... of an uninterrupted
      one. Skipping happens before decoding, so it costs reading the
      records only.
  """
  if supervision not in SUPERVISION_FIELDS:
    raise ValueError(f'Unknown supervision {supervision!r}; expected one of '
                     f'{sorted(SUPERVISION_FIELDS)}.')
  clicking = supervision in ('click', 'mixed')
  for key in ('click_noise', 'click_miss'):
    if config[key] and not clicking:
      raise ValueError(f'config.data.{key}={config[key]} applies to click '
                       f"and mixed supervision only, not {supervision!r}.")
  oversampled = (config.get('oversample_masked') or 0.0
                 if supervision == 'mixed' else 0.0)
  if supervision == 'mixed':
    if config.get('supervision') is None:
      raise ValueError('Mixed supervision needs config.data.supervision, '
                       "the fraction of referents of each kind, e.g. "
                       "{'mask': 0.1, 'clicks': 0.9} (configs/mixed.py).")
    fractions = check_fractions(config.supervision)
    if not 0.0 <= oversampled < 1.0 or (oversampled and not fractions['mask']):
      raise ValueError(
          f'config.data.oversample_masked={oversampled} must be in [0, 1), '
          'and 0 when no referent has a mask (config.data.supervision.mask='
          f"{fractions['mask']}).")
  resize = resize_of(config)
  tokenizer = load_tokenizer(config.tokenizer, config.name)
  group = config.expressions_per_image
  local_batch = _local_batch_size(global_batch_size, process_count)
  if group and local_batch % group:
    raise ValueError(f'The per-host batch {local_batch} is not divisible by '
                     f'config.data.expressions_per_image={group}.')
  images = lambda: _host_images(config, 'train', process_index,
                                process_count, shuffle_files=True,
                                seed=seed).repeat()
  ds = _examples(images(), group, seed)
  if oversampled:
    masked = _masked_examples(images(), group, seed + 1, config.supervision)
    ds = tf.data.Dataset.sample_from_datasets(
        [ds, masked], [1.0 - oversampled, oversampled], seed=seed)
  if group:
    local_batch //= group  # Batches of images from here on.
  ds = ds.shuffle(config.shuffle_buffer, seed=seed)
  ds = ds.enumerate()  # A per-element index keeps random flips reproducible.
  ds = ds.skip(skip_batches * local_batch)

  def prepare(index, element):
    element = _decode(element, with_mask=supervision in ('full', 'mixed'))
    example_seed = tf.stack([tf.cast(seed, tf.int64), index])
    if config.flip:
      coin = tf.random.stateless_uniform([], seed=example_seed)
      element = tf.cond(coin < 0.5, lambda: flip(element), lambda: element)
    click_seed = tf.random.experimental.stateless_fold_in(example_seed, 1)
    if supervision == 'click':
      element = click_labels(element, config.click_noise, click_seed,
                             config.click_miss)
    elif supervision == 'mixed':
      kind = label_kinds(element['object_id'], config.supervision)
      # Only clicking annotators err: a masked referent's clicks are its
      # mask's own (`features.clicks_from_mask_and_box`), exact.
      clicked = tf.equal(kind, LABEL_KINDS.index('clicks'))
      element = click_labels(
          element, tf.where(clicked, config.click_noise, 0.0), click_seed,
          tf.where(clicked, config.click_miss, 0.0) if config.click_miss
          else 0.0)
      element = hide_labels(element, kind)
    return _resize_and_pad(element, config.image_size, resize)

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  if group:
    ds = ds.map(_ungroup)
  ds = ds.map(lambda b: _tokenize(b, tokenizer, config.max_text_len),
              num_parallel_calls=tf.data.AUTOTUNE)
  fields = SUPERVISION_FIELDS[supervision]
  ds = ds.map(lambda b: {k: tf.cast(b[k], tf.int32) if k == 'image_id' else
                         b[k] for k in fields})
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def count_expressions(config: ml_collections.ConfigDict, split: str,
                      process_index: int = 0, process_count: int = 1) -> int:
  """Number of expressions in this host's slice of `split`."""
  ds = _host_images(config, split, process_index, process_count)
  ds = ds.map(lambda e: tf.size(e['objects']['refs']['sentence_id'].flat_values,
                                out_type=tf.int64))
  return int(ds.reduce(np.int64(0), lambda total, n: total + n))


def eval_dataset(config: ml_collections.ConfigDict, split: str,
                 global_batch_size: int, num_batches: int,
                 process_index: int = 0,
                 process_count: int = 1) -> tf.data.Dataset:
  """Every expression of this host's slice once, in `num_batches` batches.

  Args:
    config: the data config.
    split: e.g. 'validation'.
    global_batch_size: examples per step over all hosts.
    num_batches: batches every host yields, the last ones completed with
      padding (valid=False); see `num_eval_batches`.
    process_index: this host.
    process_count: number of hosts.
  """
  resize = resize_of(config)
  tokenizer = load_tokenizer(config.tokenizer, config.name)
  local_batch = _local_batch_size(global_batch_size, process_count)
  ds = _host_images(config, split, process_index,
                    process_count).flat_map(_expressions)

  def prepare(element):
    element = _resize_and_pad(_decode(element, with_mask=True),
                              config.image_size, resize)
    return _eval_fields(element, config.eval_mask_size)

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(tf.nest.map_structure(
      lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec))
  ds = ds.concatenate(padding.repeat()).take(num_batches * local_batch)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(lambda b: _tokenize(b, tokenizer, config.max_text_len))
  ds = ds.map(lambda b: {k: b[k] for k in EVAL_FIELDS})
  return ds.prefetch(tf.data.AUTOTUNE)


def num_eval_batches(config: ml_collections.ConfigDict, split: str,
                     global_batch_size: int) -> int:
  """Batches per host so that every host's slice fits (same on all hosts)."""
  local_batch = _local_batch_size(global_batch_size, jax.process_count())
  count = count_expressions(config, split, jax.process_index(),
                            jax.process_count())
  most = int(np.max(multihost_utils.process_allgather(np.int64(count))))
  return max(1, math.ceil(most / local_batch))
