r"""Segments what sentences refer to in your own image.

As a library:

    predictor = Predictor.from_workdir('/tmp/refseg_full')   # best checkpoint
    for p in predictor('photo.jpg', ['the red circle', 'the left square']):
      p.mask       # bool [H, W], the input image's own size
      p.response   # float32 [H, W] it was thresholded from (> 0)
      p.position   # PKS: the predicted centre (y, x) in pixels, else None
      p.box        # PKS: (ymin, xmin, ymax, xmax) in pixels, else None

As a command, writing per sentence a mask PNG (0/255, the input's size) and
an overlay PNG (mask, sentence, PKS' position and box):

    python -m refseg_jax.predict --workdir=/tmp/refseg_full \
        --image=photo.jpg --text="the red circle" [--text=...] --output=DIR

The image fits the canvas as in training and evaluation
(`pipeline.fit_image` by the run's `config.data.resize`: letterbox or
stretch) and the response goes back through evaluation's resize
(`metrics.resize_to_original`), so a prediction is what evaluation scores
for the same image and sentence. One image with all its sentences is one
batched call on one device, compiled once per (image size, sentence count).
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageOps
import tensorflow as tf

from refseg_jax import trained as trained_lib
from refseg_jax import visualize
from refseg_jax.data import pipeline
from refseg_jax.evaluation import metrics


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What the model says one sentence refers to, at the input's size.

  Attributes:
    text: the sentence.
    mask: bool [H, W].
    response: float32 [H, W], the map `mask` is `response > 0` of.
    position: PKS only: the predicted centre (y, x) in pixels.
    box: PKS only: the box (ymin, xmin, ymax, xmax) in pixels.
  """
  text: str
  mask: np.ndarray
  response: np.ndarray
  position: np.ndarray | None = None
  box: np.ndarray | None = None


def read_image(image: Any) -> np.ndarray:
  """uint8 [H, W, 3] from an array or an image file (local or gs://).

  Grayscale and RGBA become RGB (alpha dropped); a file's EXIF rotation is
  applied, as photo viewers show it.

  Raises:
    FileNotFoundError: no such file (naming it).
    ValueError: a file that is not an image, or an array that is not
      uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] (naming what it is).
  """
  if isinstance(image, (str, os.PathLike)):
    path = epath.Path(image)
    if not path.exists():
      raise FileNotFoundError(f'No image file {path}.')
    try:
      with Image.open(io.BytesIO(path.read_bytes())) as picture:
        return np.asarray(ImageOps.exif_transpose(picture).convert('RGB'))
    except Image.UnidentifiedImageError as e:
      raise ValueError(f'{path} is not an image PIL can read.') from e
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f'The image array is {array.dtype}; expected uint8.')
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f'The image array has shape {array.shape}; expected '
                     '[H, W], [H, W, 1], [H, W, 3] or [H, W, 4].')
  if min(array.shape[:2]) == 0:
    raise ValueError(f'The image array has shape {array.shape}: empty.')
  return np.broadcast_to(array[..., :3], (*array.shape[:2], 3)).copy()


def check_sentences(texts: str | Sequence[str], tokenizer,
                    max_len: int) -> list[str]:
  """The sentences, stripped; an empty one is refused, one longer than
  the text encoder's `max_len` tokens is truncated with a warning."""
  texts = [texts] if isinstance(texts, str) else list(texts)
  if not texts:
    raise ValueError('No sentence given.')
  stripped = [t.strip() for t in texts]
  for i, text in enumerate(stripped):
    if not text:
      raise ValueError(f'Sentence {i} ({texts[i]!r}) is empty.')
    length = len(tokenizer(text)['input_ids'])
    if length > max_len:
      logging.warning('Sentence %d (%r) has %d tokens; the text encoder reads '
                      '%d: truncated.', i, text, length, max_len)
  return stripped


