"""Shatter and Gather under text supervision: image-expression pairs only.

Training fuses every expression with every image of the batch and learns
C^3 (the expression's own image must win among the batch's images) plus
the slot decoder's reconstruction, the sum ramped in over `warmup_steps`.
The response is the expression's own slot mixture A_fuse . A_slot on its
image, min-max normalised minus 0.5, with the slots drawn from the fixed
evaluation key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from refseg_jax.losses import sag as sag_losses
from refseg_jax.losses import weighting
from refseg_jax.models import pks
from refseg_jax.models import sag
from refseg_jax.tasks import base


class SaGText(base.Task):
  """Shatter and Gather (`refseg_jax.models.sag`) trained on text alone."""

  supervision = 'text'
  module = sag.SaG
  # The initial slots are drawn from the 'slots' stream.
  rng_streams = ('dropout', 'slots')

  def train_inputs(self, batch: base.Batch) -> dict[str, bool]:
    del batch
    return {'all_pairs': True}  # Every expression scores every image.

  def loss(self, outputs, batch, step):
    return text_supervision_loss(outputs, batch, step, **self.config.loss)

  def response_map(self, outputs, size, content_size):
    return sag.response_map(outputs['mask'], size, content_size)


def text_supervision_loss(
    outputs: base.Outputs, batch: base.Batch, step: jax.Array, *, c3: float,
    reconstruction: float, mask_same_image: bool, warmup_steps: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SaG's loss: C^3 + reconstruction, scaled by min((step + 1) / warmup, 1).

  The official loop scales the loss of its 1-based iteration n by
  n / warmup; `step` is 0-based (the train state's step before the
  update), hence step + 1.

  Args:
    outputs: `SaG` outputs run with `all_pairs=True`.
    batch: A 'text' batch (image, tokens, image_id).
    step: The 0-based training step, for the warm-up scaling.
    c3, reconstruction: the terms' weights.
    mask_same_image: Leave other expressions' copies of an expression's
      own image out of its negatives (the official code counts them).
    warmup_steps: Steps over which the loss scale ramps from 0 to 1.

  Returns:
    (weighted, scaled total, {term: unscaled value}).
  """
  num_texts, num_images = outputs['scores'].shape
  image_of = jnp.arange(num_texts) // pks.group_size(num_images, num_texts)
  excluded = (sag_losses.same_image_pairs(batch['image_id'], image_of)
              if mask_same_image else None)
  terms = {
      'c3': sag_losses.c3_loss(outputs['scores'], image_of, excluded),
      'reconstruction': sag_losses.reconstruction_loss(
          outputs['reconstruction'], outputs['reconstruction_target']),
  }
  total = weighting.weighted_sum(
      terms, dict(c3=c3, reconstruction=reconstruction))
  return weighting.linear_warmup(step + 1, warmup_steps) * total, terms
