r"""Supervision benchmark: one PKS model trained under each supervision.

    python -m refseg_jax.benchmarks.supervision --workdir=/tmp/supervision

trains `full`, `click` (exact clicks) and `click_noise` (clicks jittered by
`--click_noise` of the box size) with the same PKS model, and `text`
(Shatter and Gather), all with the same data, steps, batch and seed, one
after another (each in `WORKDIR/<mode>`, resumable: a finished mode is not
trained again), then writes

    WORKDIR/supervision.json   per mode: settings, wall time, final metrics
                               of every split, validation history
    WORKDIR/supervision.md     the table below, and each mode's mIoU as a
                               fraction of full supervision's
    WORKDIR/supervision.png    validation mIoU and PointM over the steps

and prints the table: mIoU, oIoU, prec@0.5/0.7/0.9 and PointM (percent) on
`validation`, `test` and `test_novel`. `--config=data=ref_shapes_tiny` and
`--total_steps` make a smoke run.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import matplotlib
import ml_collections

from refseg_jax import config_lib
from refseg_jax import train

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

# Mode -> (config file, uses click noise).
MODES = {'full': ('full.py', False), 'click': ('click.py', False),
         'click_noise': ('click.py', True), 'text': ('text.py', False)}
CONFIGS = epath.Path(__file__).parents[2] / 'configs'
COLUMNS = ('mIoU', 'oIoU', 'prec@0.5', 'prec@0.7', 'prec@0.9', 'PointM')
SPLITS = ('validation', 'test', 'test_novel')



def mode_config(mode: str, arg: str, data_dir: str | None,
                total_steps: int | None, eval_every: int,
                click_noise: float) -> ml_collections.ConfigDict:
  """The training config of one benchmark mode.

  The PKS modes (full, click, click_noise) differ only in the supervision
  and the click noise; text trains Shatter and Gather, with the same data,
  steps, batch and seed.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; known: {list(MODES)}.')
  config_file, noisy = MODES[mode]
  config = config_lib.load(f'{CONFIGS / config_file}:{arg}')
  config.data.data_dir = data_dir
  if total_steps:
    config.total_steps = total_steps
  config.eval.every_steps = eval_every
  config.eval.final_splits = SPLITS
  config.data.click_noise = click_noise if noisy else 0.0
  return config


def validation_curve(history: Sequence[Mapping[str, Any]]
                     ) -> list[dict[str, float]]:
  """[{step, mIoU, PointM}] of validation, the last entry per step (a
  resumed run may evaluate a step twice)."""
  by_step = {h['step']: h for h in history if h['split'] == 'validation'}
  return [{'step': s, 'mIoU': by_step[s]['mIoU'],
           'PointM': by_step[s]['PointM']} for s in sorted(by_step)]


def table(summary: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: one row per (mode, split), `COLUMNS` in percent; then each
  mode's mIoU as a fraction of full supervision's."""
  lines = ['| mode | split | ' + ' | '.join(COLUMNS) + ' |',
           '|---|---|' + '---|' * len(COLUMNS)]
  for mode, entry in summary.items():
    for split in SPLITS:
      values = entry['results'][split]
      lines.append(f'| {mode} | {split} | ' + ' | '.join(
          f'{100 * values[c]:.2f}' for c in COLUMNS) + ' |')
  if 'full' in summary:
    lines += ['', '| mode | ' + ' | '.join(
        f'{s} mIoU / full' for s in SPLITS) + ' |',
              '|---|' + '---|' * len(SPLITS)]
    full = summary['full']['results']
    ratio = lambda a, b: f'{a / b:.3f}' if b else 'n/a'
    for mode, entry in summary.items():
      lines.append(f'| {mode} | ' + ' | '.join(
          ratio(entry['results'][s]['mIoU'], full[s]['mIoU'])
          for s in SPLITS) + ' |')
  return '\n'.join(lines) + '\n'


def plot(summary: Mapping[str, Mapping[str, Any]], path: epath.Path) -> None:
  """Validation mIoU and PointM over the steps, one line per mode."""
  figure, axes = plt.subplots(1, 2, figsize=(10, 4))
  for metric, ax in zip(('mIoU', 'PointM'), axes):
    for mode, entry in summary.items():
      curve = entry['validation_curve']
      ax.plot([c['step'] for c in curve], [100 * c[metric] for c in curve],
              marker='o', label=mode)
    ax.set_xlabel('step')
    ax.set_ylabel(f'validation {metric} (%)')
    ax.grid(alpha=0.3)
    ax.legend()
  figure.tight_layout()
  with path.open('wb') as f:
    figure.savefig(f, format='png', dpi=100)
  plt.close(figure)


def run(modes: Sequence[str], workdir: str, arg: str = '',
        data_dir: str | None = None, total_steps: int | None = None,
        eval_every: int = 325, click_noise: float = 0.05
        ) -> dict[str, dict[str, Any]]:
  """Trains every mode (unless already trained) and writes the reports.

  Returns:
    The summary written to `supervision.json`.
  """
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  summary = {}
  for mode in modes:
    config = mode_config(mode, arg, data_dir, total_steps, eval_every,
                         click_noise)
    wall_file = root / mode / 'wall_s.json'
    if not wall_file.exists():  # Not trained to the end by an earlier run.
      start = time.perf_counter()
      train.train_and_evaluate(config, str(root / mode))
      if not (root / mode / 'results.json').exists():
        raise RuntimeError(f'{mode} stopped before its last step (preempted?)'
                           '; run the benchmark again to resume it.')
      wall_file.write_text(json.dumps(round(time.perf_counter() - start, 1)))
    results = json.loads((root / mode / 'results.json').read_text())
    history = json.loads((root / mode / 'eval_history.json').read_text())
    summary[mode] = {
        'task': config.task,
        'click_noise': config.data.click_noise,
        'model': config.model.to_dict(), 'data': config.data.name,
        'total_steps': config.total_steps, 'batch_size': config.batch_size,
        'seed': config.seed,
        # Wall time of the invocation that trained it (data build, compile,
        # training and evaluations; resumed parts not included).
        'wall_s': json.loads(wall_file.read_text()),
        'results': {s: results[s] for s in SPLITS},
        'validation_curve': validation_curve(history),
    }
    logging.info('%s done in %.0f s.', mode, summary[mode]['wall_s'])
  (root / 'supervision.json').write_text(json.dumps(summary, indent=2))
  (root / 'supervision.md').write_text(table(summary))
  plot(summary, root / 'supervision.png')
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  summary = run(args.modes, args.workdir, args.config, args.data_dir,
                args.total_steps, args.eval_every, args.click_noise)
  print(table(summary))


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so),
  # so that importing this module defines no flag.
  flags.DEFINE_string('workdir', None, 'Output directory.', required=True)
  flags.DEFINE_list('modes', list(MODES), f'Of {list(MODES)}.')
  flags.DEFINE_string(
      'config', '', "Variant argument of every mode's config, e.g. "
      "'data=ref_shapes_tiny'.")
  flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
  flags.DEFINE_integer('total_steps', None,
                       "Train steps; None = the config's.")
  flags.DEFINE_integer(
      'eval_every', 325, 'Validation every this many steps (the curve).')
  flags.DEFINE_float(
      'click_noise', 0.05, 'click_noise mode: click shift std / box size.')
  app.run(main)
