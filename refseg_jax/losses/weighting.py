"""Combining loss terms: warm-up ramps and the weighted total."""

from __future__ import annotations

from typing import Mapping, Optional

import jax
import jax.numpy as jnp


def linear_warmup(step: jax.Array, warmup_steps: int) -> jax.Array:
  """min(step / warmup_steps, 1); 1 throughout when warmup_steps is 0."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def weighted_sum(terms: Mapping[str, jax.Array],
                 weights: Mapping[str, float],
                 scales: Optional[Mapping[str, jax.Array]] = None
                 ) -> jax.Array:
  """Sum over `terms` of weights[k] * scales.get(k, 1) * terms[k].

  Summed in the order of `terms`; without `scales` each summand is
  weights[k] * terms[k] exactly (no multiplication by 1).

  Args:
    terms: {name: scalar loss}.
    weights: A weight for every name in `terms` (KeyError otherwise).
    scales: Optional extra factors (e.g. warm-up ramps) for some terms.

  Returns:
    The weighted total.
  """
  if scales is None:
    return sum(weights[k] * v for k, v in terms.items())
  return sum(weights[k] * scales.get(k, 1.0) * v for k, v in terms.items())
