r"""Supervision benchmark: one PKS model trained under each supervision,
over several seeds.

    python -m refseg_jax.benchmarks.supervision --workdir=/tmp/supervision

trains `full`, `click` (exact clicks) and `click_noise` (clicks jittered by
`--click_noise` of the box size) with the same PKS model, and `text`
(Shatter and Gather), and on request mixed supervision
(`mixed_<mask %>_<rest>`: `configs/mixed.py`, e.g. `mixed_10_clicks`),
all with the same data, steps and batch, once per
seed of `--seeds` (default 0,1,2), one after another (each in
`WORKDIR/<mode>/seed<k>`, resumable: a finished run is not trained again),
then writes

    WORKDIR/supervision.json   per mode: settings; per seed: wall time,
                               final metrics of every split, validation
                               history; over the seeds: mean, std, min
    WORKDIR/supervision.md     the table below, and each mode's mIoU as a
                               fraction of full supervision's
    WORKDIR/supervision.png    final validation mIoU and PointM per mode
                               (mean, std, each seed); with --eval_every,
                               also the curves over the steps
    WORKDIR/mask_fractions.png with mixed modes: validation mIoU against
                               the percentage of referents with masks

and prints the table: mIoU, oIoU, prec@0.5/0.7/0.9 and PointM (percent) on
`validation`, `test` and `test_novel`, each as mean ± std (the sample
standard deviation, n - 1) and the minimum over the seeds; the ratios to
full supervision are ratios of the means, with their spread propagated to
first order. Without `--eval_every` a run evaluates only at its end, so the
`full` mode is exactly the README's default run (plus `test_novel`).
`--config=data=ref_shapes_tiny`, `--total_steps` and `--seeds=0` make a
smoke run.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import matplotlib
import ml_collections
import numpy as np

from refseg_jax import config_lib
from refseg_jax import train

matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

# Mode -> (config file, uses click noise).
MODES = {'full': ('full.py', False), 'click': ('click.py', False),
         'click_noise': ('click.py', True), 'text': ('text.py', False)}
# Mixed supervision (configs/mixed.py), any mask percentage and rest:
# 'mixed_10_clicks', 'mixed_1_clicks', 'mixed_10_text', 'mixed_10_none'
# (the masks alone); then '_teacher': the teacher's masks for the clicked
# examples (click_teacher=1); '_noise': the clicks with --click_noise.
MIXED_MODE = re.compile(
    r'mixed_(\d+(?:\.\d+)?)_(clicks|text|none)(_teacher)?(_noise)?')
CONFIGS = epath.Path(__file__).parents[2] / 'configs'
COLUMNS = ('mIoU', 'oIoU', 'prec@0.5', 'prec@0.7', 'prec@0.9', 'PointM')
SPLITS = ('validation', 'test', 'test_novel')



def mode_config(mode: str, arg: str, data_dir: str | None,
                total_steps: int | None, eval_every: int,
                click_noise: float, seed: int = 0
                ) -> ml_collections.ConfigDict:
  """The training config of one benchmark mode and seed.

  The PKS modes (full, click, click_noise, mixed_*) differ only in the
  supervision and the click noise; text trains Shatter and Gather, with the
  same data, steps, batch and seed. `eval_every` 0 evaluates at the end only.
  """
  mixed = MIXED_MODE.fullmatch(mode)
  if mixed:
    config_file, noisy = 'mixed.py', bool(mixed[4])
    arg = (f'{arg},masks={mixed[1]},rest={mixed[2]},'
           f'click_teacher={int(bool(mixed[3]))}')
  elif mode in MODES:
    config_file, noisy = MODES[mode]
  else:
    raise ValueError(f'Unknown mode {mode!r}; known: {list(MODES)} and '
                     "'mixed_<mask %>_<clicks|text|none>[_teacher][_noise]'.")
  config = config_lib.load(f'{CONFIGS / config_file}:{arg}')
  config.seed = seed
  config.data.data_dir = data_dir
  if total_steps:
    config.total_steps = total_steps
  config.eval.every_steps = eval_every or config.total_steps
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


def spread(values: Sequence[float]) -> dict[str, float]:
  """{mean, std, min, n} of one metric over the seeds; std is the sample
  standard deviation (n - 1), 0 for a single seed."""
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()),
          'std': float(values.std(ddof=1)) if len(values) > 1 else 0.0,
          'min': float(values.min()), 'n': len(values)}


def aggregate(results: Sequence[Mapping[str, Mapping[str, float]]]
              ) -> dict[str, dict[str, dict[str, float]]]:
  """{split: {metric: spread}} over the seeds' final results."""
  return {split: {metric: spread([r[split][metric] for r in results])
                  for metric in results[0][split]}
          for split in SPLITS}


