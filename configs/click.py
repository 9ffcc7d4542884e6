r"""PKS with click supervision: a centre and two corner clicks, no mask.

    python -m refseg_jax.main --config=configs/click.py --workdir=/tmp/click

The position branch learns from the clicks as under full supervision; the
mask head from BoxInst's projection and colour-affinity pairwise losses on
the box the corner clicks span, and the centre click as a positive point
(`refseg_jax.losses.click_supervision_loss`). No batch holds a mask.

Default (`data=ref_shapes,model=tiny`): the built-in 128 px benchmark with a
tiny ResNet + BERT, 2,050 steps of 32 expressions (16 images), exact clicks;
the mask losses reach the shared trunk at a tenth of their gradient.
Measured on a 2-core CPU (dataset built): 572 s with a validation every 325
steps, validation mIoU 68.3 (0.95 of `configs/full.py`), PointM 81.2;
with `--config.data.click_noise=0.05`, 51.1.

Variants, big_vision style, after a colon:

    --config=configs/click.py:data=ref_shapes_tiny   # 64 px smoke test
    --config=configs/click.py:model=r101             # paper scale: ResNet-101
                                                     # + BERT-base, bf16,
                                                     # pairwise warm-up 10k
    --config=configs/click.py:data=refcoco_unc       # RefCOCO (UNC), 480 px,
        # eval val/testA/testB; also refcoco_google, refcocoplus_unc,
        # refcocog_umd, refcocog_google. Build it and set
        # --config.data.tokenizer first (docs/refcoco.md).

Annotator noise on the clicks (a fraction of the box size):
`--config.data.click_noise=0.05`. `python -m refseg_jax.benchmarks.supervision`
compares this config with `configs/full.py`.
"""

from refseg_jax import config_lib


def get_config(arg=None):
  """The config of `arg`'s variant (see module doc)."""
  return config_lib.pks_config('click', arg)
