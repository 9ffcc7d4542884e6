"""The JSON files a run writes into its workdir.

    config.json         the config the run used
    results.json        final evaluation, {split: {metric: value}, "step": N}
    eval_history.json   every evaluation, [{"step", "split", metric: value}]

Written whole and atomically (a temporary file renamed into place), through
`etils.epath`, so that they work on gs:// and a reader never sees half a
file.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from etils import epath


def write_json(path: epath.Path, value: Any) -> None:
  """Writes JSON atomically (a reader never sees half a file)."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=2))
  tmp.replace(path)


def append_history(path: epath.Path, entry: Mapping[str, Any]) -> None:
  """Adds `entry` to the JSON list at `path` (rewritten whole: gs:// files
  cannot be appended to)."""
  history = json.loads(path.read_text()) if path.exists() else []
  write_json(path, history + [dict(entry)])
