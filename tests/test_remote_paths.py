"""Workdirs on gs://: every file the code itself writes goes through
`etils.epath` (orbax, TFDS and TensorBoard's writer do so themselves).

No bucket is reachable from the tests: epath's gs:// backend is mocked
onto a local directory (`etils.epath.testing.mock_epath`), so a writer that
used plain `open`/`os` on a gs:// path would fail, or write a local
'gs:' directory, instead of landing in the fake bucket.
"""

import json
import os
import pathlib
import re

from clu import metric_writers
from etils import epath
from etils.epath import gpath
import numpy as np
from PIL import Image
import pytest

from refseg_jax import predict
from refseg_jax import results
from refseg_jax import train
from refseg_jax import visualize

BUCKET = 'gs://refseg-test-bucket'
PACKAGE = pathlib.Path(__file__).parents[1] / 'refseg_jax'


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """(epath.Path of the fake bucket, the local directory behind it)."""
  monkeypatch.chdir(tmp_path)  # A stray local 'gs:' directory lands here.
  root = tmp_path / 'bucket'
  root.mkdir()

  def local(path):
    path = os.fspath(path)
    return str(root) + path[len(BUCKET):] if path.startswith(BUCKET) else path

  def one_path(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two_paths(original, path, dst, *args, **kwargs):
    return original(local(path), local(dst), *args, **kwargs)

  # With TensorFlow installed, epath sends gs:// to TF's backend without
  # looking at the table mock_epath replaces (etils 1.15): hide TF from it.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  with epath.testing.mock_epath(
      **{name: one_path for name in (
          'open', 'exists', 'isdir', 'listdir', 'glob', 'makedirs', 'mkdir',
          'rmtree', 'remove', 'stat', 'walk')},
      rename=two_paths, replace=two_paths, copy=two_paths):
    yield epath.Path(BUCKET), root
  assert not (tmp_path / 'gs:').exists()


def test_run_files_land_in_the_bucket(bucket):
  workdir, root = bucket
  results.write_json(workdir / 'results.json', {'step': 3})
  picture = Image.fromarray(np.full((4, 6, 3), 9, np.uint8))
  writer = metric_writers.LoggingWriter()
  for step in (1, 2):  # The training loop's evaluation log.
    train._log_eval(writer, step, 'validation', {'mIoU': 0.5 * step},
                    picture, workdir)
  assert json.loads((root / 'results.json').read_text()) == {'step': 3}
  assert json.loads((root / 'eval_history.json').read_text()) == [
      {'step': 1, 'split': 'validation', 'mIoU': 0.5},
      {'step': 2, 'split': 'validation', 'mIoU': 1.0}]
  saved = Image.open(root / 'overlays' / 'validation_step000002.png')
  np.testing.assert_array_equal(np.asarray(saved), np.asarray(picture))
  assert not list(root.glob('*.tmp'))  # Atomic writes cleaned up.


def test_predictions_land_in_the_bucket(bucket):
  output, root = bucket
  mask = np.zeros((5, 7), bool)
  mask[1:3, 2:6] = True
  written = predict.write_outputs(
      np.zeros((5, 7, 3), np.uint8),
      [predict.Prediction('the square', mask, mask.astype(np.float32))],
      output / 'predictions')
  assert [str(p) for p in written] == [
      f'{BUCKET}/predictions/00_mask.png', f'{BUCKET}/predictions/00_overlay.png']
  np.testing.assert_array_equal(
      np.asarray(Image.open(root / 'predictions' / '00_mask.png')),
      mask * 255)
  assert visualize.write_png(Image.new('RGB', (2, 2)), output / 'a' / 'b.png'
                             ).exists()
  assert (root / 'a' / 'b.png').exists()


# Local-only files read by path on purpose: config files (Python source
# the user names on the command line), /proc/cpuinfo, the source tree's git
# commit.
_LOCAL_ON_PURPOSE = {'config_lib.py': 'os.path', 'results.py': 'pathlib'}
_PLAIN_FILE_ACCESS = re.compile(
    r'(?<![\w.])open\(|\bos\.(path|makedirs|mkdir|remove|rename|replace|'
    r'listdir|walk)\b|\bshutil\.|\bpathlib\b|\bglob\.glob\b')


def test_the_package_touches_files_through_epath_only():
  """A guard against regressions the bucket tests above cannot see: no
  module opens, lists or moves files through `open`, `os`, `shutil`,
  `pathlib` or `glob`, which know nothing of gs://."""
  offenders = []
  for path in sorted(PACKAGE.rglob('*.py')):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split('#')[0]
      match = _PLAIN_FILE_ACCESS.search(code)
      if match and _LOCAL_ON_PURPOSE.get(path.name) != match.group(0):
        offenders.append(f'{path.relative_to(PACKAGE)}:{number}: {line}')
  assert not offenders, '\n'.join(offenders)
