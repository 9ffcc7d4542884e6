r"""PKS under mixed supervision: a few masks, many clicks, the rest text only.

    python -m refseg_jax.main --config=configs/mixed.py --workdir=/tmp/mixed

Each referent is labelled with its mask, its clicks, or nothing beyond its
sentences, drawn once from a hash of its id (`config.data.supervision`),
so it keeps its labels across epochs, hosts and restarts; each example gets
the losses its labels allow (`refseg_jax.tasks.pks_mixed`), and text-only
examples learn from the pseudo-labels of the params' moving average.

Default (`masks=10,rest=clicks`): 10 % of the referents with masks, 90 %
with clicks, on the built-in 128 px `ref_shapes` with the tiny PKS, the
full default's budget (2,400 steps of 32 expressions), a quarter of each
batch's images drawn from the masked referents alone
(`data.oversample_masked`), the clicked examples' losses as in
`configs/click.py`. Measured on a 2-core CPU (2026-12-06), mean ± std over
seeds 0, 1, 2: validation mIoU 71.26 ± 0.34 (71.13, 71.65, 71.00), 0.984 ±
0.005 of full supervision's 72.39, PointM 83.17 ± 0.45; with 1 % masks
68.22 ± 2.18 (docs/results.md, "Mixed supervision").

Arguments, big_vision style, after a colon:

    --config=configs/mixed.py:masks=1               # 1 % masks, 99 % clicks
    --config=configs/mixed.py:masks=10,rest=text    # 90 % text only, with
                                                    # the teacher
    --config=configs/mixed.py:masks=10,rest=none    # the 10 % masks alone
                                                    # (text-only examples
                                                    # add no loss)
    --config=configs/mixed.py:masks=0,click_teacher=1  # clicks only, and
        # the teacher's masks for them (BoxTeacher style)
    --config=configs/mixed.py:data=...,model=...    # as configs/full.py

`masks` is any percentage in [0, 100]. The fractions can also be set
directly: `--config.data.supervision.mask=0.05
--config.data.supervision.clicks=0.95`. Click noise on the clicked
referents: `--config.data.click_noise=0.05`, `--config.data.click_miss`.
"""

from refseg_jax import config_lib

common = config_lib.import_sibling(__file__, 'common')

# What labels the referents without a mask: clicks, nothing with the
# teacher's pseudo-labels, or nothing at all.
REST = ('clicks', 'text', 'none')
# tests/test_configs.py builds every one; data and model are the PKS
# variants of configs/full.py and click.py (any of them works here too).
VARIANTS = dict(masks=('10', '1'), rest=REST, click_teacher=('0', '1'))


def get_config(arg=None):
  """The config of `arg`'s variant (see module doc)."""
  config, args = common.pks_training(arg, task='pks_mixed', masks='10',
                                     rest='clicks', click_teacher='0')
  masks = float(args.masks) / 100
  if (not 0.0 <= masks <= 1.0 or args.rest not in REST
      or args.click_teacher not in ('0', '1')):
    raise ValueError(f'configs/mixed.py: masks={args.masks} must be a '
                     f'percentage in [0, 100], rest={args.rest!r} one of '
                     f'{REST} and click_teacher={args.click_teacher!r} 0 or '
                     '1.')
  teacher = args.rest == 'text' or args.click_teacher == '1'
  rest = 'clicks' if args.rest == 'clicks' else 'text'
  config.data.supervision = dict(mask=0.0, clicks=0.0, text=0.0)
  config.data.supervision[rest] = 1.0 - masks
  config.data.supervision.mask = masks
  # The share of examples (images, when grouped) drawn from the masked
  # referents alone (`pipeline.train_dataset`), on top of their share of
  # the rest: a few masks then teach in every batch.
  config.data.oversample_masked = 0.25 if masks else 0.0
  # The weak mask losses' gradient into the trunk is mostly noise when
  # clicks dominate (configs/click.py); masks and pseudo-masks are not.
  config.model.mask_trunk_gradient = 0.1 if rest == 'clicks' else 1.0
  # Clicked examples learn as under configs/click.py (its settings for
  # ref_shapes, `common.click_loss`); text-only ones kept CondInst's init.
  config.model.kernel_init_std = (common.click_kernel_init_std(args.model)
                                  if rest == 'clicks' else 0.01)
  # The teacher (text-only examples' pseudo-labels, clicked examples'
  # masks) is the params' moving average, which evaluation then uses too.
  config.ema_decay = 0.999 if teacher else 0.0
  config.loss = dict(
      # The click task's terms and settings, and the full task's mask terms.
      **common.click_loss(args.model), dice=1.0, bce=1.0,
      # Each kind's terms are means over its own examples, times the kind's
      # share of the batch and these weights.
      kind_weights=dict(mask=1.0, clicks=1.0,
                        pseudo=1.0 if args.rest == 'text' else 0.0,
                        click_teacher=float(args.click_teacher)),
      # The teacher from this fraction of the run on; text-only examples
      # get pseudo-labels where its heatmap peaks at this probability or
      # more.
      pseudo_start=0.25, pseudo_threshold=0.5)
  config.lock()
  return config
