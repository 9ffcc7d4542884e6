"""The supervision benchmark: its table, and a smoke run on tiny data."""

import json

import numpy as np
from PIL import Image

from refseg_jax.benchmarks import supervision


def _results(miou: float) -> dict:
  values = dict.fromkeys(supervision.COLUMNS, 0.5)
  return {split: dict(values, mIoU=miou) for split in supervision.SPLITS}


def test_table_rows_and_ratios_to_full():
  summary = {'full': {'results': _results(0.8)},
             'click': {'results': _results(0.6)},
             'text': {'results': _results(0.0)}}
  lines = supervision.table(summary).splitlines()
  assert lines[2] == '| full | validation | 80.00 | 50.00 | 50.00 | 50.00 | 50.00 | 50.00 |'
  assert len([l for l in lines if '| validation |' in l]) == 3
  assert lines[-3:] == ['| full | 1.000 | 1.000 | 1.000 |',
                        '| click | 0.750 | 0.750 | 0.750 |',
                        '| text | 0.000 | 0.000 | 0.000 |']
  # No ratio to a zero full mIoU.
  summary['full']['results'] = _results(0.0)
  assert supervision.table(summary).splitlines()[-1] == '| text | n/a | n/a | n/a |'


def test_modes_share_data_steps_and_seed_pks_modes_also_the_model():
  configs = {mode: supervision.mode_config(mode, '', '/data', 100, 50, 0.05)
             .to_dict() for mode in supervision.MODES}
  without_noise = lambda data: {k: v for k, v in data.items()
                                if k != 'click_noise'}
  for mode, config in configs.items():
    for key in ('batch_size', 'total_steps', 'seed', 'mesh', 'eval'):
      assert config[key] == configs['full'][key], (mode, key)
    assert without_noise(config['data']) == without_noise(
        configs['full']['data'])
  # The same PKS; click scales the weak mask losses' gradient into the trunk.
  trunk = lambda model: {k: v for k, v in model.items()
                         if k != 'mask_trunk_gradient'}
  for mode in ('click', 'click_noise'):
    assert configs[mode]['optimizer'] == configs['full']['optimizer']
    assert trunk(configs[mode]['model']) == trunk(configs['full']['model'])
    assert configs[mode]['model']['mask_trunk_gradient'] == 0.1
  assert configs['full']['model']['mask_trunk_gradient'] == 1.0
  assert configs['click']['loss'] == configs['click_noise']['loss']
  assert [(c['task'], c['data']['click_noise'])
          for c in configs.values()] == [
              ('pks_full', 0.0), ('pks_click', 0.0), ('pks_click', 0.05),
              ('sag_text', 0.0)]
  assert configs['full']['eval']['every_steps'] == 50
  assert configs['full']['total_steps'] == 100


def test_benchmark_run_writes_table_json_and_plot(tiny_data_dir, tmp_path):
  # One mode keeps this smoke run short (the suite's budget); the test above
  # checks that the modes share their settings.
  summary = supervision.run(
      ['click_noise'], str(tmp_path), 'data=ref_shapes_tiny',
      data_dir=tiny_data_dir, total_steps=2, eval_every=2, click_noise=0.05)

  assert json.loads((tmp_path / 'supervision.json').read_text()) == summary
  assert [(e['task'], e['click_noise']) for e in summary.values()] == [
      ('pks_click', 0.05)]
  for entry in summary.values():
    assert set(entry['results']) == set(supervision.SPLITS)
    for values in entry['results'].values():
      assert all(0 <= values[c] <= 1 for c in supervision.COLUMNS)
    # The curve's one point is the final evaluation.
    assert entry['validation_curve'] == [{
        'step': 2, 'mIoU': entry['results']['validation']['mIoU'],
        'PointM': entry['results']['validation']['PointM']}]
    assert entry['wall_s'] > 0
  assert (tmp_path / 'supervision.md').read_text() == supervision.table(
      summary)
  picture = np.asarray(Image.open(tmp_path / 'supervision.png'))
  assert picture.shape[:2] == (400, 1000) and picture.std() > 0
  # A second run reads the finished modes instead of training them again.
  assert supervision.run(['click_noise'], str(tmp_path),
                         'data=ref_shapes_tiny', data_dir=tiny_data_dir,
                         total_steps=2, eval_every=2)['click_noise'] == (
                             summary['click_noise'])
