r"""PKS with click supervision: a centre and two corner clicks, no mask.

    python -m refseg_jax.main --config=configs/click.py --workdir=/tmp/click

The position branch learns from the clicks as under full supervision; the
mask head from BoxInst's projection and colour-affinity pairwise losses on
the box the corner clicks span, and the centre click as a positive point
(`refseg_jax.losses.click_supervision_loss`). No batch holds a mask.

Default (`data=ref_shapes,model=tiny`): the built-in 128 px benchmark with a
tiny ResNet + BERT, 1,300 steps of batch 32, exact clicks. Measured on a
2-core CPU: EXPECTED_TIME_AND_RESULT.

Variants, big_vision style, after a colon:

    --config=configs/click.py:data=ref_shapes_tiny   # 64 px smoke test
    --config=configs/click.py:model=r101             # paper scale: ResNet-101
                                                     # + BERT-base, bf16,
                                                     # pairwise warm-up 10k

Annotator noise on the clicks (a fraction of the box size):
`--config.data.click_noise=0.05`. `python -m refseg_jax.benchmarks.supervision`
compares this config with `configs/full.py`.
"""

from refseg_jax import config_lib


def get_config(arg=None):
  """The config of `arg`'s variant (see module doc)."""
  return config_lib.pks_config('click', arg)
