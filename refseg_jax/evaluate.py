r"""Evaluates one checkpoint of a trained workdir.

    python -m refseg_jax.evaluate --workdir=/tmp/refseg_full \
        [--checkpoint=best|latest|STEP] [--splits=validation,test] \
        [--output=FILE.json]

restores the checkpoint with the config the run saved (`refseg_jax.trained`)
and scores the named splits as training does (`evaluation.Evaluator`: the
same metrics at the original resolution), by default every split of the
dataset but 'train' (ref_shapes: validation, test, test_novel; RefCOCO: val,
testA, testB or test). Prints a table (percent) and writes
`{split: {metric: value}, "step", "checkpoint", "provenance"}` (the layout
of `results.json`) to `--output`, default `WORKDIR/evaluation.json`, with
each split's overlay picture beside it (`evaluation_<split>.png`). Runs on
several hosts like training (`--distributed`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax

from refseg_jax import results
from refseg_jax import trained as trained_lib
from refseg_jax import visualize
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator as evaluator_lib
from refseg_jax.evaluation import metrics

COLUMNS = ('mIoU', 'oIoU', *metrics.PREC_KEYS, 'PointM')


def check_splits(requested: Sequence[str], available: Sequence[str]) -> None:
  """Raises a ValueError naming the unknown splits and listing the known."""
  unknown = [s for s in requested if s not in available]
  if unknown:
    raise ValueError(f'Unknown split(s) {unknown}; the dataset has '
                     f'{list(available)}.')


def report_path(workdir: str, output: str | None) -> epath.Path:
  """Where the report goes: `output`, or WORKDIR/evaluation.json."""
  return epath.Path(output or epath.Path(workdir) / 'evaluation.json')


def evaluate_workdir(workdir: str, checkpoint: str = 'best',
                     splits: Sequence[str] | None = None,
                     output: str | None = None) -> dict[str, Any]:
  """Scores a checkpoint of `workdir` on `splits` and writes the report.

  Args:
    workdir: a training (or converted) workdir.
    checkpoint: 'best', 'latest' or a step number.
    splits: the splits to score; None = every split but 'train'.
    output: the JSON report's path; None = WORKDIR/evaluation.json.

  Returns:
    {split: {metric: value}, 'step', 'checkpoint', 'provenance'}.
  """
  trained = trained_lib.load(workdir, checkpoint)
  config = trained.config
  available = pipeline.eval_splits(config.data)
  splits = list(available if not splits else splits)
  check_splits(splits, available)
  evaluator = evaluator_lib.Evaluator(config, trained.task, trained.mesh,
                                      trained.variable_shardings)
  output = report_path(workdir, output)
  if jax.process_index() == 0:
    output.parent.mkdir(parents=True, exist_ok=True)
  report = {}
  for split in splits:
    report[split], picture = evaluator.evaluate(trained.variables, split)
    logging.info('%s: %s', split, report[split])
    if picture is not None and jax.process_index() == 0:
      visualize.write_png(picture,
                          output.with_name(f'{output.stem}_{split}.png'))
  report.update(step=trained.step, checkpoint=trained.checkpoint,
                provenance=results.provenance(config))
  if jax.process_index() == 0:
    results.write_json(output, report)
  return report


def table(report: Mapping[str, Any]) -> str:
  """A markdown table of a report's splits, metrics in percent."""
  splits = {k: v for k, v in report.items()
            if isinstance(v, Mapping) and 'mIoU' in v}
  return results.percent_table(splits, COLUMNS, ('split', 'expressions'),
                               'num_expressions')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.distributed:
    jax.distributed.initialize()
  report = evaluate_workdir(FLAGS.workdir, FLAGS.checkpoint, FLAGS.splits,
                            FLAGS.output)
  if jax.process_index() == 0:
    print(f'{FLAGS.workdir}, {report["checkpoint"]} checkpoint (step '
          f'{report["step"]}):\n{table(report)}\nWritten: '
          f'{report_path(FLAGS.workdir, FLAGS.output)}')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  # Defined only when run as a program (every command does so), so that
  # importing this module defines no flag.
  flags.DEFINE_string('workdir', None, 'A trained workdir (holds config.json '
                      'and checkpoints).')
  flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
  flags.DEFINE_list('splits', None, 'Splits to score (default: all but '
                    'train).')
  flags.DEFINE_string('output', None, 'JSON report (default: '
                      'WORKDIR/evaluation.json).')
  flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                    '(several hosts).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
