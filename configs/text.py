r"""Shatter and Gather: text supervision only (image-expression pairs).

    python -m refseg_jax.main --config=configs/text.py --workdir=/tmp/text

The model shatters the image into entity slots and gathers the slots the
expression refers to; the contrastive cycle-consistency (C^3) loss over the
images of the batch and a slot reconstruction loss train it
(`refseg_jax.models.sag`, `refseg_jax.losses.text_supervision_loss`). No
batch holds a mask, box or click.

Default (`data=ref_shapes,model=tiny`): the built-in 128 px benchmark with
a tiny ViT (patch 8) + BERT trained from scratch, 16 slots (8 Gaussians x
2), 3 iterations, 2,050 steps of 32 expressions (16 images), AdamW 5e-4;
the slot decoder reconstructs patch pixels, the expression vector is the
mean of BERT's token states, and the expression gathers slots by slot
matching, leaving out slots that cover over 20 % of the image (README.md
compares these with the official ViT features, [CLS] and fusion layer).
Measured on a 2-core CPU: validation mIoU 30.6, PointM 41.4 (0.43 of
`configs/full.py`), in 972 s with a validation every 325 steps
(`python -m refseg_jax.benchmarks.supervision`, text mode).

Variants, big_vision style, after a colon:

    --config=configs/text.py:data=ref_shapes_tiny   # 64 px smoke test
    --config=configs/text.py:model=paper            # ViT-S/16 @384, BERT-base,
        # 18 x 2 slots, AdamW 1e-5 (ViT 0.1x), grad-clip 0.1, loss warm-up 5k
    --config=configs/text.py:data=refcoco_unc,model=paper  # RefCOCO (UNC),
        # eval val/testA/testB; also refcoco_google, refcocoplus_unc,
        # refcocog_umd, refcocog_google. Build it and set
        # --config.data.tokenizer first (docs/refcoco.md).

`python -m refseg_jax.benchmarks.slot_oracle --config=configs/text.py
--workdir=/tmp/text` then scores the best single slot of each expression
against the model's masks: what the slots lose, what the gathering loses.

`--config.loss.mask_same_image=False` counts other copies of an
expression's own image as negatives, as the official code does.
"""

from refseg_jax import config_lib


def get_config(arg=None):
  """The config of `arg`'s variant (see module doc)."""
  return config_lib.sag_config(arg)
