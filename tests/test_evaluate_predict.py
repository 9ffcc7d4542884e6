"""Using a trained workdir: `refseg_jax.evaluate` and `refseg_jax.predict`.

The session's tiny full-supervision run (`tiny_full_run`) is evaluated and
predicted on; click and text models are checked on workdirs of freshly
initialised variables (`convert.write_workdir` with nothing converted).
"""

import io
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
import tensorflow_datasets as tfds

from refseg_jax import config_lib
from refseg_jax import evaluate
from refseg_jax import predict
from refseg_jax import results
from refseg_jax import trained as trained_lib
from refseg_jax import visualize
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator as evaluator_lib
from refseg_jax.evaluation import metrics
from refseg_jax.models import convert

REPO = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope='module')
def predictor(tiny_full_run):
  return predict.Predictor.from_workdir(str(tiny_full_run), 'latest')


@pytest.fixture(scope='module')
def validation_examples(tiny_data_dir):
  """[(image uint8 [H, W, 3], [sentences], [bool masks [H, W]])] of the tiny
  validation split."""
  builder = tfds.builder('ref_shapes/tiny', data_dir=tiny_data_dir)
  examples = []
  for example in builder.as_dataset(split='validation').as_numpy_iterator():
    objects = example['objects']
    sentences, masks = [], []
    for obj, refs in enumerate(objects['refs']['sentence']):
      for sentence in refs:
        sentences.append(sentence.decode())
        masks.append(objects['mask'][obj, ..., 0].astype(bool))
    examples.append((example['image'], sentences, masks))
  return examples


# ------------------------------------------------------------------ evaluate

def test_evaluate_reproduces_the_runs_results(tiny_full_run, tmp_path):
  saved = json.loads((tiny_full_run / 'results.json').read_text())
  output = tmp_path / 'eval' / 'report.json'
  report = evaluate.evaluate_workdir(str(tiny_full_run), 'latest', ['validation'],
                                     str(output))
  assert report['step'] == saved['step'] == 8
  assert report['checkpoint'] == 'latest'
  for key, value in saved['validation'].items():
    assert report['validation'][key] == pytest.approx(value, abs=1e-9), key
  assert json.loads(output.read_text())['validation'] == report['validation']
  assert (tmp_path / 'eval' / 'report_validation.png').exists()
  # The best checkpoint is the last step's (one evaluation): the same
  # figures, now with every split and the default output.
  best = evaluate.evaluate_workdir(str(tiny_full_run))
  assert best['checkpoint'] == 'best' and best['step'] == 8
  assert best['validation'] == report['validation']
  assert {'validation', 'test', 'test_novel'} <= set(best)
  assert json.loads((tiny_full_run / 'evaluation.json').read_text())[
      'test_novel'] == best['test_novel']
  row = evaluate.table(best).splitlines()[2]
  assert row.startswith(f'| validation | 160 | '
                        f'{100 * saved["validation"]["mIoU"]:.2f} |')


