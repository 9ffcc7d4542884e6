"""`refcoco`: RefCOCO, RefCOCO+ and RefCOCOg from the `refer` downloads (TFDS).

Built from files you download yourself (see `MANUAL_DOWNLOAD_INSTRUCTIONS`
and docs/refcoco.md) into the schema of `refseg_jax.data.features`:

    python -m refseg_jax.data.build --dataset=refcoco/refcoco_unc \\
        --manual_dir=/path/to/refer/data [--clicks_file=F] [--skip_bad]

One example per (split, image): the image's original JPEG bytes, `image/id`
the COCO image id (Google splits may hold an image in several splits), and
one object per annotation referred to in that split, `id` the COCO
annotation id, with its mask (COCO polygons or RLE decoded at the image's
size), its tight box, its category and its refs (ref id, sentence id and
the refer toolkit's lower-case `sent`).

Clicks: simulated by default, as for every dataset of the schema (the mask
pixel nearest the mask centroid, and the box corners); or read from a
clicks JSON file (`clicks_file`, format in `refer_files.load_clicks`).

Bad input stops the build with an error naming the file and the id: a
missing file, a refs pickle that holds anything but plain data, a ref whose
annotation (or image) is missing from instances.json, a sentence without a
word, an image that cannot be read, is in a format TensorFlow does not
decode or has another size than instances.json says, a segmentation that
decodes to an empty mask, a box without area or outside the image, an
annotation without clicks in the clicks file or with clicks outside the
image. With `skip_bad`, the flawed refs, sentences, images and objects are
left out with a warning each and counted in the dataset's metadata
(`skipped`) instead.
TFDS writes into a temporary folder and renames it only on success, so a
failed build leaves no dataset that looks complete, and a killed one only
that folder, which no reader opens; the next build starts afresh.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
from typing import Callable, Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from refseg_jax.data import features as features_lib
from refseg_jax.data.refcoco import refer_files

IMAGE_DIR = 'images/mscoco/images/train2014'
# The image formats (PIL's names) that every TensorFlow 2's decode_image
# reads (recent ones read WebP too): the input pipeline decodes the stored
# bytes with it.
_DECODABLE_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP')

_MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Pass the `refer` toolkit's data folder (github.com/lichengunc/refer, its
`data/`) as the manual dir. A config needs its own refs file, that
dataset's instances.json and the COCO train2014 images:

    <manual_dir>/refcoco/refs(unc).p         refcoco_unc
    <manual_dir>/refcoco/refs(google).p      refcoco_google
    <manual_dir>/refcoco/instances.json
    <manual_dir>/refcoco+/refs(unc).p        refcocoplus_unc
    <manual_dir>/refcoco+/instances.json
    <manual_dir>/refcocog/refs(umd).p        refcocog_umd
    <manual_dir>/refcocog/refs(google).p     refcocog_google
    <manual_dir>/refcocog/instances.json
    <manual_dir>/images/mscoco/images/train2014/COCO_train2014_%012d.jpg

refcoco.zip, refcoco+.zip and refcocog.zip (links in the refer README,
https://bvisionweb1.cs.unc.edu/licheng/referit/data/<name>.zip) unzip into
<manual_dir>; COCO's train2014.zip
(http://images.cocodataset.org/zips/train2014.zip) into
<manual_dir>/images/mscoco/images/. Then:

    python -m refseg_jax.data.build --dataset=refcoco/refcoco_unc \\
        --manual_dir=<manual_dir>
"""

_CITATION = """\
@inproceedings{yu2016modeling,
  title={Modeling Context in Referring Expressions},
  author={Yu, Licheng and Poirson, Patrick and Yang, Shan and Berg,
          Alexander C. and Berg, Tamara L.},
  booktitle={ECCV}, year={2016}}
@inproceedings{mao2016generation,
  title={Generation and Comprehension of Unambiguous Object Descriptions},
  author={Mao, Junhua and Huang, Jonathan and Toshev, Alexander and
          Camburu, Oana and Yuille, Alan L. and Murphy, Kevin},
  booktitle={CVPR}, year={2016}}
@inproceedings{nagaraja2016modeling,
  title={Modeling Context Between Objects for Referring Expression
         Understanding},
  author={Nagaraja, Varun K. and Morariu, Vlad I. and Davis, Larry S.},
  booktitle={ECCV}, year={2016}}
"""


