"""The RefCOCO-family builder on refer-format files the tests write.

The fixture is a tiny `refer` data folder: five small JPEGs, one
instances.json with polygon (one- and two-part), compressed-RLE and
uncompressed-RLE segmentations, and the five configs' refs files, pickled
as Python 2 did (byte strings). Each kind of bad input is a copy of it with
one flaw. The real sample in ../shared/refcoco_sample is read when present.
"""

import contextlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import ml_collections
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest
import tensorflow_datasets as tfds

from refseg_jax import config_lib
from refseg_jax import train
from refseg_jax.data import build
from refseg_jax.data.refcoco import check as check_refcoco
from refseg_jax.data import features
from refseg_jax.data import pipeline
from refseg_jax.data.refcoco import builder as refcoco
from refseg_jax.data.refcoco import refer_files

REPO = pathlib.Path(__file__).parents[1]
SAMPLE = REPO.parent / 'shared' / 'refcoco_sample' / 'refer'
CATEGORIES = {1: 'person', 2: 'cup'}
# {image id: (height, width)}
IMAGES = {1: (32, 40), 2: (32, 40), 3: (40, 32), 4: (32, 40), 5: (28, 36)}


def _rect(x0, y0, x1, y1):
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rect_mask(image_id, x0, y0, x1, y1):
  mask = np.zeros(IMAGES[image_id], np.uint8)
  mask[y0:y1, x0:x1] = 1
  return mask


def _disc_mask(image_id, cy, cx, radius):
  ys, xs = np.indices(IMAGES[image_id])
  return ((ys - cy)**2 + (xs - cx)**2 <= radius**2).astype(np.uint8)


def _compressed_rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask))
  return {'size': list(mask.shape), 'counts': rle['counts'].decode()}


def _uncompressed_rle(mask):
  flat = mask.ravel(order='F')  # COCO runs go down the columns.
  changes = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], changes, [flat.size]])
  counts = np.diff(bounds).tolist()
  if flat[0]:
    counts = [0] + counts  # Runs start with zeros.
  return {'size': list(mask.shape), 'counts': counts}


# {ann id: (image id, category id, segmentation, area)}; polygons are
# rectangles on whole pixels, so their raster area is the COCO area exactly.
ANNOTATIONS = {
    101: (1, 1, [_rect(4, 4, 20, 14)], 160),
    102: (1, 2, [_rect(24, 2, 36, 8), _rect(24, 20, 36, 30)], 192),
    201: (2, 2, _compressed_rle(_disc_mask(2, 16, 12, 6)),
          int(_disc_mask(2, 16, 12, 6).sum())),
    202: (2, 1, _uncompressed_rle(_rect_mask(2, 25, 3, 38, 29)), 13 * 26),
    301: (3, 1, [_rect(2, 10, 30, 38)], 28 * 28),
    401: (4, 2, [_rect(10, 10, 30, 20)], 200),
    402: (4, 1, [_rect(0, 0, 5, 5)], 25),  # Nobody refers to it.
    501: (5, 1, _compressed_rle(_rect_mask(5, 0, 0, 36, 10)), 360),
}
# Per dataset folder: ref and sentence id bases, and per splitBy
# {split: [referred ann ids]}. Google splits share images (1, in refcoco).
REFS = {
    'refcoco': (1000, {
        'unc': {'train': [101, 102], 'val': [201, 202], 'testA': [301],
                'testB': [401, 501]},
        'google': {'train': [101, 201], 'val': [102], 'test': [202, 301, 401,
                                                               501]}}),
    'refcoco+': (2000, {
        'unc': {'train': [101, 102], 'val': [201, 202], 'testA': [301],
                'testB': [401, 501]}}),
    'refcocog': (3000, {
        'umd': {'train': [101, 102], 'val': [201, 202], 'test': [301, 401,
                                                                  501]},
        'google': {'train': [101, 102, 201, 202], 'val': [301, 401, 501]}}),
}
CONFIG_OF = {('refcoco', 'unc'): 'refcoco_unc',
             ('refcoco', 'google'): 'refcoco_google',
             ('refcoco+', 'unc'): 'refcocoplus_unc',
             ('refcocog', 'umd'): 'refcocog_umd',
             ('refcocog', 'google'): 'refcocog_google'}
