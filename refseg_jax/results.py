"""The JSON files a run writes into its workdir.

    config.json         the config the run used
    results.json        final evaluation, {split: {metric: value}, "step": N,
                        "provenance": `provenance(config)`}
    eval_history.json   every evaluation, [{"step", "split", metric: value}]
    evaluation.json     `refseg_jax.evaluate`'s report, laid out as
                        results.json (+ "checkpoint")

Written whole and atomically (a temporary file renamed into place), through
`etils.epath`, so that they work on gs:// and a reader never sees half a
file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import pathlib
import platform
import subprocess
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import ml_collections

# The packages whose versions a result records: {name: its distributions,
# the first installed one counts} (setup.py installs TensorFlow's CPU build).
VERSIONED_PACKAGES = {
    'jax': ('jax',), 'jaxlib': ('jaxlib',), 'flax': ('flax',),
    'optax': ('optax',), 'orbax-checkpoint': ('orbax-checkpoint',),
    'tensorflow': ('tensorflow-cpu', 'tensorflow'), 'numpy': ('numpy',)}


def write_json(path: epath.Path, value: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=2))
  tmp.replace(path)


def append_history(path: epath.Path, entry: Mapping[str, Any]) -> None:
  """Adds `entry` (with its 'step' and 'split') to the JSON list at `path`,
  in place of an earlier entry of the same step and split: a run killed
  after an evaluation but before the checkpoint of that step evaluates it
  again on resuming. (Rewritten whole: gs:// files cannot be appended to.)
  """
  history = json.loads(path.read_text()) if path.exists() else []
  kept = [old for old in history
          if (old['step'], old['split']) != (entry['step'], entry['split'])]
  write_json(path, kept + [dict(entry)])


def percent_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str],
                  header: tuple[str, str], count_key: str,
                  digits: int = 2) -> str:
  """A markdown table: per row its name, count and `columns` in percent.

  Args:
    rows: {row name: {count_key: int, column: fraction}}.
    columns: the fractions to print, in order.
    header: the titles of the name and count columns.
    count_key: where each row holds its count.
    digits: decimals of the percentages.
  """
  lines = [f'| {header[0]} | {header[1]} | ' + ' | '.join(columns) + ' |',
           '|---|---|' + '---|' * len(columns)]
  for name, values in rows.items():
    lines.append(f'| {name} | {values[count_key]} | ' + ' | '.join(
        f'{100 * values[c]:.{digits}f}' for c in columns) + ' |')
  return '\n'.join(lines)


def config_hash(config: ml_collections.ConfigDict) -> str:
  """sha256 of the config as sorted, compact JSON (`config.json`'s content,
  whatever its formatting)."""
  text = json.dumps(config.to_dict(), sort_keys=True, separators=(',', ':'),
                    default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def cpu_model() -> str:
  """The CPU's model name (Linux's /proc/cpuinfo; else `platform`'s)."""
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    for line in cpuinfo.read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  return platform.processor() or platform.machine()


def git_commit() -> str | None:
  """The commit of this source tree, '+dirty' if a tracked file (code,
  configs) has uncommitted changes; None outside a git checkout (an
  installed wheel)."""
  source = pathlib.Path(__file__).parent
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=source,
                            capture_output=True, text=True, check=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain',
                            '--untracked-files=no'],
                           cwd=source, capture_output=True, text=True,
                           check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('+dirty' if dirty else '')


def installed_version(distributions: tuple[str, ...]) -> str | None:
  """The version of the first of `distributions` installed, else None."""
  for name in distributions:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def provenance(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What produced a result: seed, config hash, code, versions, hardware."""
  device = jax.devices()[0]
  return {
      'seed': config.seed,
      'config_sha256': config_hash(config),
      'git_commit': git_commit(),
      'versions': {'python': platform.python_version(), **{
          name: installed_version(distributions)
          for name, distributions in VERSIONED_PACKAGES.items()}},
      'platform': device.platform,
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'process_count': jax.process_count(),
      'cpu_model': cpu_model(),
  }
