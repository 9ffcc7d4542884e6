"""Readers of the `refer` toolkit's files, safe and strict on bad input.

    refs(<splitBy>).p   a pickled list of refs (Python 2, protocol 2), read
                        by an unpickler that builds only plain containers
                        and scalars (`load_refs`);
    instances.json      COCO images, annotations and categories
                        (`load_instances`); segmentations decode to masks
                        through pycocotools (`decode_mask`), boxes must
                        have an area and lie in the image (`check_box`);
    clicks JSON         optional annotator clicks per annotation id
                        (`load_clicks`, format in docs/refcoco.md).

Every error names the file and the id it is about. Flaws a user may choose
to skip (`BadInputError`) carry a `kind`, so that a builder can count them.
"""

from __future__ import annotations

import json
import math
import pickle
from typing import Any

from etils import epath
import numpy as np
from pycocotools import mask as mask_utils

CLICK_KEYS = ('center', 'top_left', 'bottom_right')
# How far (pixels) a COCO box may overhang its image (`check_box`).
BOX_TOLERANCE = 1.0
# Fields the builder reads from each ref and each of its sentences.
_REF_FIELDS = {'ref_id': int, 'ann_id': int, 'image_id': int, 'split': str,
               'sentences': list}
_SENTENCE_FIELDS = {'sent_id': int, 'sent': str}


class UnsafePickleError(pickle.UnpicklingError):
  """A refs pickle asked for something other than plain data."""