WORDS = ('the', 'left', 'right', 'person', 'cup', 'big', 'small', 'café')


class _Python2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes `str` as Python 2's byte strings (as the refer files hold)."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def save_str(self, text):
    data = text.encode()
    self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data
               if len(data) < 256 else
               pickle.BINSTRING + struct.pack('<i', len(data)) + data)
    self.memoize(text)

  dispatch[str] = save_str


def _write_pickle(path, value):
  buffer = io.BytesIO()
  _Python2Pickler(buffer, protocol=2).dump(value)
  path.write_bytes(buffer.getvalue())


def make_refs(folder, split_by):
  """The refs of one refs file: ann id + base = ref id, 1-3 sentences."""
  base, partitions = REFS[folder]
  refs = []
  for split, ann_ids in partitions[split_by].items():
    for ann_id in ann_ids:
      image_id, category_id = ANNOTATIONS[ann_id][:2]
      ref_id = base + ann_id
      sentences = [{'sent_id': ref_id * 10 + k, 'tokens': [],
                    'raw': f'{WORDS[k]} {CATEGORIES[category_id]} {ref_id}',
                    'sent': f'{WORDS[k]} {WORDS[-1 - k]} {ref_id}'}
                   for k in range(1 + ann_id % 3)]
      refs.append({'ref_id': ref_id, 'ann_id': ann_id, 'image_id': image_id,
                   'category_id': category_id, 'split': split,
                   'sent_ids': [s['sent_id'] for s in sentences],
                   'file_name': f'COCO_train2014_{image_id:012d}_{ref_id}.jpg',
                   'sentences': sentences})
  return refs


def image_name(image_id):
  return f'COCO_train2014_{image_id:012d}.jpg'


def write_refer(root: pathlib.Path) -> pathlib.Path:
  """A refer data folder with every config's files; returns `root`."""
  rng = np.random.default_rng(0)
  image_dir = root / refcoco.IMAGE_DIR
  image_dir.mkdir(parents=True)
  for image_id, shape in IMAGES.items():
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image_dir / image_name(image_id), 'JPEG')
  instances = {
      'images': [{'id': i, 'height': h, 'width': w, 'file_name': image_name(i)}
                 for i, (h, w) in IMAGES.items()],
      'annotations': [{'id': ann_id, 'image_id': image_id,
                       'category_id': category_id, 'segmentation': seg,
                       'area': area, 'iscrowd': int(isinstance(seg, dict)),
                       'bbox': [0, 0, 1, 1]}
                      for ann_id, (image_id, category_id, seg, area)
                      in ANNOTATIONS.items()],
      'categories': [{'id': i, 'name': n} for i, n in CATEGORIES.items()],
  }
  for (folder, split_by) in CONFIG_OF:
    (root / folder).mkdir(exist_ok=True)
    (root / folder / 'instances.json').write_text(json.dumps(instances))
    _write_pickle(root / folder / f'refs({split_by}).p',
                  make_refs(folder, split_by))
  return root


@pytest.fixture(scope='module')
def refer_dir(tmp_path_factory):
  return write_refer(tmp_path_factory.mktemp('refer'))


