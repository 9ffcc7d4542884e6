"""The slot oracle: best single slot per expression, against the trainer."""

import json
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from refseg_jax import checkpointing
from refseg_jax import config_lib
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train_state
from refseg_jax.benchmarks import slot_oracle
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator

TEXT_CONFIG = pathlib.Path(__file__).parents[1] / 'configs' / 'text.py'


def _box(top: int, left: int, height: int, width: int, size: int = 8):
  mask = np.zeros((size, size), np.float32)
  mask[top:top + height, left:left + width] = 1
  return mask


def test_best_slot_scores_keep_each_expressions_best_slot():
  # Slot masks at the canvas size (resizing is then the identity); three
  # expressions of one image, three slots.
  slots = np.stack([_box(0, 0, 2, 2), _box(4, 5, 2, 2), np.zeros((8, 8))])
  truths = np.stack([_box(0, 0, 2, 2),    # slot 0 exactly: IoU 1, hit.
                     _box(4, 4, 2, 2),    # slot 1 overlaps 2 of 6 pixels.
                     _box(6, 0, 2, 2)])   # no slot covers or peaks on it.
  batch = {'image': np.zeros((1, 8, 8, 3), np.uint8),
           'eval_mask': truths.astype(np.uint8),
           'orig_size': np.full((3, 2), 8, np.int32),
           'content_size': np.full((3, 2), 8, np.int32)}
  iou, hit = slot_oracle.best_slot_scores(
      np.broadcast_to(slots, (3, 3, 8, 8)).astype(np.float32), batch)
  np.testing.assert_allclose(iou, [1.0, 2 / 6, 0.0], atol=1e-6)
  # Slot 1 peaks first at (4, 5), inside the second truth; the empty slot's
  # flat map peaks at (0, 0), outside the third.
  np.testing.assert_array_equal(hit, [True, True, False])


def test_summarise_splits_rows_by_kind():
  scores = {c: np.array([1.0, 0.0, 0.5]) for c in slot_oracle.COLUMNS}
  rows = slot_oracle.summarise(scores, ['attribute', 'relation', 'attribute'])
  assert list(rows) == ['all', 'attribute', 'relation']
  assert rows['all']['count'] == 3 and rows['all']['mIoU'] == 0.5
  assert rows['attribute'] == {'count': 2, **{c: 0.75
                                              for c in slot_oracle.COLUMNS}}
  assert slot_oracle.expression_kind('the little yellow triangle',
                                     'ref_shapes') == 'attribute'
  assert slot_oracle.expression_kind('a man', 'refcoco/refcoco_unc') is None


def test_oracle_model_columns_agree_with_the_trainers_evaluation(
    tiny_data_dir, tmp_path):
  config = config_lib.load(f'{TEXT_CONFIG}:data=ref_shapes_tiny')
  config.data.data_dir = tiny_data_dir
  mesh = sharding.make_mesh(config.mesh)
  vocab_size = pipeline.load_tokenizer(None, config.data.name).vocab_size
  task = tasks.build(config, vocab_size)
  state, state_shardings = train_state.create(config, task, mesh)
  # The initial state, saved as a run's checkpoint (the scores need not be
  # good, only the same as the trainer's).
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    checkpointing.save_state(manager, 0, state, config)
  expected, _ = evaluator.Evaluator(
      config, task, mesh, state_shardings.eval_variables()).evaluate(
          state.eval_variables(), 'validation')

  rows = slot_oracle.evaluate(config, str(tmp_path), 'validation')
  assert rows['all']['count'] == expected['num_expressions']
  np.testing.assert_allclose(rows['all']['mIoU'], expected['mIoU'], atol=1e-6)
  np.testing.assert_allclose(rows['all']['PointM'], expected['PointM'],
                             atol=1e-9)
  assert sum(v['count'] for k, v in rows.items() if k != 'all') == (
      rows['all']['count'])
  assert all(0 <= v[c] <= 1 for v in rows.values()
             for c in slot_oracle.COLUMNS)
  saved = json.loads((tmp_path / 'slot_oracle_validation.json').read_text())
  assert saved == {'step': 0, 'split': 'validation', 'rows': rows}