def ratio(numerator: Mapping[str, float], denominator: Mapping[str, float]
          ) -> tuple[float, float] | None:
  """(mean_a / mean_b, its std to first order), None if mean_b is 0.

  The relative variances add: (s_r / r)^2 = (s_a / a)^2 + (s_b / b)^2.
  """
  a, b = numerator['mean'], denominator['mean']
  if not b:
    return None
  relative = np.hypot(numerator['std'] / a if a else 0.0,
                      denominator['std'] / b)
  return a / b, abs(a / b) * float(relative)


def table(summary: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown: one row per (mode, split), `COLUMNS` in percent as mean ±
  std (min); then each mode's mIoU as a fraction of full supervision's."""
  cell = lambda v: (f'{100 * v["mean"]:.2f} ± {100 * v["std"]:.2f} '
                    f'({100 * v["min"]:.2f})')
  lines = ['| mode | seeds | split | ' + ' | '.join(COLUMNS) + ' |',
           '|---|---|---|' + '---|' * len(COLUMNS)]
  for mode, entry in summary.items():
    seeds = ','.join(str(s) for s in entry['seeds'])
    for split in SPLITS:
      values = entry['aggregate'][split]
      lines.append(f'| {mode} | {seeds} | {split} | ' + ' | '.join(
          cell(values[c]) for c in COLUMNS) + ' |')
  if 'full' in summary:
    lines += ['', '| mode | ' + ' | '.join(
        f'{s} mIoU / full' for s in SPLITS) + ' |',
              '|---|' + '---|' * len(SPLITS)]
    full = summary['full']['aggregate']
    for mode, entry in summary.items():
      ratios = [ratio(entry['aggregate'][s]['mIoU'], full[s]['mIoU'])
                for s in SPLITS]
      lines.append(f'| {mode} | ' + ' | '.join(
          'n/a' if r is None else f'{r[0]:.3f} ± {r[1]:.3f}'
          for r in ratios) + ' |')
  return '\n'.join(lines) + '\n'


def plot(summary: Mapping[str, Mapping[str, Any]], path: epath.Path) -> None:
  """Final validation mIoU and PointM per mode (the mean with a ± std bar,
  and each seed's dot beside it); with mid-run evaluations, the curves
  (mean ± std)."""
  has_curves = any(len(run['validation_curve']) > 1
                   for entry in summary.values() for run in entry['runs'])
  rows = 2 if has_curves else 1
  figure, axes = plt.subplots(rows, 2, figsize=(10, 4 * rows), squeeze=False)
  modes = list(summary)
  for metric, ax in zip(('mIoU', 'PointM'), axes[0]):
    for i, mode in enumerate(modes):
      stats = summary[mode]['aggregate']['validation'][metric]
      mean = 100 * stats['mean']
      ax.errorbar(i, mean, yerr=100 * stats['std'], fmt='o', capsize=8,
                  markersize=9, color=f'C{i}')
      ax.annotate(f'{mean:.1f}', (i, mean), xytext=(-12, 0),
                  textcoords='offset points', ha='right', va='center')
      seeds = [100 * run['results']['validation'][metric]
               for run in summary[mode]['runs']]
      ax.plot([i + 0.15] * len(seeds), seeds, 'k.', markersize=7)
    ax.set_xticks(range(len(modes)), modes)
    ax.set_xlim(-0.6, len(modes) - 0.4)
    ax.set_ylabel(f'validation {metric} (%)')
    ax.set_title(f'final {metric}: mean ± std; dots: seeds')
    ax.grid(alpha=0.3, axis='y')
  if has_curves:
    for metric, ax in zip(('mIoU', 'PointM'), axes[1]):
      for i, (mode, entry) in enumerate(summary.items()):
        curves = [run['validation_curve'] for run in entry['runs']]
        length = min(len(c) for c in curves)
        steps = [c['step'] for c in curves[0][:length]]
        values = 100 * np.array([[c[metric] for c in curve[:length]]
                                 for curve in curves])
        mean = values.mean(0)
        std = values.std(0, ddof=min(1, len(curves) - 1))
        ax.plot(steps, mean, marker='o', color=f'C{i}', label=mode)
        ax.fill_between(steps, mean - std, mean + std, color=f'C{i}',
                        alpha=0.2)
      ax.set_xlabel('step')
      ax.set_ylabel(f'validation {metric} (%)')
      ax.grid(alpha=0.3)
      ax.legend()
  _save(figure, path)


def _save(figure, path: epath.Path) -> None:
  """Writes `figure` as a PNG to `path` (epath: local or gs://) and closes it."""
  figure.tight_layout()
  with path.open('wb') as f:
    figure.savefig(f, format='png', dpi=100)
  plt.close(figure)


def mask_fraction_points(summary: Mapping[str, Mapping[str, Any]]
                         ) -> dict[str, list[tuple[float, dict[str, float]]]]:
  """{rest: [(mask %, validation mIoU spread)]} of the mixed modes without
  teacher or noise on the clicks, sorted; 'click' is the clicks' 0 % and
  'full' every curve's 100 %; the masks alone ('none') are their own
  series."""
  points = {}
  for mode, entry in summary.items():
    mixed = MIXED_MODE.fullmatch(mode)
    if mixed and not (mixed[3] or mixed[4]):
      points.setdefault(mixed[2], []).append(
          (float(mixed[1]), entry['aggregate']['validation']['mIoU']))
  for rest, anchors in (('clicks', {'click': 0.0, 'full': 100.0}),
                        ('text', {'full': 100.0}), ('none', {'full': 100.0})):
    if rest in points:
      points[rest] += [(share, summary[mode]['aggregate']['validation'][
          'mIoU']) for mode, share in anchors.items() if mode in summary]
  return {rest: sorted(p, key=lambda point: point[0])
          for rest, p in points.items()}


def mask_fraction_plot(summary: Mapping[str, Mapping[str, Any]],
                       path: epath.Path) -> bool:
  """Validation mIoU (mean ± std) against the percentage of referents with
  masks, the rest labelled by clicks, by text only (the teacher) or by
  nothing; False (nothing written) without mixed modes."""
  points = mask_fraction_points(summary)
  if not points:
    return False
  figure, ax = plt.subplots(figsize=(7, 4.5))
  labels = {'clicks': 'rest: clicks', 'text': 'rest: text only (teacher)',
            'none': 'masks alone'}
  for i, (rest, series) in enumerate(points.items()):
    shares = [share for share, _ in series]
    means = [100 * stats['mean'] for _, stats in series]
    ax.errorbar(shares, means, yerr=[100 * stats['std'] for _, stats in series],
                marker='o', capsize=5, color=f'C{i}', label=labels[rest])
    for share, mean in zip(shares, means):
      ax.annotate(f'{mean:.1f}', (share, mean), xytext=(4, -12),
                  textcoords='offset points', fontsize=8, color=f'C{i}')
  ax.set_xscale('symlog', linthresh=1.0)
  ax.margins(x=0.1)  # Room for the labels of the outermost points.
  ticks = sorted({share for series in points.values() for share, _ in series})
  ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
  ax.set_xlabel('referents with masks (%)')
  ax.set_ylabel('validation mIoU (%)')
  ax.set_title('mixed supervision: mean ± std over seeds')
  ax.grid(alpha=0.3)
  ax.legend()
  _save(figure, path)
  return True


def train_once(config: ml_collections.ConfigDict, workdir: epath.Path
               ) -> dict[str, Any]:
  """Trains one mode and seed unless done before; its results and wall time.
  """
  wall_file = workdir / 'wall_s.json'
  if not wall_file.exists():  # Not trained to the end by an earlier run.
    start = time.perf_counter()
    train.train_and_evaluate(config, str(workdir))
    if not (workdir / 'results.json').exists():
      raise RuntimeError(f'{workdir} stopped before its last step '
                         '(preempted?); run the benchmark again to resume.')
    wall_file.write_text(json.dumps(round(time.perf_counter() - start, 1)))
  results = json.loads((workdir / 'results.json').read_text())
  history = json.loads((workdir / 'eval_history.json').read_text())
  return {
      'seed': config.seed,
      # Wall time of the invocation that trained it (data build, compile,
      # training and evaluations; resumed parts not included).
      'wall_s': json.loads(wall_file.read_text()),
      'results': {s: results[s] for s in SPLITS},
      'provenance': results['provenance'],
      'validation_curve': validation_curve(history),
  }


def run(modes: Sequence[str], workdir: str, arg: str = '',
        data_dir: str | None = None, total_steps: int | None = None,
        eval_every: int = 0, click_noise: float = 0.05,
        seeds: Sequence[int] = (0, 1, 2)) -> dict[str, dict[str, Any]]:
  """Trains every mode over `seeds` (unless already trained) and writes the
  reports.

  Returns:
    The summary written to `supervision.json`.
  """
  if not seeds:
    raise ValueError('--seeds is empty; give at least one seed.')
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  summary = {}
  for mode in modes:
    runs = []
    for seed in seeds:
      config = mode_config(mode, arg, data_dir, total_steps, eval_every,
                           click_noise, seed)
      runs.append(train_once(config, root / mode / f'seed{seed}'))
      logging.info('%s seed %d done in %.0f s.', mode, seed,
                   runs[-1]['wall_s'])
    summary[mode] = {
        'task': config.task,
        'click_noise': config.data.click_noise,
        'model': config.model.to_dict(), 'data': config.data.name,
        'total_steps': config.total_steps, 'batch_size': config.batch_size,
        'seeds': list(seeds),
        'aggregate': aggregate([r['results'] for r in runs]),
        'runs': runs,
    }
  (root / 'supervision.json').write_text(json.dumps(summary, indent=2))
  (root / 'supervision.md').write_text(table(summary))
  plot(summary, root / 'supervision.png')
  mask_fraction_plot(summary, root / 'mask_fractions.png')
  return summary


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  summary = run(args.modes, args.workdir, args.config, args.data_dir,
                args.total_steps, args.eval_every, args.click_noise,
                [int(seed) for seed in args.seeds])
  print(table(summary))


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so),
  # so that importing this module defines no flag.
  flags.DEFINE_string('workdir', None, 'Output directory.', required=True)
  flags.DEFINE_list('modes', list(MODES),
                    f"Of {list(MODES)} and 'mixed_<mask %>_<clicks|text|"
                    "none>[_teacher][_noise]' (configs/mixed.py).")
  flags.DEFINE_string(
      'config', '', "Variant argument of every mode's config, e.g. "
      "'data=ref_shapes_tiny'.")
  flags.DEFINE_string('data_dir', None, 'TFDS data dir.')
  flags.DEFINE_integer('total_steps', None,
                       "Train steps; None = the config's.")
  flags.DEFINE_integer(
      'eval_every', 0, 'Validation every this many steps (the curve); 0 = '
      'at the end only, as the default configs.')
  flags.DEFINE_list('seeds', ['0', '1', '2'],
                    'Seeds to train each mode with (config.seed).')
  flags.DEFINE_float(
      'click_noise', 0.05, 'click_noise and mixed_*_noise modes: click '
      'shift std / box size.')
  app.run(main)
