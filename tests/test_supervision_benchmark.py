"""The supervision benchmark, as a smoke run on the tiny ref_shapes."""

import json

import numpy as np
from PIL import Image

from refseg_jax.benchmarks import supervision


def test_benchmark_trains_each_mode_and_writes_table_json_and_plot(
    tiny_data_dir, tmp_path):
  summary = supervision.run(
      ['full', 'click_noise'], str(tmp_path), 'data=ref_shapes_tiny',
      data_dir=tiny_data_dir, total_steps=4, eval_every=2, click_noise=0.05)

  assert json.loads((tmp_path / 'supervision.json').read_text()) == summary
  full, noisy = summary['full'], summary['click_noise']
  assert (full['supervision'], full['click_noise']) == ('full', 0.0)
  assert (noisy['supervision'], noisy['click_noise']) == ('click', 0.05)
  # Same model, steps and seed; only the supervision differs.
  for key in ('model', 'data', 'total_steps', 'batch_size', 'seed'):
    assert full[key] == noisy[key], key
  for entry in summary.values():
    assert set(entry['results']) == set(supervision.SPLITS)
    for values in entry['results'].values():
      assert all(0 <= values[c] <= 1 for c in supervision.COLUMNS)
    assert [c['step'] for c in entry['validation_curve']] == [2, 4]
    # The curve's last point is the final evaluation.
    assert entry['validation_curve'][-1]['mIoU'] == (
        entry['results']['validation']['mIoU'])

  table = (tmp_path / 'supervision.md').read_text()
  assert table == supervision.table(summary)
  rows = [line for line in table.splitlines() if line.startswith('| full |')]
  assert len(rows) == 3 + 1  # Three splits, then the ratio row.
  assert rows[-1] == '| full | 1.000 | 1.000 | 1.000 |'
  picture = np.asarray(Image.open(tmp_path / 'supervision.png'))
  assert picture.shape[:2] == (400, 1000) and picture.std() > 0