@pytest.fixture(scope='module')
def data_dir(refer_dir, tmp_path_factory):
  """A TFDS data dir with every config built from `refer_dir`."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  for name in refcoco.CONFIGS:
    build.build(f'refcoco/{name}', data_dir, manual_dir=str(refer_dir))
  return data_dir


def _records(name, data_dir):
  builder = tfds.builder(f'refcoco/{name}', data_dir=data_dir)
  return {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
          for split in builder.info.splits}


@pytest.mark.parametrize('folder_split_by', list(CONFIG_OF))
def test_every_config_has_its_refs_sentences_masks_and_clicks(
    data_dir, folder_split_by):
  folder, split_by = folder_split_by
  records = _records(CONFIG_OF[folder_split_by], data_dir)
  partition = REFS[folder][1][split_by]
  assert set(records) == set(partition)
  expected_sentences = {
      (ref['split'], ref['ref_id'], s['sent_id']): s['sent']
      for ref in make_refs(folder, split_by) for s in ref['sentences']}
  sentences = {}
  for split, examples in records.items():
    # One example per image, holding exactly the objects referred to in
    # this split (402, never referred to, is in none).
    assert sorted(int(e['image/id']) for e in examples) == sorted(
        {ANNOTATIONS[a][0] for a in partition[split]})
    assert sorted(i for e in examples for i in e['objects']['id']) == sorted(
        partition[split])
    for example in examples:
      height, width = IMAGES[int(example['image/id'])]
      assert example['image'].shape == (height, width, 3)
      objects = example['objects']
      for k, ann_id in enumerate(objects['id']):
        image_id, category_id, _, area = ANNOTATIONS[ann_id]
        assert image_id == example['image/id']
        assert objects['category'][k].decode() == CATEGORIES[category_id]
        mask = objects['mask'][k][..., 0]
        assert mask.shape == (height, width) and mask.sum() == area
        box, clicks = objects['box'][k], objects['clicks'][k]
        np.testing.assert_allclose(box, features.box_from_mask(mask))
        np.testing.assert_allclose(clicks[1:].ravel(), box)
        row, col = (clicks[0] * [height, width]).astype(int)
        assert mask[row, col], 'the centre click is off the object'
      refs = objects['refs']
      for ref_ids, sent_ids, texts in zip(refs['id'].to_list(),
                                          refs['sentence_id'].to_list(),
                                          refs['sentence'].to_list()):
        for ref_id, sent_id, text in zip(ref_ids, sent_ids, texts):
          sentences[(split, ref_id, sent_id)] = text.decode()
  assert sentences == expected_sentences  # 'café': Python 2 strings as UTF-8.


def test_box_of_a_rectangle_polygon_is_its_coco_box(data_dir):
  example, = _records('refcoco_unc', data_dir)['testA']
  height, width = IMAGES[3]
  np.testing.assert_allclose(example['objects']['box'][0],
                             [10 / height, 2 / width, 38 / height, 30 / width])


def test_clicks_file_gives_the_clicks(refer_dir, tmp_path):
  # Points (x, y) in pixels; stored normalised (y, x).
  clicks = {str(a): {'center': [a % 7 + 0.5, 3.0], 'top_left': [1.0, 2.0],
                     'bottom_right': [20.0, 25.5]} for a in ANNOTATIONS}
  path = tmp_path / 'clicks.json'
  path.write_text(json.dumps(clicks))
  data_dir = str(tmp_path / 'tfds')
  build.build('refcoco/refcoco_unc', data_dir, str(refer_dir),
              clicks_file=str(path))
  for examples in _records('refcoco_unc', data_dir).values():
    for example in examples:
      height, width = IMAGES[int(example['image/id'])]
      for ann_id, got in zip(example['objects']['id'],
                             example['objects']['clicks']):
        np.testing.assert_allclose(got, [
            [3.0 / height, (ann_id % 7 + 0.5) / width],
            [2.0 / height, 1.0 / width], [25.5 / height, 20.0 / width]],
                                   rtol=1e-6)
  # Reusing the dataset is fine; asking for other clicks there is an error.
  build.build('refcoco/refcoco_unc', data_dir)
  path.write_text(json.dumps({**clicks, '101': clicks['102']}))
  with pytest.raises(ValueError, match='was built with clicks file sha256'):
    build.build('refcoco/refcoco_unc', data_dir, str(refer_dir),
                clicks_file=str(path))


def test_clicks_file_errors_name_the_file_and_id(tmp_path):
  path = tmp_path / 'clicks.json'
  path.write_text(json.dumps({'7': {'center': [1, 2], 'top_left': [1, 2]}}))
  with pytest.raises(ValueError,
                     match=re.escape(f'{path}, annotation id 7: expected')):
    refer_files.load_clicks(path)
  path.write_text(json.dumps({'7': {'center': [1, 2], 'top_left': [5, 2],
                                    'bottom_right': [3, 9]}}))
  with pytest.raises(ValueError, match='annotation id 7: top_left lies'):
    refer_files.load_clicks(path)


class _Exploit:
  """Unpickles to a shell command, as a malicious refs file would."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_pickle_with_a_class_is_refused_unrun(tmp_path):
  path, marker = tmp_path / 'refs(unc).p', tmp_path / 'pwned'
  path.write_bytes(pickle.dumps([_Exploit(marker)], protocol=2))
  with pytest.raises(refer_files.UnsafePickleError, match=re.escape(
      f'{path}: refusing to unpickle the global posix.system')):
    refer_files.load_refs(path)
  assert not marker.exists()


