"""Reading `configs/*.py`: variant arguments, sibling modules, `load`.

A config file's `get_config(arg)` takes a big_vision-style argument string,
`configs/full.py:data=ref_shapes,model=tiny`, parsed by `parse_arg` against
the variants the file offers; anything it does not know is an error that
names the key and lists the choices. The values themselves live in the
config files and `configs/common.py`, not here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import types
from typing import Any, Mapping, Sequence

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


# Keys (dotted, or a prefix of them) that change neither the model, nor the
# data, nor the optimisation: how often to log, save and evaluate, where the
# data lives, how arrays are laid out over devices, and where pretrained
# weights came from (a resumed run does not read them again).
RESUME_SAFE_KEYS = ('checkpoint_every_steps', 'keep_checkpoints',
                    'log_every_steps', 'eval', 'mesh', 'fsdp_axis',
                    'fsdp_min_size', 'model_init', 'data.data_dir',
                    'data.prepare', 'data.checkpoint_iterator',
                    'data.eval_mask_size')


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; values as JSON has them (lists)."""
  def walk(node: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in node.items():
      if isinstance(value, dict) and value:
        flat.update(walk(value, f'{prefix}{key}.'))
      else:
        flat[f'{prefix}{key}'] = value
    return flat

  return walk(json.loads(json.dumps(dict(tree), default=str)), '')


def _is_safe(key: str) -> bool:
  return any(key == k or key.startswith(k + '.') for k in RESUME_SAFE_KEYS)


def check_resume(saved: Mapping[str, Any], config: ml_collections.ConfigDict,
                 accepted: Sequence[str] = (), where: str = 'the checkpoint'
                 ) -> dict[str, tuple[Any, Any]]:
  """The changes from a checkpoint's config to the resuming `config`.

  Args:
    saved: the config the checkpoint was trained with (a dict).
    config: the config resuming it.
    accepted: keys whose change the user takes deliberately
      (`--accept_config_change`).
    where: the checkpoint, for messages.

  Returns:
    {key: (saved value, new value)} of every changed key.

  Raises:
    ValueError: naming each changed key that changes the model, the data
      or the optimisation (not in `RESUME_SAFE_KEYS`) and is not accepted.
  """
  old, new = flatten(saved), flatten(config.to_dict())
  changes = {key: (old.get(key), new.get(key))
             for key in sorted(set(old) | set(new))
             if old.get(key) != new.get(key)}
  refused = [key for key in changes
             if not _is_safe(key) and key not in accepted]
  if refused:
    listing = '; '.join(f'{key}: {changes[key][0]!r} -> {changes[key][1]!r}'
                        for key in refused)
    raise ValueError(
        f'The config differs from the one {where} was trained with in '
        f'{listing}. Those change the model, the data or the optimisation; '
        f'to resume with them anyway, pass --accept_config_change='
        f'{",".join(refused)}; or start in a new --workdir.')
  return changes
