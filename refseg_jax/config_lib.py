"""Reading `configs/*.py`: variant arguments, sibling modules, `load`.

A config file's `get_config(arg)` takes a big_vision-style argument string,
`configs/full.py:data=ref_shapes,model=tiny`, parsed by `parse_arg` against
the variants the file offers; anything it does not know is an error that
names the key and lists the choices. The values themselves live in the
config files and `configs/common.py`, not here.
"""

from __future__ import annotations

import importlib.util
import os
import types
from typing import Any, Mapping

import ml_collections


def parse_arg(arg: str | None, **defaults: str) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' against the allowed keys and defaults.

  Args:
    arg: the part of `--config` after the colon (None or '' = defaults).
    **defaults: every allowed key with its default value.

  Raises:
    ValueError: naming an unknown key or a malformed item.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Config argument {item!r} is not key=value '
                       f'(keys: {sorted(defaults)}).')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: '
                       f'{sorted(defaults)}.')
    values[key] = value
  return ml_collections.ConfigDict(values)


def choose(variants: Mapping[str, dict[str, Any]], name: str,
           kind: str) -> dict[str, Any]:
  """The variant `name`, or a ValueError listing the `kind`'s choices."""
  if name not in variants:
    raise ValueError(f'Unknown {kind} variant {name!r}; known: '
                     f'{sorted(variants)}.')
  return dict(variants[name])


def _import_path(path: str, module_name: str) -> types.ModuleType:
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f'No config file {path!r}.')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def import_sibling(config_file: str, name: str) -> types.ModuleType:
  """The module `name`.py next to `config_file` (a config's `common.py`).

  Config files are loaded by path (`--config=configs/full.py`), not as a
  package, so they import their shared module by path too: it works from
  any working directory.
  """
  return _import_path(os.path.join(os.path.dirname(config_file),
                                   f'{name}.py'), f'_refseg_config_{name}')


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of 'path/to/config.py[:arg]', as `--config=` reads it.

  For notebooks and tests: `load('configs/full.py:data=ref_shapes_tiny')`.
  """
  path, _, arg = spec.partition(':')
  return _import_path(path, '_refseg_config').get_config(arg or None)