def test_decode_mask_reads_polygons_and_both_rles():
  height, width = IMAGES[2]
  for ann_id in (201, 202):  # Compressed and uncompressed RLE.
    _, _, segmentation, area = ANNOTATIONS[ann_id]
    assert refer_files.decode_mask(segmentation, height, width).sum() == area
  # A two-point "polygon" has no area (pycocotools would read it as a box).
  assert not refer_files.decode_mask([[1, 1, 9, 9]], height, width).any()
  with pytest.raises(ValueError, match='RLE size'):
    refer_files.decode_mask(ANNOTATIONS[201][2], width, height)


def test_check_box_passes_a_sub_pixel_overhang_only():
  refer_files.check_box([-0.4, 0, 40.9, 32.6], 32, 40)  # As COCO has.
  with pytest.raises(ValueError, match='outside the 40 x 32 image'):
    refer_files.check_box([-1.5, 0, 10, 10], 32, 40)
  with pytest.raises(ValueError, match='is not .x, y, w, h.'):
    refer_files.check_box([1, 2, 3], 32, 40)


# Flaws, each a function of the refer folder that returns the start of the
# error message.
def _unknown_class(root):
  path = root / 'refcoco' / 'refs(unc).p'
  path.write_bytes(pickle.dumps([_Exploit(root / 'pwned')], protocol=2))
  return f'{path}: refusing to unpickle the global posix.system'


def _missing_refs(root):
  path = root / 'refcoco' / 'refs(unc).p'
  path.unlink()
  return f'{path} does not exist'


def _missing_instances(root):
  path = root / 'refcoco' / 'instances.json'
  path.unlink()
  return f'{path} does not exist'


def _unknown_split(root):
  path = root / 'refcoco' / 'refs(unc).p'
  refs = make_refs('refcoco', 'unc')
  refs[0]['split'] = 'testC'
  _write_pickle(path, refs)
  return f"{path}, ref id 1101: split 'testC' is not one of refcoco_unc's"


def _ref_without_sentence_ids(root):
  path = root / 'refcoco' / 'refs(unc).p'
  refs = make_refs('refcoco', 'unc')
  del refs[1]['sentences'][0]['sent_id']
  _write_pickle(path, refs)
  return (f"{path}, ref id 1102, a sentence: field 'sent_id' should be of "
          'type int')


def _ref_without_annotation(root):
  path = root / 'refcoco' / 'refs(unc).p'
  refs = make_refs('refcoco', 'unc')
  refs[-1]['ann_id'] = 999  # Ref 1501, testB.
  _write_pickle(path, refs)
  return f'{path}, ref id 1501: annotation id 999 of image id 5 is not in'