class BadInputError(ValueError):
  """A flaw in one item of the downloaded files (see `kind`)."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class _PlainDataUnpickler(pickle.Unpickler):
  """Builds lists, dicts, tuples, sets, strings, numbers; refuses the rest.

  Unpickling a class or function runs code of the file's choosing; refs
  files never need one, so every global is refused. Python 2 `str` is read
  as UTF-8 text (ASCII in the released files).
  """

  def __init__(self, file, path: str):
    super().__init__(file, encoding='utf-8')
    self._path = path

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(
        f'{self._path}: refusing to unpickle the global {module}.{name}; a '
        'refs file holds only lists, dicts, strings and numbers. Is it the '
        'refer toolkit\'s file?')

  def persistent_load(self, pid):
    raise UnsafePickleError(
        f'{self._path}: refusing the persistent id {pid!r}; a refs file '
        'holds only lists, dicts, strings and numbers.')


def _require_file(path: epath.Path) -> None:
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist (see the manual-download '
                            'instructions, docs/refcoco.md).')


def _check_fields(item: Any, fields: dict[str, type], where: str) -> None:
  """Raises naming `where` unless `item` is a dict with the typed fields."""
  if not isinstance(item, dict):
    raise ValueError(f'{where}: expected a dict, found {type(item).__name__}.')
  for key, kind in fields.items():
    # bool is an int subclass, and never a valid id.
    if not isinstance(item.get(key), kind) or isinstance(item[key], bool):
      raise ValueError(f'{where}: field {key!r} should be of type '
                       f'{kind.__name__}, found {item.get(key)!r}.')


def load_refs(path: epath.PathLike) -> list[dict]:
  """The refs of a `refs(<splitBy>).p` file, checked field by field.

  Raises:
    FileNotFoundError: the file is missing.
    UnsafePickleError: the pickle holds anything but plain data.
    ValueError: naming the ref id whose fields are missing or mistyped.
  """
  path = epath.Path(path)
  _require_file(path)
  with path.open('rb') as file:
    try:
      refs = _PlainDataUnpickler(file, str(path)).load()
    except UnsafePickleError:
      raise
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError,
            IndexError, TypeError) as error:  # Malformed bytes.
      raise ValueError(f'{path}: not a readable refs pickle ({error}).'
                       ) from error
  if not isinstance(refs, list):
    raise ValueError(f'{path}: expected a list of refs, found '
                     f'{type(refs).__name__}.')
  for index, ref in enumerate(refs):
    where = f'{path}, ref #{index}'
    if isinstance(ref, dict) and 'ref_id' in ref:
      where = f'{path}, ref id {ref["ref_id"]}'
    _check_fields(ref, _REF_FIELDS, where)
    for sentence in ref['sentences']:
      _check_fields(sentence, _SENTENCE_FIELDS, f'{where}, a sentence')
  return refs


def load_instances(path: epath.PathLike) -> tuple[dict, dict, dict]:
  """({image id: image}, {ann id: annotation}, {category id: name}).

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: not COCO-format JSON, naming the section it lacks.
  """
  path = epath.Path(path)
  _require_file(path)
  try:
    coco = json.loads(path.read_text())
    return ({image['id']: image for image in coco['images']},
            {ann['id']: ann for ann in coco['annotations']},
            {cat['id']: cat['name'] for cat in coco['categories']})
  except (json.JSONDecodeError, KeyError, TypeError) as error:
    raise ValueError(f'{path}: not a COCO instances file ({error!r}).'
                     ) from error


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
  """uint8 [height, width] 0/1 mask of a COCO polygon list or RLE.

  Polygons with fewer than three points (zero area, and which pycocotools
  would read as a box) are dropped; the rest are merged. An RLE holds
  either compressed (string) or uncompressed (list) counts.

  Raises:
    ValueError: malformed segmentation, or an RLE of another size.
  """
  if isinstance(segmentation, list):
    polygons = [p for p in segmentation if len(p) >= 6]
    if any(len(p) % 2 for p in polygons):
      raise ValueError('a polygon has an odd number of coordinates.')
    if not polygons:
      return np.zeros((height, width), np.uint8)
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  elif isinstance(segmentation, dict) and 'counts' in segmentation:
    if list(segmentation.get('size', ())) != [height, width]:
      raise ValueError(f'RLE size {segmentation.get("size")} is not the '
                       f'image size {[height, width]}.')
    counts = segmentation['counts']
    if isinstance(counts, list):
      rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
      rle = dict(segmentation, counts=counts.encode()
                 if isinstance(counts, str) else counts)
  else:
    raise ValueError('a segmentation is a polygon list or an RLE dict, not '
                     f'{type(segmentation).__name__}.')
  return mask_utils.decode(rle)


def _is_numbers(value: Any, count: int) -> bool:
  """Whether `value` is a JSON list of `count` finite numbers."""
  return (isinstance(value, list) and len(value) == count and
          all(isinstance(v, (int, float)) and not isinstance(v, bool) and
              math.isfinite(v) for v in value))


def check_box(bbox: Any, height: int, width: int) -> None:
  """Raises ValueError unless the COCO `bbox` [x, y, w, h] has an area and
  lies in the height x width image.

  COCO boxes are the extent of float polygons, and may overhang the image
  by a fraction of a pixel; up to `BOX_TOLERANCE` pixels pass.
  """
  if not _is_numbers(bbox, 4):
    raise ValueError(f'bbox {bbox!r} is not [x, y, w, h], four finite '
                     'numbers.')
  x, y, w, h = bbox
  if w <= 0 or h <= 0:
    raise ValueError(f'bbox {bbox} has no area.')
  if (min(x, y) < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or
      y + h > height + BOX_TOLERANCE):
    raise ValueError(f'bbox {bbox} lies outside the {width} x {height} image '
                     f'(by more than {BOX_TOLERANCE} pixel).')


def _point(value: Any) -> tuple[float, float]:
  """(x, y) of a JSON [x, y] pair of finite numbers, else ValueError."""
  if not _is_numbers(value, 2):
    raise ValueError(f'{value!r} is not an [x, y] pair of finite numbers.')
  return float(value[0]), float(value[1])


def load_clicks(path: epath.PathLike) -> dict[int, np.ndarray]:
  """{ann id: float64 [3, 2] (x, y) pixel points} of a clicks JSON file.

  The file maps annotation ids (JSON object keys) to
  {"center": [x, y], "top_left": [x, y], "bottom_right": [x, y]} in the
  original image's pixels, COCO's continuous coordinates (the image spans
  [0, width] x [0, height]); see docs/refcoco.md.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: naming the annotation id whose entry is malformed.
  """
  path = epath.Path(path)
  _require_file(path)
  try:
    entries = json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f'{path}: not JSON ({error}).') from error
  if not isinstance(entries, dict):
    raise ValueError(f'{path}: expected an object keyed by annotation id.')
  clicks = {}
  for key, entry in entries.items():
    try:
      if not isinstance(entry, dict) or sorted(entry) != sorted(CLICK_KEYS):
        raise ValueError(f'expected exactly the keys {list(CLICK_KEYS)}.')
      points = np.array([_point(entry[k]) for k in CLICK_KEYS])
      if (points[1] > points[2]).any():
        raise ValueError('top_left lies right of or below bottom_right.')
      clicks[int(key)] = points
    except ValueError as error:
      raise ValueError(f'{path}, annotation id {key}: {error}') from error
  return clicks