@dataclasses.dataclass
class RefCocoConfig(tfds.core.BuilderConfig):
  """One dataset and partition of the refer toolkit."""
  folder: str = 'refcoco'     # The dataset's folder in the manual dir.
  split_by: str = 'unc'       # The refs file is `refs(<split_by>).p`.
  splits: tuple[str, ...] = ()  # The split names its refs may carry.

  def refs_path(self, root: epath.Path) -> epath.Path:
    return root / self.folder / f'refs({self.split_by}).p'

  def instances_path(self, root: epath.Path) -> epath.Path:
    return root / self.folder / 'instances.json'


_UNC_SPLITS = ('train', 'val', 'testA', 'testB')
# (name, folder, split_by, splits, description) of each partition.
_PARTITIONS = [
    ('refcoco_unc', 'refcoco', 'unc', _UNC_SPLITS,
     'RefCOCO, UNC partition (Yu et al. 2016).'),
    ('refcoco_google', 'refcoco', 'google', ('train', 'val', 'test'),
     'RefCOCO, Google partition (images may be shared between splits).'),
    ('refcocoplus_unc', 'refcoco+', 'unc', _UNC_SPLITS,
     'RefCOCO+ (no location words), UNC partition.'),
    ('refcocog_umd', 'refcocog', 'umd', ('train', 'val', 'test'),
     'RefCOCOg, UMD partition (Nagaraja et al. 2016).'),
    ('refcocog_google', 'refcocog', 'google', ('train', 'val'),
     'RefCOCOg, Google partition (Mao et al. 2016).'),
]
CONFIGS = {
    name: RefCocoConfig(name=name, folder=folder, split_by=split_by,
                        splits=splits, description=description)
    for name, folder, split_by, splits, description in _PARTITIONS}

# {split: {image id: {annotation id: [ref, ...]}}}
Index = dict[str, dict[int, dict[int, list[dict]]]]


def index_refs(refs: list[dict], images: dict, annotations: dict,
               config: RefCocoConfig, refs_path: epath.Path,
               instances_path: epath.Path,
               on_bad: Callable[[refer_files.BadInputError], None]) -> Index:
  """Groups the refs by split, image and annotation, checking each.

  Args:
    refs: the refs file's refs (`refer_files.load_refs`).
    images: {image id: COCO image} of instances.json.
    annotations: {annotation id: COCO annotation} of instances.json.
    config: gives the split names the refs may carry.
    refs_path: the refs file, for messages.
    instances_path: instances.json, for messages.
    on_bad: called with the error of a ref whose annotation or image is
      missing, or of a sentence without a word (it raises it, or counts it
      and the ref or sentence is left out).

  Raises:
    ValueError: a ref carries a split name the config does not know.
  """
  index: Index = {}
  for ref in sorted(refs, key=lambda r: r['ref_id']):
    where = f'{refs_path}, ref id {ref["ref_id"]}'
    if ref['split'] not in config.splits:
      raise ValueError(f'{where}: split {ref["split"]!r} is not one of '
                       f'{config.name}\'s {list(config.splits)}.')
    ann = annotations.get(ref['ann_id'])
    if ann is None or ann['image_id'] != ref['image_id']:
      on_bad(refer_files.BadInputError(
          'refs without their annotation',
          f'{where}: annotation id {ref["ann_id"]} of image id '
          f'{ref["image_id"]} is not in {instances_path}.'))
    elif ann['image_id'] not in images:
      on_bad(refer_files.BadInputError(
          'refs without their annotation',
          f'{where}: image id {ann["image_id"]} is not in {instances_path}.'))
    else:
      sentences = worded_sentences(ref, where, on_bad)
      if sentences:  # A ref left without an expression refers to nothing.
        objects = index.setdefault(ref['split'], {}).setdefault(
            ref['image_id'], {})
        objects.setdefault(ref['ann_id'], []).append(
            dict(ref, sentences=sentences))
  return index


def worded_sentences(ref: dict, where: str,
                     on_bad: Callable[[refer_files.BadInputError], None]
                     ) -> list[dict]:
  """The ref's sentences with a letter or digit; `on_bad` gets the others.

  The tokenizer is chosen at training time, not here; but any WordPiece
  tokenizer makes a token of a letter or digit ([UNK] at worst), and a
  sentence without one (empty, spaces, punctuation, which the refer
  toolkit's `sent` has stripped) gives an expression that says nothing.
  """
  kept = []
  for sentence in ref['sentences']:
    if any(char.isalnum() for char in sentence['sent']):
      kept.append(sentence)
    else:
      on_bad(refer_files.BadInputError(
          'sentences without a word',
          f'{where}, sentence id {sentence["sent_id"]}: the expression '
          f'{sentence["sent"]!r} has no letter or digit; it tokenises to '
          'nothing.'))
  return kept