def _missing_image(root):
  path = root / refcoco.IMAGE_DIR / image_name(4)
  path.unlink()
  return f'{path} (image id 4) cannot be read'


def _unreadable_image(root):
  path = root / refcoco.IMAGE_DIR / image_name(4)
  path.write_bytes(path.read_bytes()[:200])  # Truncated.
  return f'{path} (image id 4) cannot be read'


def _wordless_sentence(root):
  path = root / 'refcoco' / 'refs(unc).p'
  refs = make_refs('refcoco', 'unc')
  refs[-1]['sentences'][0]['sent'] = ' ?! '  # Ref 1501's only sentence.
  _write_pickle(path, refs)
  return (f"{path}, ref id 1501, sentence id 15010: the expression ' ?! ' "
          'has no letter or digit')


def _not_an_image(root):
  path = root / refcoco.IMAGE_DIR / image_name(4)
  path.write_text('<html>404 Not Found</html>')
  return f'{path} (image id 4) cannot be read: cannot identify image file'


def _tiff_image(root):
  path = root / refcoco.IMAGE_DIR / image_name(4)
  Image.open(path).save(path, 'TIFF')  # PIL reads it; TensorFlow does not.
  return f'{path} (image id 4) is a TIFF image; the input pipeline decodes'


def _set_annotation(root, ann_id, **fields):
  """Changes annotation `ann_id` of refcoco's instances.json; its path."""
  path = root / 'refcoco' / 'instances.json'
  instances = json.loads(path.read_text())
  ann, = [a for a in instances['annotations'] if a['id'] == ann_id]
  ann.update(fields)
  path.write_text(json.dumps(instances))
  return path


def _empty_polygon(root):
  path = _set_annotation(root, 401, segmentation=[_rect(50, 50, 60, 60)])
  return f'{path}, annotation id 401: the segmentation decodes to an empty'


def _zero_area_box(root):
  path = _set_annotation(root, 401, bbox=[10, 10, 0, 10])
  return f'{path}, annotation id 401: bbox [10, 10, 0, 10] has no area'


def _box_outside_image(root):
  path = _set_annotation(root, 401, bbox=[10, 10, 35, 10])  # 40 px wide.
  return (f'{path}, annotation id 401: bbox [10, 10, 35, 10] lies outside '
          'the 40 x 32 image')


# A flaw that writes this file into the refer folder builds with it.
CLICKS_FILE = 'clicks.json'


def _clicks_outside_image(root):
  path = root / CLICKS_FILE
  clicks = {str(a): {'center': [2, 2], 'top_left': [1, 1],
                     'bottom_right': [3, 3]} for a in ANNOTATIONS}
  clicks['401']['center'] = [45, 2]  # Image 4 is 40 px wide.
  path.write_text(json.dumps(clicks))
  return f'{path}, annotation id 401: clicks outside the 40 x 32 image'


# Skippable flaws: what skip_bad counts, and the testB objects that remain.
SKIPPABLE = {
    _ref_without_annotation: ('refs without their annotation', [401]),
    _wordless_sentence: ('sentences without a word', [401]),
    _missing_image: ('unreadable images', [501]),
    _unreadable_image: ('unreadable images', [501]),
    _not_an_image: ('unreadable images', [501]),
    _tiff_image: ('unreadable images', [501]),
    _empty_polygon: ('objects with a bad mask', [501]),
    _zero_area_box: ('objects with a bad box', [501]),
    _box_outside_image: ('objects with a bad box', [501]),
    _clicks_outside_image: ('objects with bad clicks', [501]),
}


@contextlib.contextmanager
def _flawed(flaw, tmp_path, refer_dir):
  """(flawed copy of refer_dir, expected message, build options)."""
  root = tmp_path / 'refer'
  shutil.copytree(refer_dir, root)
  message = flaw(root)
  clicks = root / CLICKS_FILE
  yield root, message, ({'clicks_file': str(clicks)} if clicks.exists()
                        else {})


