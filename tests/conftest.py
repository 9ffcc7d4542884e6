"""Shared fixtures: the tiny ref_shapes dataset, built once per session."""

import os

# Several fake CPU devices, as a pod slice would have; set before jax loads.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import pytest  # pylint: disable=g-import-not-at-top

from refseg_jax.data import build  # pylint: disable=g-import-not-at-top
from refseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top

TINY = 'ref_shapes/tiny'


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
  """A data config reading the tiny dataset."""
  config = pipeline.default_config()
  config.name = TINY
  config.data_dir = tiny_data_dir
  config.image_size = config.eval_mask_size = 64
  config.shuffle_buffer = 64
  return config
