r"""PKS with full (mask) supervision.

    python -m refseg_jax.main --config=configs/full.py --workdir=/tmp/full

Default (`data=ref_shapes,model=tiny`): the built-in 128 px benchmark with a
tiny ResNet + BERT, 2,400 steps of 32 expressions (16 images, 2 expressions
each), final evaluation on validation. Measured on a 2-core CPU
(2026-12-03), mean ± std over seeds 0, 1, 2: validation mIoU 72.39 ± 1.78
(74.19, 72.37, 70.63), PointM 83.70 ± 2.02; 9 min 9 s to 9 min 39 s a run
with the dataset built (docs/results.md has every figure and its command).

Variants, big_vision style, after a colon:

    --config=configs/full.py:data=ref_shapes_tiny    # 64 px smoke test
    --config=configs/full.py:model=r101              # paper scale: ResNet-101
                                                     # + BERT-base, bf16
    --config=configs/full.py:data=refcoco_unc        # RefCOCO (UNC), 480 px,
        # eval val/testA/testB; also refcoco_google, refcocoplus_unc,
        # refcocog_umd, refcocog_google. Build it and set
        # --config.data.tokenizer first (docs/refcoco.md).

and any entry can be overridden: `--config.total_steps=500`. Shared values
(data variants, optimiser, mesh, evaluation, the PKS model variants) are in
`configs/common.py`.
"""

from refseg_jax import config_lib

common = config_lib.import_sibling(__file__, 'common')

VARIANTS = common.PKS_VARIANTS  # tests/test_configs.py builds every one.


def get_config(arg=None):
  """The config of `arg`'s variant (see module doc)."""
  config, _ = common.pks_training(arg, task='pks_full')
  # Loss weights and the heatmap target's standard deviation (cells).
  config.loss = dict(heatmap=1.0, box=5.0, dice=1.0, bce=1.0,
                     heatmap_sigma=1.0)
  config.lock()
  return config