class Predictor:
  """A trained model that segments what sentences refer to in an image."""

  def __init__(self, trained: trained_lib.Trained):
    self.trained = trained
    self._task = trained.task
    self._size = trained.config.data.image_size
    # How images fit the canvas: as the run trained ('letterbox' for runs
    # from before config.data.resize existed).
    self._resize = pipeline.resize_of(trained.config.data)
    self._max_len = trained.config.data.max_text_len
    self._compiled: dict[tuple[int, int, int], Any] = {}
    # Seconds each input shape took to compile, for reports.
    self.compile_seconds: dict[tuple[int, int, int], float] = {}

  @classmethod
  def from_workdir(cls, workdir: str, checkpoint: str = 'best'
                   ) -> 'Predictor':
    """Loads a checkpoint ('best', 'latest' or a step) of `workdir` onto
    this host's first device."""
    config = trained_lib.load_config(epath.Path(workdir))
    return cls(trained_lib.load(workdir, checkpoint,
                                trained_lib.single_device_mesh(config)))

  def _predict_fn(self, variables, image, tokens, text_mask, content,
                  orig, out_size: int) -> dict[str, jax.Array]:
    """Canvas image [1, S, S, 3] and T sentences -> 'maps' [T, M, M] at the
    original size, and for PKS the canvas-normalised 'centre' [T, 2] and
    'box_at_centre' [T, 4]."""
    outputs = self._task.forward(
        variables, {'image': image, 'text_tokens': tokens,
                    'text_mask': text_mask},
        train=False, rngs=self._task.eval_rngs())
    count = tokens.shape[0]
    response = self._task.response_map(
        outputs, self._size, jnp.broadcast_to(content, (count, 2)))
    maps, _ = metrics.resize_to_original(
        response, jnp.broadcast_to(content, (count, 2)),
        jnp.broadcast_to(orig, (count, 2)), out_size)
    return {'maps': maps, **{k: outputs[k] for k in ('centre', 'box_at_centre')
                             if k in outputs}}

  def _compiled_for(self, height: int, width: int, count: int, args):
    key = (height, width, count)
    if key not in self._compiled:
      start = time.perf_counter()
      self._compiled[key] = jax.jit(
          self._predict_fn, static_argnames='out_size').lower(
              *args, out_size=max(height, width)).compile()
      self.compile_seconds[key] = time.perf_counter() - start
    return self._compiled[key]

  def __call__(self, image: Any, texts: str | Sequence[str]
               ) -> list[Prediction]:
    """Predictions for each sentence about one image.

    Args:
      image: uint8 [H, W, 3] (or grayscale / RGBA) array, or an image path.
      texts: one sentence or several.
    """
    pixels = read_image(image)
    texts = check_sentences(texts, self.trained.tokenizer, self._max_len)
    canvas, content = pipeline.fit_image(tf.constant(pixels), self._size,
                                         self._resize)
    tokens, text_mask = pipeline.tokenize(self.trained.tokenizer, texts,
                                          self._max_len)
    height, width = pixels.shape[:2]
    args = (self.trained.variables, canvas.numpy()[None], tokens, text_mask,
            content.numpy(), np.array([height, width], np.int32))
    result = jax.device_get(
        self._compiled_for(height, width, len(texts), args)(*args))
    # Canvas-normalised -> pixels of the input: a canvas unit is S pixels
    # of the content, which spans the whole input (stretched: content =
    # (S, S), so a canvas unit is the input's (H, W)).
    to_pixels = self._size / content.numpy() * [height, width]
    predictions = []
    for i, text in enumerate(texts):
      response = result['maps'][i, :height, :width]
      predictions.append(Prediction(
          text=text, mask=response > 0, response=response,
          **({'position': result['centre'][i] * to_pixels,
              'box': result['box_at_centre'][i] * np.tile(to_pixels, 2)}
             if 'centre' in result else {})))
    return predictions


# ------------------------------------------------------------------ command

def overlay_picture(pixels: np.ndarray, prediction: Prediction
                    ) -> Image.Image:
  """The mask lit and outlined in red (the rest dimmed), PKS' box and
  position in white."""
  picture = visualize.spotlight(pixels, prediction.mask)
  if prediction.box is not None:
    draw = ImageDraw.Draw(picture)
    ymin, xmin, ymax, xmax = prediction.box
    draw.rectangle([xmin, ymin, xmax, ymax], outline=(255, 255, 255))
    y, x = prediction.position
    arm = max(3, round(min(pixels.shape[:2]) / 30))
    draw.line([(x - arm, y), (x + arm, y)], fill=(255, 255, 255), width=2)
    draw.line([(x, y - arm), (x, y + arm)], fill=(255, 255, 255), width=2)
  return picture


def write_outputs(pixels: np.ndarray, predictions: Sequence[Prediction],
                  output: epath.Path) -> list[epath.Path]:
  """Writes `NN_mask.png` and `NN_overlay.png` (the sentence underneath)
  per sentence; returns their paths."""
  written = []
  for i, prediction in enumerate(predictions):
    for name, picture in (
        (f'{i:02d}_mask.png',
         Image.fromarray(prediction.mask.astype(np.uint8) * 255)),
        (f'{i:02d}_overlay.png', visualize.with_caption(
            overlay_picture(pixels, prediction), prediction.text))):
      written.append(visualize.write_png(picture, output / name))
  return written


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  pixels = read_image(FLAGS.image)  # A bad image fails before loading.
  predictor = Predictor.from_workdir(FLAGS.workdir, FLAGS.checkpoint)
  start = time.perf_counter()
  predictions = predictor(pixels, FLAGS.text)
  seconds = time.perf_counter() - start - sum(
      predictor.compile_seconds.values())
  written = write_outputs(pixels, predictions, epath.Path(FLAGS.output))
  trained = predictor.trained
  print(f'{trained.workdir}, {trained.checkpoint} checkpoint (step '
        f'{trained.step}), image {pixels.shape[1]}x{pixels.shape[0]}:')
  for i, prediction in enumerate(predictions):
    extra = ('' if prediction.position is None else
             f', centre (y, x) {np.round(prediction.position).astype(int)}')
    print(f'  {i:02d} {prediction.text!r}: {prediction.mask.mean():.1%} of '
          f'the image{extra}')
  print(f'Compiled in {sum(predictor.compile_seconds.values()):.1f} s; '
        f'prediction {1e3 * seconds / len(predictions):.0f} ms per sentence '
        f'({len(predictions)} in one call). Wrote {len(written)} files to '
        f'{FLAGS.output}.')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  # Defined only when run as a program (every command does so), so that
  # importing this module defines no flag.
  flags.DEFINE_string('workdir', None, 'A trained workdir.')
  flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
  flags.DEFINE_string('image', None, 'The image file (local or gs://).')
  flags.DEFINE_multi_string('text', None, 'A sentence; repeat for several.')
  flags.DEFINE_string('output', None, 'Directory for the PNGs.')
  flags.mark_flags_as_required(['workdir', 'image', 'text', 'output'])
  app.run(main)