def read_image(path: epath.Path, image: dict) -> bytes:
  """The file's bytes, once they decode at the size instances.json gives.

  Raises:
    refer_files.BadInputError: missing, unreadable, in a format TensorFlow
      does not decode, or of another size.
  """
  try:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as pil:
      pil.load()  # Decodes all of it: a truncated file fails here.
      size, image_format = pil.size, pil.format
  except OSError as error:  # Missing, truncated, or not an image at all.
    raise refer_files.BadInputError(
        'unreadable images',
        f'{path} (image id {image["id"]}) cannot be read: {error}') from error
  if image_format not in _DECODABLE_FORMATS:
    raise refer_files.BadInputError(
        'unreadable images',
        f'{path} (image id {image["id"]}) is a {image_format} image; the '
        f'input pipeline decodes only {", ".join(_DECODABLE_FORMATS)}.')
  if size != (image['width'], image['height']):
    raise refer_files.BadInputError(
        'unreadable images',
        f'{path} (image id {image["id"]}) is {size[0]} x {size[1]} pixels; '
        f'instances.json says {image["width"]} x {image["height"]}.')
  return data


def file_clicks(points: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 [3, 2] normalised (y, x) clicks of [3, 2] (x, y) pixel points."""
  return (points[:, ::-1] / [height, width]).astype(np.float32)


def make_object(ann: dict, refs: list[dict], image: dict, category: str,
                clicks: dict[int, np.ndarray] | None,
                instances_path: epath.Path, clicks_path: str | None) -> dict:
  """The schema's object for annotation `ann`, referred to by `refs`.

  Args:
    ann: the COCO annotation.
    refs: its refs in this split.
    image: its COCO image (height, width).
    category: its category name.
    clicks: {ann id: (x, y) pixel points} of a clicks file, or None to
      simulate them.
    instances_path: instances.json, for messages.
    clicks_path: the clicks file, for messages.

  Raises:
    refer_files.BadInputError: a box without area or outside the image,
      an empty or malformed mask, missing clicks or clicks outside the
      image.
  """
  height, width = image['height'], image['width']
  where = f'{instances_path}, annotation id {ann["id"]}'
  try:
    # The stored box is the mask's; a broken COCO box still shows a broken
    # annotation.
    refer_files.check_box(ann.get('bbox'), height, width)
  except ValueError as error:
    raise refer_files.BadInputError(
        'objects with a bad box', f'{where}: {error}') from error
  try:
    mask = refer_files.decode_mask(ann['segmentation'], height, width)
  except (ValueError, KeyError, TypeError) as error:
    raise refer_files.BadInputError(
        'objects with a bad mask', f'{where}: {error!r}') from error
  if not mask.any():
    raise refer_files.BadInputError(
        'objects with a bad mask',
        f'{where}: the segmentation decodes to an empty mask.')
  box = features_lib.box_from_mask(mask)
  if clicks is None:
    object_clicks = features_lib.clicks_from_mask_and_box(mask, box)
  elif ann['id'] not in clicks:
    raise refer_files.BadInputError(
        'objects with bad clicks',
        f'{clicks_path}: no clicks for annotation id {ann["id"]}.')
  else:
    object_clicks = file_clicks(clicks[ann['id']], height, width)
    if not ((object_clicks >= 0) & (object_clicks <= 1)).all():
      raise refer_files.BadInputError(
          'objects with bad clicks',
          f'{clicks_path}, annotation id {ann["id"]}: clicks outside the '
          f'{width} x {height} image: {clicks[ann["id"]].tolist()}.')
  return {
      'id': ann['id'],
      'box': tfds.features.BBox(*box),
      'mask': features_lib.png_bytes(mask),
      'category': category,
      'clicks': object_clicks,
      'refs': [{'id': ref['ref_id'], 'sentence_id': sentence['sent_id'],
                'sentence': sentence['sent']}
               for ref in refs for sentence in ref['sentences']],
  }


class Refcoco(tfds.core.GeneratorBasedBuilder):
  """RefCOCO, RefCOCO+ and RefCOCOg with masks, clicks and expressions.

  Args (besides TFDS's):
    clicks_file: a clicks JSON file to take the clicks from (None: simulate
      them). A dataset already built with other clicks is an error.
    skip_bad: leave out flawed refs, images and objects with a counted
      warning instead of stopping the build.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = list(CONFIGS.values())
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, clicks_file: str | None = None,
               skip_bad: bool = False, **kwargs):
    super().__init__(**kwargs)
    self._clicks_file = clicks_file
    self._skip_bad = skip_bad
    self._skipped = collections.Counter()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=features_lib.features('jpeg'),
        description=__doc__,
        homepage='https://github.com/lichengunc/refer',
        citation=_CITATION,
        metadata=tfds.core.MetadataDict())

  def _clicks_source(self) -> str:
    """'simulated', or the clicks file's content hash."""
    if self._clicks_file is None:
      return 'simulated'
    digest = hashlib.sha256(epath.Path(self._clicks_file).read_bytes())
    return f'file sha256:{digest.hexdigest()}'

  def download_and_prepare(self, **kwargs):
    """TFDS's, refusing to reuse a dataset built from other clicks."""
    if self._clicks_file and self.is_prepared():
      built = self.info.metadata.get('clicks')
      if built != self._clicks_source():
        raise ValueError(
            f'{self.data_path} was built with clicks {built}, not from '
            f'{self._clicks_file}: build into another data dir.')
    super().download_and_prepare(**kwargs)

  def _download_and_prepare(self, dl_manager, download_config):
    with features_lib.deterministic_serialization():
      result = super()._download_and_prepare(dl_manager, download_config)
    self.info.metadata.update(clicks=self._clicks_source(),
                              clicks_file=self._clicks_file,
                              skipped=dict(self._skipped))
    if self._skipped:
      logging.warning('%s: skipped (skip_bad) %s.', self.info.full_name,
                      dict(self._skipped))
    return result

  def _on_bad(self, error: refer_files.BadInputError) -> None:
    """Counts and logs `error` under skip_bad; raises it otherwise."""
    if not self._skip_bad:
      raise refer_files.BadInputError(
          error.kind, f'{error} (skip_bad would leave it out with a counted '
          'warning)') from error
    self._skipped[error.kind] += 1
    logging.warning('Skipping (skip_bad): %s', error)

  def _split_generators(self, dl_manager):
    config = self.builder_config
    root = dl_manager.manual_dir
    refs_path = config.refs_path(root)
    instances_path = config.instances_path(root)
    refs = refer_files.load_refs(refs_path)
    images, annotations, categories = refer_files.load_instances(
        instances_path)
    clicks = (None if self._clicks_file is None else
              refer_files.load_clicks(self._clicks_file))
    index = index_refs(refs, images, annotations, config, refs_path,
                       instances_path, self._on_bad)
    context = dict(root=root, images=images, annotations=annotations,
                   categories=categories, clicks=clicks,
                   instances_path=instances_path)
    return {split: self._generate_examples(index[split], **context)
            for split in config.splits if split in index}

  def _generate_examples(self, objects_of: dict[int, dict[int, list[dict]]],
                         root: epath.Path, images: dict, annotations: dict,
                         categories: dict, clicks: dict | None,
                         instances_path: epath.Path
                         ) -> Iterator[tuple[int, dict]]:
    """(image id, example) of each image of the split, in id order."""
    for image_id in sorted(objects_of):
      image = images[image_id]
      try:
        image_bytes = read_image(root / IMAGE_DIR / image['file_name'], image)
      except refer_files.BadInputError as error:
        self._on_bad(error)
        continue
      objects = []
      for ann_id, refs in sorted(objects_of[image_id].items()):
        ann = annotations[ann_id]
        if ann['category_id'] not in categories:
          raise ValueError(f'{instances_path}, annotation id {ann_id}: '
                           f'unknown category id {ann["category_id"]}.')
        try:
          objects.append(make_object(
              ann, refs, image, categories[ann['category_id']], clicks,
              instances_path, self._clicks_file))
        except refer_files.BadInputError as error:
          self._on_bad(error)
      if objects:
        yield image_id, {'image': image_bytes, 'image/id': image_id,
                         'objects': objects}
