r"""Shatter or gather: where a Shatter and Gather checkpoint loses its score.

    python -m refseg_jax.benchmarks.slot_oracle --config=configs/text.py \
        --workdir=/tmp/text [--split=validation]

scores the workdir's latest checkpoint on a split twice: the model's own
masks (A_fuse . A_slot, as the trainer's evaluation scores them), and an
oracle that, for each expression, takes the best single slot of the
expression's image (`oracle_mIoU`: the slot mask with the highest IoU;
`oracle_PointM`: a hit when any slot mask peaks on the referent). The
oracle's distance from 100 is what shattering (and the patch grid) loses;
the gap between the model and the oracle is what gathering loses. On
`ref_shapes`, the rows are also split by expression kind (attribute only,
absolute location, relation to a landmark). Writes
`WORKDIR/slot_oracle_<split>.json` and prints the table (percent).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from refseg_jax import checkpointing
from refseg_jax import results
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train_state
from refseg_jax.data import pipeline
from refseg_jax.data.ref_shapes import language as shapes_language
from refseg_jax.evaluation import evaluator
from refseg_jax.evaluation import metrics as res_metrics
from refseg_jax.models import pks
from refseg_jax.models import sag
from refseg_jax.tasks import sag_text

COLUMNS = ('mIoU', 'PointM', 'oracle_mIoU', 'oracle_PointM')


def expression_scores(response: jax.Array, batch: Mapping[str, jax.Array]
                      ) -> tuple[jax.Array, jax.Array]:
  """Per-expression (IoU [B], point hit [B]) of canvas responses [B, S, S]."""
  maps, region = res_metrics.resize_to_original(
      response, batch['content_size'], batch['orig_size'],
      batch['eval_mask'].shape[-1])
  stats = res_metrics.expression_stats(maps, batch['eval_mask'], region, 0.0)
  return stats['iou'], stats['point_hit']


def best_slot_scores(slot_masks: jax.Array, batch: Mapping[str, jax.Array]
                     ) -> tuple[jax.Array, jax.Array]:
  """The oracle's (IoU [T], point hit [T]) from slot masks [T, K, h, w].

  Each slot mask is scored as the model's mask would be if A_fuse put all
  its weight on that slot (`sag.response_map`); the oracle keeps the best
  IoU and any hit.
  """
  num_texts, num_slots = slot_masks.shape[:2]
  size = batch['image'].shape[1]
  repeated = {k: jnp.repeat(batch[k], num_slots, axis=0)
              for k in ('content_size', 'orig_size', 'eval_mask')}
  response = sag.response_map(
      slot_masks.reshape(num_texts * num_slots, *slot_masks.shape[2:]), size,
      repeated['content_size'])
  iou, hit = expression_scores(response, repeated)
  return (iou.reshape(num_texts, num_slots).max(1),
          hit.reshape(num_texts, num_slots).any(1))


def make_score_step(task: sag_text.SaGText, mesh: jax.sharding.Mesh,
                    variable_shardings: Any):
  """The jitted `(variables, batch) -> {name: [B]}` of the model's and the
  oracle's per-expression scores (slots drawn with the evaluation's key)."""
  capture = lambda module, _: module.name == 'entities'

  def step_fn(variables, batch):
    outputs, state_ = task.model.apply(
        variables, batch['image'], batch['text_tokens'],
        batch['text_mask'], train=False,
        rngs=task.eval_rngs(), capture_intermediates=capture,
        mutable=['intermediates'])
    _, slot_attention = state_['intermediates']['entities']['__call__'][0]
    grid_h, grid_w = outputs['mask'].shape[1:]
    num_texts, num_images = (batch['text_tokens'].shape[0],
                             batch['image'].shape[0])
    image_of = jnp.arange(num_texts) // pks.group_size(num_images, num_texts)
    slot_masks = slot_attention[image_of].reshape(
        num_texts, -1, grid_h, grid_w)
    iou, hit = expression_scores(
        task.response_map(outputs, batch['image'].shape[1],
                          batch['content_size']), batch)
    oracle_iou, oracle_hit = best_slot_scores(slot_masks, batch)
    return {'mIoU': iou, 'PointM': hit, 'oracle_mIoU': oracle_iou,
            'oracle_PointM': oracle_hit}

  batch_sharding = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(step_fn, in_shardings=(variable_shardings, batch_sharding),
                 out_shardings=replicated)


def expression_kind(sentence: str, dataset: str) -> str | None:
  """'attribute' / 'location' / 'relation' on ref_shapes, else None."""
  if not dataset.startswith('ref_shapes'):
    return None
  return shapes_language.parse(sentence).kind


def summarise(scores: Mapping[str, np.ndarray], kinds: Sequence[str | None]
              ) -> dict[str, dict[str, float]]:
  """{row: {'count', column: mean}}: 'all', then each expression kind."""
  kinds = np.asarray(kinds, dtype=object)
  rows = {'all': np.ones(len(kinds), bool)}
  rows.update({k: kinds == k for k in sorted(set(kinds) - {None})})
  return {row: {'count': int(keep.sum()),
                **{c: float(np.mean(scores[c][keep])) for c in COLUMNS}}
          for row, keep in rows.items()}


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             split: str = 'validation') -> dict[str, dict[str, float]]:
  """Scores `workdir`'s latest checkpoint on `split` (see module doc)."""
  if config.task != 'sag_text':
    raise ValueError(f'The slot oracle needs a Shatter and Gather task '
                     f"(config.task='sag_text'), not {config.task!r}.")
  if jax.process_count() > 1:
    raise ValueError('The slot oracle runs on one host.')
  mesh = sharding.make_mesh(config.mesh)
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  task = tasks.build(config, tokenizer.vocab_size)
  shapes, state_shardings = train_state.shapes_and_shardings(config, task,
                                                             mesh)
  variables, _, step = checkpointing.restore_variables(
      epath.Path(workdir), 'latest', shapes, state_shardings)
  score_step = make_score_step(task, mesh, state_shardings.eval_variables())
  batch_sharding = sharding.batch_sharding(mesh)
  num_batches = pipeline.num_eval_batches(config.data, split,
                                          config.eval.batch_size)
  columns = {c: [] for c in COLUMNS}
  kinds = []
  for batch in pipeline.eval_dataset(config.data, split,
                                     config.eval.batch_size,
                                     num_batches).as_numpy_iterator():
    scores = score_step(variables, sharding.global_batch(
        evaluator.device_fields(batch), batch_sharding))
    valid = batch['valid'].astype(bool)
    for c in COLUMNS:
      columns[c].append(np.asarray(scores[c], np.float64)[valid])
    kinds += [expression_kind(s.decode(), config.data.name)
              for s in batch['sentence'][valid]]
  summary = summarise({c: np.concatenate(v) for c, v in columns.items()},
                      kinds)
  (epath.Path(workdir) / f'slot_oracle_{split}.json').write_text(
      json.dumps({'step': step, 'split': split, 'rows': summary}, indent=2))
  return summary


def table(summary: Mapping[str, Mapping[str, float]]) -> str:
  """A markdown table of `summarise`'s rows, in percent."""
  return results.percent_table(summary, COLUMNS, ('expressions', 'count'),
                               'count', digits=1)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(table(evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                       flags.FLAGS.split)))


if __name__ == '__main__':
  # Defined only when run as a program, so that modules importing this one
  # (tests, next to the supervision benchmark) keep these flag names free.
  config_flags.DEFINE_config_file(
      'config', None, 'The config the workdir was trained with (FILE:ARG).',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'A trained SaG workdir.')
  flags.DEFINE_string('split', 'validation', 'Eval split to score.')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