def test_evaluate_command_prints_the_table(tiny_full_run, tmp_path):
  output = tmp_path / 'command.json'
  done = subprocess.run(
      [sys.executable, '-m', 'refseg_jax.evaluate', f'--workdir={tiny_full_run}',
       '--checkpoint=8', '--splits=validation', f'--output={output}'],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  saved = json.loads((tiny_full_run / 'results.json').read_text())['validation']
  assert f'| validation | 160 | {100 * saved["mIoU"]:.2f} |' in done.stdout
  assert json.loads(output.read_text())['checkpoint'] == 'step'


def test_evaluate_bad_input_is_named(tiny_full_run, tmp_path):
  with pytest.raises(ValueError, match=r"Unknown split\(s\) \['val'\]; the "
                     r"dataset has \['validation', 'test', 'test_novel'\]"):
    evaluate.evaluate_workdir(str(tiny_full_run), 'latest', ['val'])
  with pytest.raises(ValueError, match=r'has no step 5; it holds steps '
                     r'\[4, 8\]'):
    evaluate.evaluate_workdir(str(tiny_full_run), '5')
  with pytest.raises(ValueError, match="'newest': expected best, latest"):
    evaluate.evaluate_workdir(str(tiny_full_run), 'newest')
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    evaluate.evaluate_workdir(str(tmp_path))
  # A config without checkpoints, and one the code cannot build any more.
  config = json.loads((tiny_full_run / 'config.json').read_text())
  results.write_json(tmp_path / 'config.json', config)
  with pytest.raises(FileNotFoundError, match='No checkpoint in'):
    evaluate.evaluate_workdir(str(tmp_path), 'latest')
  config['model']['num_heads'] = 4
  results.write_json(tmp_path / 'config.json', config)
  with pytest.raises(ValueError, match='no longer loads with this code '
                     r"\(TypeError: .*num_heads"):
    evaluate.evaluate_workdir(str(tmp_path))


# ------------------------------------------------------------------- predict

def _iou(pred: np.ndarray, true: np.ndarray) -> float:
  """IoU as evaluation counts it (both empty: 1)."""
  union = (pred | true).sum()
  return (pred & true).sum() / union if union else 1.0


def test_predictions_score_what_evaluation_scores(predictor, tiny_full_run,
                                                  validation_examples):
  """Every validation expression predicted one image at a time: the mIoU
  is the run's."""
  ious = []
  for image, sentences, masks in validation_examples:
    for prediction, mask in zip(predictor(image, sentences), masks):
      assert prediction.mask.shape == mask.shape
      np.testing.assert_array_equal(prediction.mask, prediction.response > 0)
      ious.append(_iou(prediction.mask, mask))
  saved = json.loads((tiny_full_run / 'results.json').read_text())['validation']
  assert len(ious) == saved['num_expressions'] == 160
  assert np.mean(ious) == pytest.approx(saved['mIoU'], abs=1e-6)
  # Compiled once per sentence count (the images share one size).
  counts = {len(s) for _, s, _ in validation_examples}
  assert set(predictor.compile_seconds) == {(64, 64, n) for n in counts}


def test_non_square_prediction_is_evaluations_at_the_input_size(predictor):
  """A 40 x 90 image: the mask is 40 x 90 and equals what the evaluation
  step and its resize compute for it."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (40, 90, 3), np.uint8)
  sentences = ['the big red circle', 'small square left of the star']
  predictions = predictor(image, sentences)

  trained = predictor.trained
  config = trained.config
  element = pipeline._resize_and_pad(  # What evaluation reads, with no labels.
      {'image': image, 'box': np.zeros(4, np.float32),
       'clicks': np.zeros((3, 2), np.float32)}, config.data.image_size)
  tokens, text_mask = pipeline.tokenize(trained.tokenizer, sentences,
                                        config.data.max_text_len)
  batch = {'image': np.repeat(element['image'].numpy()[None], 2, 0),
           'text_tokens': tokens, 'text_mask': text_mask,
           'eval_mask': np.zeros((2, 90, 90), np.uint8),
           'orig_size': np.array([[40, 90]] * 2, np.int32),
           'content_size': np.repeat(element['content_size'].numpy()[None],
                                     2, 0),
           'valid': np.ones(2, bool)}
  step = evaluator_lib.make_eval_step(trained.task, trained.mesh,
                                      trained.variable_shardings)
  _, response = step(trained.variables, batch)
  maps, _ = metrics.resize_to_original(response, batch['content_size'],
                                       batch['orig_size'], 90)
  outputs = trained.task.forward(trained.variables, batch, train=False,
                                 rngs=trained.task.eval_rngs())
  # Canvas units -> input pixels, per axis as the resize maps them: the
  # content (28 x 64 canvas pixels) spans the 40 x 90 input.
  np.testing.assert_array_equal(element['content_size'], [28, 64])
  to_pixels = np.array([40 / 28, 90 / 64])
  for i, prediction in enumerate(predictions):
    assert prediction.mask.shape == prediction.response.shape == (40, 90)
    np.testing.assert_allclose(prediction.response, maps[i, :40], atol=1e-5)
    # PKS: the centre and box in the input's pixels.
    np.testing.assert_allclose(prediction.position,
                               outputs['centre'][i] * 64 * to_pixels,
                               rtol=1e-5)
    np.testing.assert_allclose(prediction.box,
                               outputs['box_at_centre'][i] * 64
                               * np.tile(to_pixels, 2),
                               rtol=1e-5)


def test_predict_input_conversions_and_errors(predictor, validation_examples,
                                              tmp_path, caplog):
  image, sentences, _ = validation_examples[0]
  rgb = predictor(image, sentences[0])[0]
  # RGBA: the alpha is dropped; a PNG file reads as the array.
  rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 7,
                                        np.uint8)], -1)
  np.testing.assert_array_equal(predictor(rgba, sentences[0])[0].response,
                                rgb.response)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  np.testing.assert_array_equal(
      predictor(str(tmp_path / 'rgba.png'), sentences[0])[0].response,
      rgb.response)
  # Grayscale: the three channels are its copies.
  gray = image.mean(-1).astype(np.uint8)
  Image.fromarray(gray).save(tmp_path / 'gray.png')
  np.testing.assert_array_equal(
      predictor(str(tmp_path / 'gray.png'), sentences[0])[0].response,
      predictor(np.stack([gray] * 3, -1), sentences[0])[0].response)

  with pytest.raises(FileNotFoundError, match='No image file .*missing.png'):
    predictor(str(tmp_path / 'missing.png'), 'a star')
  (tmp_path / 'notes.png').write_text('not an image')
  with pytest.raises(ValueError, match='notes.png is not an image'):
    predictor(str(tmp_path / 'notes.png'), 'a star')
  with pytest.raises(ValueError, match='float64; expected uint8'):
    predictor(image / 255.0, 'a star')
  with pytest.raises(ValueError, match=r"Sentence 1 \('  '\) is empty"):
    predictor(image, ['a star', '  '])
  long = ' '.join(['the big red circle left of the star'] * 10)
  with caplog.at_level(logging.WARNING):
    truncated = predictor(image, long)[0]
  max_len = predictor.trained.config.data.max_text_len
  assert f'has 82 tokens; the text encoder reads {max_len}: truncated' in (
      caplog.text)
  # What the encoder reads: [CLS], the first max_len - 2 words, [SEP].
  head = predictor.trained.tokenizer.decode(
      predictor.trained.tokenizer(long)['input_ids'][1:max_len - 1])
  np.testing.assert_array_equal(predictor(image, head)[0].response,
                                truncated.response)


def test_predict_command_writes_masks_and_overlays(tiny_full_run, predictor,
                                                   tmp_path):
  image = np.random.default_rng(1).integers(0, 255, (48, 80, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / 'mine.jpg')
  done = subprocess.run(
      [sys.executable, '-m', 'refseg_jax.predict', f'--workdir={tiny_full_run}',
       f'--image={tmp_path / "mine.jpg"}', '--text=the red circle',
       '--text=a star', f'--output={tmp_path / "out"}'],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'ms per sentence (2 in one call)' in done.stdout
  # The best checkpoint is the latest one (step 8), which `predictor` holds.
  expected = predictor(str(tmp_path / 'mine.jpg'), ['the red circle',
                                                    'a star'])
  for i in range(2):
    mask = np.asarray(Image.open(tmp_path / 'out' / f'{i:02d}_mask.png'))
    assert mask.shape == (48, 80) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, expected[i].mask)
    overlay = Image.open(tmp_path / 'out' / f'{i:02d}_overlay.png')
    assert overlay.width == 80 and overlay.height > 48  # The caption below.


def test_click_model_predicts(tiny_data_dir, tmp_path):
  """A click model's workdir predicts masks, positions and boxes (the text
  model's predictions are tested on a trained workdir in test_sag.py)."""
  config = config_lib.load(f'{REPO}/configs/click.py:data=ref_shapes_tiny')
  config.data.data_dir = tiny_data_dir
  convert.write_workdir(config, {}, str(tmp_path))
  loaded = trained_lib.load(str(tmp_path))
  assert loaded.checkpoint == 'best' and loaded.step == 0
  predictor = predict.Predictor(loaded)
  image = np.random.default_rng(2).integers(0, 255, (30, 50, 3), np.uint8)
  first, second = predictor(image, ['a star', 'the red circle'])
  assert first.mask.shape == second.mask.shape == (30, 50)
  assert not np.array_equal(first.response, second.response)
  assert first.position is not None and first.box is not None


def test_tensorboard_shows_each_evaluations_overlays(tiny_full_run):
  """The overlay picture of an evaluation is in TensorBoard too (clu's
  writer, the 'validation/overlays' image at the step)."""
  events = event_accumulator.EventAccumulator(
      str(tiny_full_run), size_guidance={event_accumulator.TENSORS: 0}).Reload()
  assert 'validation/overlays' in events.Tags()['tensors']
  (event,) = events.Tensors('validation/overlays')
  assert event.step == 8
  # An image summary: width, height, then the PNG.
  width, height, png = event.tensor_proto.string_val
  picture = Image.open(io.BytesIO(png))
  saved = Image.open(tiny_full_run / 'overlays' / 'validation_step000008.png')
  assert picture.size == saved.size == (int(width), int(height))
  np.testing.assert_array_equal(np.asarray(picture), np.asarray(saved))


def test_spotlight_keeps_the_masks_colours_and_outlines_it():
  image = np.full((8, 10, 3), 200, np.uint8)
  mask = np.zeros((8, 10), bool)
  mask[2:6, 3:8] = True
  out = np.asarray(visualize.spotlight(image, mask, colour=(255, 0, 0),
                                       dim=0.5))
  edge = mask & ~np.pad(mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                        & mask[1:-1, :-2] & mask[1:-1, 2:], 1)
  assert edge.sum() == 14  # The 4 x 5 rectangle's border.
  np.testing.assert_array_equal(out[edge], [[255, 0, 0]] * 14)
  np.testing.assert_array_equal(out[mask & ~edge], 200)  # Colours kept.
  np.testing.assert_array_equal(out[~mask], 100)  # The rest dimmed.