@pytest.mark.parametrize('flaw', [_unknown_class, _missing_refs,
                                  _missing_instances, _unknown_split,
                                  _ref_without_sentence_ids, *SKIPPABLE])
def test_bad_input_stops_the_build_naming_file_and_id(flaw, refer_dir,
                                                      tmp_path):
  data_dir = tmp_path / 'tfds'
  with _flawed(flaw, tmp_path, refer_dir) as (root, message, options):
    with pytest.raises(Exception, match=re.escape(message)):
      build.build('refcoco/refcoco_unc', str(data_dir), str(root), **options)
  assert not (root / 'pwned').exists()
  # Nothing that looks like a dataset, not even half-written shards.
  assert not tfds.builder('refcoco/refcoco_unc',
                          data_dir=str(data_dir)).is_prepared()
  assert not [p for p in data_dir.rglob('*') if 'tfrecord' in p.name
              or p.name == 'dataset_info.json']


@pytest.mark.parametrize('flaw', list(SKIPPABLE))
def test_skip_bad_leaves_the_flaw_out_and_counts_it(flaw, refer_dir,
                                                    tmp_path):
  kind, remaining = SKIPPABLE[flaw]
  data_dir = str(tmp_path / 'tfds')
  with _flawed(flaw, tmp_path, refer_dir) as (root, _, options):
    builder = build.build('refcoco/refcoco_unc', data_dir, str(root),
                          skip_bad=True, **options)
  # Reloaded from disk: the metadata records what was skipped.
  builder = tfds.builder('refcoco/refcoco_unc', data_dir=data_dir)
  assert builder.info.metadata['skipped'] == {kind: 1}
  records = _records('refcoco_unc', data_dir)
  assert [i for e in records['testB'] for i in e['objects']['id']] == remaining
  assert len(records['train']) == 1  # The other splits are whole.


def test_unbuilt_manual_dataset_error_gives_the_build_command(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match='--dataset=refcoco/refcoco_unc --manual_dir=DIR'):
    build.build('refcoco/refcoco_unc', str(tmp_path))


# Builds refcoco_unc (argv: data dir, refer dir, marker) and hangs before
# reading image 5, testB's last: train, val and testA are written by then.
_HANGING_BUILD = """
import pathlib, sys, time
from refseg_jax.data import build
from refseg_jax.data.refcoco import builder

read_image = builder.read_image

def read_or_hang(path, image):
  if image['id'] == 5:
    pathlib.Path(sys.argv[3]).touch()
    time.sleep(600)
  return read_image(path, image)

builder.read_image = read_or_hang
build.build('refcoco/refcoco_unc', sys.argv[1], sys.argv[2])
"""


def _tfrecords(folder) -> dict[str, bytes]:
  """{name: bytes} of the TFRecord shards anywhere under `folder`."""
  return {p.name: p.read_bytes()
          for p in pathlib.Path(folder).rglob('*.tfrecord*')}


def test_build_killed_half_way_is_refused_then_rebuilt_whole(
    refer_dir, data_dir, tmp_path):
  name, killed_dir = 'refcoco/refcoco_unc', tmp_path / 'tfds'
  marker = tmp_path / 'hanging'
  process = subprocess.Popen([sys.executable, '-c', _HANGING_BUILD,
                              str(killed_dir), str(refer_dir), str(marker)])
  try:
    deadline = time.monotonic() + 300
    while not marker.exists():
      assert process.poll() is None, 'the build ended before the kill'
      assert time.monotonic() < deadline, 'the build never got half-way'
      time.sleep(0.1)
  finally:
    process.kill()  # SIGKILL: no cleanup runs.
    process.wait()
  assert process.returncode == -signal.SIGKILL
  # Half a dataset on disk: three splits of four written.
  assert sorted(n.split('.')[0] for n in _tfrecords(killed_dir)) == [
      'refcoco-testA', 'refcoco-train', 'refcoco-val']
  # Readers refuse it, saying how to build it.
  assert not tfds.builder(name, data_dir=str(killed_dir)).is_prepared()
  config = ml_collections.ConfigDict({'name': name,
                                      'data_dir': str(killed_dir)})
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'Dataset {name} is not built in {killed_dir}/refcoco/refcoco_unc/'
      f'{refcoco.Refcoco.VERSION}: run python -m refseg_jax.data.build')):
    pipeline.prepared_builder(config)
  with pytest.raises(FileNotFoundError, match='--manual_dir=DIR'):
    build.build(name, str(killed_dir))
  # The next build makes the whole dataset, record for record.
  builder = build.build(name, str(killed_dir), str(refer_dir))
  whole = tfds.builder(name, data_dir=data_dir)
  assert _tfrecords(builder.data_path) == _tfrecords(whole.data_path)
  assert len(_tfrecords(builder.data_path)) == 4  # One shard a split.


