"""The one feature schema every refseg_jax dataset emits.

`ref_shapes` and the RefCOCO-family builders write the same TFDS features,
so one input pipeline (`refseg_jax.data.pipeline`) serves them all:

    image          uint8 [H, W, 3]   PNG (ref_shapes) or the original JPEG bytes.
    image/id       int64             unique within the dataset.
    objects        Sequence, one entry per annotated object:
      id           int64             unique within the dataset.
      box          BBox              normalised (ymin, xmin, ymax, xmax), edges
                                     of the tight box: pixel row r lies in it iff
                                     ymin * H <= r and r + 1 <= ymax * H.
      mask         uint8 [H, W, 1]   PNG, 0/1, the object's *visible* pixels at
                                     the image's original resolution.
      category     text              'circle', 'person', ...
      clicks       float32 [3, 2]    the points an annotator clicks (PKS): rows
                                     CLICK_NAMES = (center, top_left,
                                     bottom_right), each (y, x) normalised like
                                     the box. The centre click is the mask pixel
                                     (its centre) nearest the mask centroid, so it
                                     lies on the object even when the object is
                                     concave or occluded; the corner clicks are
                                     the box corners. Exact clicks: annotator
                                     noise is the pipeline's business.
      refs         Sequence, one entry per referring expression of this object
                   (empty for objects nobody referred to):
        id         int64             the ref id (RefCOCO: one ref = one object
                                     and its sentences).
        sentence_id int64            unique within the dataset.
        sentence   text              lower-case expression.

Points and boxes are normalised so that they survive resizing; a pixel
(row r, column c) has its centre at ((r + 0.5) / H, (c + 0.5) / W).
"""

from __future__ import annotations

import contextlib
import io
from unittest import mock

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

CLICK_NAMES = ('center', 'top_left', 'bottom_right')


def features(image_encoding: str) -> tfds.features.FeaturesDict:
  """The shared schema; `image_encoding` is 'png' or 'jpeg'."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(
          shape=(None, None, 3), encoding_format=image_encoding),
      'image/id': np.int64,
      'objects': tfds.features.Sequence({
          'id': np.int64,
          'box': tfds.features.BBoxFeature(),
          'mask': tfds.features.Image(
              shape=(None, None, 1), encoding_format='png'),
          'category': tfds.features.Text(),
          'clicks': tfds.features.Tensor(shape=(3, 2), dtype=np.float32),
          'refs': tfds.features.Sequence({
              'id': np.int64,
              'sentence_id': np.int64,
              'sentence': tfds.features.Text(),
          }),
      }),
  })


def png_bytes(array: np.ndarray) -> bytes:
  """PNG encoding of a uint8 [H, W, 3] image or [H, W(, 1)] mask.

  Builders pass these bytes to TFDS instead of arrays: PIL encodes a small
  image faster than the TensorFlow op TFDS would run per array, and the
  fastest zlib level (1) cuts build time by a fifth for a few percent more
  disk.
  """
  array = np.asarray(array, np.uint8)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


def box_from_mask(mask: np.ndarray) -> np.ndarray:
  """Tight normalised (ymin, xmin, ymax, xmax) box of a non-empty [H, W] mask."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  if rows.size == 0:
    raise ValueError('box_from_mask: the mask is empty.')
  height, width = mask.shape
  return np.array([rows[0] / height, cols[0] / width,
                   (rows[-1] + 1) / height, (cols[-1] + 1) / width], np.float32)


def clicks_from_mask_and_box(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
  """Simulated annotator clicks [3, 2] (see CLICK_NAMES) for one object.

  Args:
    mask: [H, W] non-empty 0/1 visible mask.
    box: normalised (ymin, xmin, ymax, xmax); the corner clicks are its corners.

  Returns:
    float32 [3, 2] normalised (y, x) points: centre, top-left, bottom-right.
  """
  ys, xs = np.nonzero(mask)
  if ys.size == 0:
    raise ValueError('clicks_from_mask_and_box: the mask is empty.')
  # The centroid of a ring or a half-hidden object may fall off the object;
  # annotators click on it, so take the nearest object pixel.
  nearest = np.argmin((ys - ys.mean())**2 + (xs - xs.mean())**2)
  height, width = mask.shape
  center = ((ys[nearest] + 0.5) / height, (xs[nearest] + 0.5) / width)
  return np.array([center, box[:2], box[2:]], np.float32)


@contextlib.contextmanager
def deterministic_serialization():
  """Makes TFDS write byte-identical TFRecords for identical examples.

  A tf.Example's features are a protobuf map, and protobuf serialises maps
  in an order that changes from process to process; deterministic
  serialisation sorts them. Wrap a builder's `_download_and_prepare` in it.
  """
  serializer = tfds.core.example_serializer.ExampleSerializer

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  with mock.patch.object(serializer, 'serialize_example', serialize_example):
    yield
