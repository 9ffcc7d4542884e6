"""Shared fixtures: the tiny ref_shapes dataset, built once per session."""

import os
import pathlib
import shutil
import tempfile

# Several fake CPU devices, as a pod slice would have; set before jax loads.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# XLA with most optimisations off, in this process and (inherited) in every
# subprocess: compiling is most of the suite's time, and optimisations
# change no test's outcome (their numbers are compared within tolerances, or
# between programs compiled alike). Measured on 2 cores beside a training
# run: the whole suite 2,033 s with them, 1,616 s without.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# JAX's persistent compilation cache, for this test session only: the
# end-to-end tests compile the same tiny train, eval and init steps in this
# process and in `refseg_jax.main` subprocesses (measured: test_train.py
# used 6 min 15 s of CPU with it, 8 min 19 s without). Subprocesses and
# pytest-xdist workers inherit the variable; the process that made the
# directory removes it.
if 'JAX_COMPILATION_CACHE_DIR' in os.environ:
  _OWN_COMPILATION_CACHE = None
else:
  _OWN_COMPILATION_CACHE = tempfile.mkdtemp(prefix='refseg_jax_tests_xla_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _OWN_COMPILATION_CACHE

import filelock  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from refseg_jax import config_lib  # pylint: disable=g-import-not-at-top
from refseg_jax import tasks  # pylint: disable=g-import-not-at-top
from refseg_jax.data import build  # pylint: disable=g-import-not-at-top

TINY = 'ref_shapes/tiny'
REPO = pathlib.Path(__file__).parents[1]


# The longest files first, by their measured time (`pytest --durations`):
# with `--dist loadfile --no-loadscope-reorder` (setup.cfg) the two xdist
# workers take files in collection order, so a long file collected last
# would run alone at the end. test_train.py trains `tiny_full_run` first,
# which test_evaluate_predict.py uses too.
_LONGEST_FIRST = ('test_train.py', 'test_soak.py', 'test_evaluate_predict.py',
                  'test_multihost.py', 'test_sag.py', 'test_remat.py',
                  'test_train_step_benchmark.py', 'test_mixed.py',
                  'test_configs.py', 'test_refcoco.py',
                  'test_supervision_benchmark.py', 'test_convert.py',
                  'test_notebook.py', 'test_click.py', 'test_pks.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return (_LONGEST_FIRST.index(name) if name in _LONGEST_FIRST
            else len(_LONGEST_FIRST))
  items.sort(key=rank)  # Stable: the order within a file is kept.


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_COMPILATION_CACHE:
    shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  """A TFDS data dir holding the tiny ref_shapes, built once per session."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  build.build(TINY, data_dir)
  return data_dir


@pytest.fixture(scope='session')
def tiny_builder(tiny_data_dir):
  """The prepared tiny ref_shapes builder."""
  return build.build(TINY, tiny_data_dir)


@pytest.fixture(scope='session')
def tiny_config(tiny_data_dir):
  """A data config reading the tiny dataset: ungrouped batches (every
  expression once an epoch), a small shuffle buffer."""
  config = config_lib.load(
      f'{REPO}/configs/full.py:data=ref_shapes_tiny').data
  config.data_dir = tiny_data_dir
  config.expressions_per_image = 0
  config.shuffle_buffer = 64
  return config


@pytest.fixture(scope='session')
def tiny_full_run(tiny_data_dir, tmp_path_factory, request):
  """A workdir of `test_train.tiny_train_config` trained 8 steps and
  evaluated: trained once for the whole session, across xdist workers
  (the first to ask trains it under a file lock, the other waits for it).
  Tests only read it (and may add evaluation reports)."""
  from test_train import tiny_train_config  # pylint: disable=g-import-not-at-top
  from refseg_jax import train  # pylint: disable=g-import-not-at-top
  # xdist workers' temp dirs share this session's parent; without xdist the
  # parent is shared by every session, so the session's own dir is used.
  root = tmp_path_factory.getbasetemp()
  if hasattr(request.config, 'workerinput'):  # An xdist worker.
    root = root.parent
  workdir = root / 'tiny_full_run'
  with filelock.FileLock(str(root / 'tiny_full_run.lock')):
    if not (workdir / 'results.json').exists():
      train.train_and_evaluate(tiny_train_config(tiny_data_dir), str(workdir))
  return workdir


@pytest.fixture(scope='session')
def tiny_model():
  """`tiny_model('full.py', vocab_size, dim=16)`: the flax model of a
  config's tiny variant (the configs hold every field's value), with the
  given fields changed."""

  def build(config_file: str, vocab_size: int, **fields):
    config = config_lib.load(
        f'{REPO}/configs/{config_file}:data=ref_shapes_tiny')
    config.model.update(fields)
    return tasks.build(config, vocab_size).model

  return build


@pytest.fixture(scope='session')
def garbage_data_config(tiny_config, tmp_path_factory):
  """`garbage_data_config('mask', ...)`: a data config reading the tiny
  ref_shapes rebuilt with the named labels ('mask', 'box', 'clicks') of
  every object replaced by random values, built once per set of labels."""
  # pylint: disable=g-import-not-at-top
  import numpy as np
  from refseg_jax.data import features
  built = {}

  def garbled(*labels: str):
    key = tuple(sorted(labels))
    if key not in built:
      noise = np.random.default_rng(0)
      real_png = features.png_bytes

      def png_bytes(array):
        if array.ndim == 2 and 'mask' in key:  # Masks are 2-D, images 3-D.
          array = noise.integers(0, 2, array.shape, dtype=np.uint8)
        return real_png(array)

      def random_box(mask):
        del mask
        low = noise.uniform(0.0, 0.5, 2)
        return np.concatenate([low, low + noise.uniform(0.1, 0.5, 2)])

      with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, 'png_bytes', png_bytes)
        if 'box' in key:
          patch.setattr(features, 'box_from_mask', random_box)
        if 'clicks' in key:
          patch.setattr(features, 'clicks_from_mask_and_box',
                        lambda mask, box: noise.uniform(
                            0, 1, (3, 2)).astype(np.float32))
        config = tiny_config.copy_and_resolve_references()
        config.data_dir = str(tmp_path_factory.mktemp('garbage'))
        build.build(config.name, config.data_dir)
      built[key] = config
    return built[key]

  return garbled
