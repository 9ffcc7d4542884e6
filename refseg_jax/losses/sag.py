"""Text supervision: Shatter and Gather's C^3 and reconstruction losses.

The scores and reconstructions come from `refseg_jax.models.sag` (`SaG` run
with `all_pairs=True`): texts [T] against images [I], each image the own
image of T / I consecutive expressions.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def same_image_pairs(image_ids: jax.Array, image_of: jax.Array) -> jax.Array:
  """bool [T, I]: image i shows expression t's image but is not its own
  entry (the same image twice in a batch).

  Args:
    image_ids: [I] the batch images' dataset ids.
    image_of: [T] the index of each expression's own image.
  """
  own = image_ids[image_of]
  return ((image_ids[None, :] == own[:, None])
          & (jnp.arange(image_ids.shape[0])[None, :] != image_of[:, None]))


def c3_loss(scores: jax.Array, image_of: jax.Array,
            excluded: Optional[jax.Array] = None) -> jax.Array:
  """SaG's contrastive cycle-consistency loss (InfoNCE, temperature 1).

  Args:
    scores: [T, I] s_{t,i} = stopgrad(x_t) . z_{t,i}.
    image_of: [T] index of each expression's own image, the positive.
    excluded: optional bool [T, I] pairs left out of the softmax (same-image
      pairs that are not the positive).

  Returns:
    Mean over the expressions of -log softmax_i(s_{t,i})[image_of[t]].
  """
  scores = scores.astype(jnp.float32)
  if excluded is not None:
    scores = jnp.where(excluded, -jnp.inf, scores)
  return optax.softmax_cross_entropy_with_integer_labels(
      scores, image_of).mean()


def reconstruction_loss(reconstruction: jax.Array,
                        target: jax.Array) -> jax.Array:
  """MSE of the slot decoder's output to its (detached) target: the ViT
  patch features or the patch pixels (`SaG.reconstruct`)."""
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  return jnp.mean((reconstruction.astype(jnp.float32) - target)**2)