def test_check_flags_every_mismatch(data_dir, capsys):
  mismatches = check_refcoco.check('refcoco/refcocog_google', data_dir)
  table = capsys.readouterr().out
  # Two splits, each off on refs and images (expressions: unpublished).
  assert mismatches == 4 and table.count('MISMATCH') == 4
  assert '4 / 44,822  MISMATCH' in table and '3 / 4,650  MISMATCH' in table
  lines, mismatches = check_refcoco.compare(
      {'val': check_refcoco.Counts(5_000, 4_650, 7)},
      check_refcoco.PUBLISHED['refcocog_google'])
  assert mismatches == 3  # train is missing; val matches.
  assert 'MISMATCH' not in lines[2]


def test_click_config_trains_and_evaluates_end_to_end(data_dir, tmp_path):
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]',
                              *WORDS]))
  config = config_lib.load(f'{REPO}/configs/click.py:data=refcoco_unc')
  config.data.update(dict(data_dir=data_dir, tokenizer=str(vocab),
                          image_size=64, eval_mask_size=64, shuffle_buffer=8))
  config.batch_size = 16  # 8 images, 2 expressions each, on 8 devices.
  config.total_steps = 2
  config.optimizer.warmup_steps = 1
  config.log_every_steps = config.checkpoint_every_steps = 2
  config.eval.update(dict(every_steps=1000, batch_size=8, num_overlays=1))
  train.train_and_evaluate(config, str(tmp_path / 'work'))
  results = json.loads((tmp_path / 'work' / 'results.json').read_text())
  assert set(results) == {'val', 'testA', 'testB', 'step', 'provenance'}
  assert results['testB']['num_expressions'] == 3 + 1  # Refs 1401 and 1501.


@pytest.mark.skipif(not SAMPLE.is_dir(),
                    reason=f'the real RefCOCO sample {SAMPLE} is absent')
def test_real_sample(tmp_path):
  expected = {'refcoco_unc': ('testB', 2, 4, 14),
              'refcocoplus_unc': ('testB', 2, 4, 12),
              'refcocog_umd': ('val', 1, 2, 4)}
  for name, (split, num_images, num_refs, num_sentences) in expected.items():
    builder = build.build(f'refcoco/{name}', str(tmp_path), str(SAMPLE))
    folder = refcoco.CONFIGS[name].folder
    _, annotations, _ = refer_files.load_instances(
        SAMPLE / folder / 'instances.json')
    assert list(builder.info.splits) == [split]
    examples = _records(name, str(tmp_path))[split]
    refs = [r for e in examples
            for row in e['objects']['refs']['id'].to_list() for r in row]
    assert (len(examples), len(set(refs)), len(refs)) == (
        num_images, num_refs, num_sentences)
    for example in examples:
      for ann_id, mask in zip(example['objects']['id'],
                              example['objects']['mask']):
        assert mask.shape[:2] == example['image'].shape[:2]
        assert abs(mask.sum() / annotations[ann_id]['area'] - 1) < 0.01
