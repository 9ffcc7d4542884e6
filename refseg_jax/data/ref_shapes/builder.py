"""`ref_shapes`: the built-in referring-segmentation benchmark (TFDS).

Procedural scenes of 2-6 coloured shapes with RefCOCO-style expressions
(attribute, absolute location, relation; see `language.py`), in the
schema of `refseg_jax.data.features`. Nothing is downloaded; the same
version and config give byte-identical TFRecords.

Splits: `train`, `validation`, `test` refer to colour-shape pairs outside
`NOVEL_PAIRS`; `test_novel` refers only to pairs in `NOVEL_PAIRS`, which
`train` never refers to nor names, to measure compositional
generalisation. Objects of any pair may appear in any scene as distractors.

Build: `python -m refseg_jax.data.build --dataset=ref_shapes/tiny`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import multiprocessing
import os
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from refseg_jax.data import features as features_lib
from refseg_jax.data.ref_shapes import language as lang
from refseg_jax.data.ref_shapes import scene as shapes_scene

SPLITS = ('train', 'validation', 'test', 'test_novel')
# (colour, shape) pairs held out of train; each colour and shape still
# occurs in train with other partners.
NOVEL_PAIRS = frozenset({('red', 'star'), ('orange', 'hexagon'),
                         ('yellow', 'circle'), ('green', 'triangle'),
                         ('blue', 'square'), ('purple', 'star'),
                         ('cyan', 'hexagon'), ('brown', 'circle')})
# Spatial words are only used when the answer is clear by this margin.
SPATIAL_MARGIN = 0.06
VOCAB_FILE = 'vocab.txt'
_SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# Keeps ids disjoint across splits and sentence ids within int32.
_IMAGE_ID_BASE = {split: i * 1_000_000 for i, split in enumerate(SPLITS)}
_MAX_OBJECTS = 10  # Object and ref ids are image_id * _MAX_OBJECTS + index.
# Below this many images per worker (over all splits), starting processes
# costs more than it saves.
_MIN_IMAGES_PER_WORKER = 2_000


@dataclasses.dataclass
class RefShapesConfig(tfds.core.BuilderConfig):
  """Image size and per-split image counts of one `ref_shapes` variant."""
  image_size: int = 128
  num_images: Mapping[str, int] = dataclasses.field(default_factory=dict)
  seed: int = 0


def wordpiece_vocab() -> list[str]:
  """The BERT WordPiece vocabulary: special tokens, then every word."""
  return list(_SPECIAL_TOKENS) + lang.vocabulary()


def vocab_path() -> str:
  """Path of the shipped `vocab.txt`, loadable by `BertTokenizerFast`."""
  return str(importlib.resources.files(__package__) / VOCAB_FILE)


def _is_novel(obj: lang.SceneObject) -> bool:
  return (obj.colour, obj.shape) in NOVEL_PAIRS


def make_example(config: RefShapesConfig, split: str, index: int
                 ) -> tuple[shapes_scene.Scene, dict[int, list[str]], dict]:
  """Scene, sentences and TFDS example of image `index` of `split`."""
  rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
  novel = split == 'test_novel'
  first_pair = None
  if novel:  # Every test_novel scene holds at least one novel pair.
    pairs = sorted(NOVEL_PAIRS)
    first_pair = pairs[rng.integers(len(pairs))]
  scene, sentences = shapes_scene.referred_scene(
      rng, config.image_size,
      may_refer=lambda o: _is_novel(o) == novel,
      may_name=lambda o: novel or not _is_novel(o),
      margin=SPATIAL_MARGIN, first_pair=first_pair)
  image_id = _IMAGE_ID_BASE[split] + index
  objects = []
  for k, (mask, obj) in enumerate(zip(scene.masks, scene.objects)):
    object_id = image_id * _MAX_OBJECTS + k
    box = features_lib.box_from_mask(mask)
    objects.append({
        'id': object_id,
        'box': tfds.features.BBox(*box),
        'mask': features_lib.png_bytes(mask),
        'category': obj.shape,
        'clicks': features_lib.clicks_from_mask_and_box(mask, box),
        'refs': [{'id': object_id,
                  'sentence_id': object_id * _MAX_OBJECTS + s,
                  'sentence': sentence}
                 for s, sentence in enumerate(sentences.get(k, []))],
    })
  example = {'image': features_lib.png_bytes(scene.image), 'image/id': image_id, 'objects': objects}
  return scene, sentences, example


def _tfds_example(config: RefShapesConfig, split: str, index: int) -> dict:
  return make_example(config, split, index)[2]


class RefShapes(tfds.core.GeneratorBasedBuilder):
  """Procedural referring expression segmentation of coloured shapes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  _pool = None  # The scene workers while `_download_and_prepare` runs.
  BUILDER_CONFIGS = [
      RefShapesConfig(
          name='default', description='128 px, 20k train images.',
          image_size=128,
          num_images={'train': 20_000, 'validation': 1_000, 'test': 1_000,
                      'test_novel': 1_000}),
      RefShapesConfig(
          name='tiny', description='64 px, a few hundred images, for tests.',
          image_size=64,
          num_images={'train': 240, 'validation': 48, 'test': 48,
                      'test_novel': 48}),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features_lib.features('png'),
        description=__doc__)

  def _download_and_prepare(self, dl_manager, download_config):
    with features_lib.deterministic_serialization(), self._worker_pool():
      return super()._download_and_prepare(dl_manager, download_config)

  @contextlib.contextmanager
  def _worker_pool(self):
    """Worker processes that render the scenes of every split.

    One pool serves all splits: starting one costs ~5 s (each worker
    imports TensorFlow), so the small splits get workers for free. Scenes
    are independent ('spawn': forking a process that runs TensorFlow is
    unsafe), and each image's RNG depends only on (seed, split, index), so
    the records do not depend on the number of workers.
    """
    total = sum(self.builder_config.num_images.values())
    workers = min(os.cpu_count() or 1, total // _MIN_IMAGES_PER_WORKER)
    if workers < 2:  # Scenes render in this process.
      yield
      return
    with multiprocessing.get_context('spawn').Pool(workers) as pool:
      self._pool = pool
      try:
        yield
      finally:
        self._pool = None

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    count = self.builder_config.num_images[split]
    generate = functools.partial(_tfds_example, self.builder_config, split)
    # imap keeps the order.
    images = (self._pool.imap(generate, range(count), chunksize=64)
              if self._pool else map(generate, range(count)))
    yield from enumerate(images)
