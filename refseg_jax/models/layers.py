"""Layer factories shared by the models: float32 params, `dtype` compute.

Every model keeps its parameters in float32 and computes in a `dtype` of
its choice (e.g. bfloat16); these build the Flax layers that way, so that
each model only states what is its own (initialisers, epsilon, padding).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


def dense(features: int, dtype: Dtype, name: str, **kwargs: Any) -> nn.Dense:
  """`nn.Dense` with float32 params computing in `dtype`.

  Args:
    features: Output width.
    dtype: Computation dtype.
    name: Module (and parameter scope) name.
    **kwargs: Further `nn.Dense` arguments (e.g. `kernel_init`).
  """
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  **kwargs)


def layer_norm(dtype: Dtype, name: str, **kwargs: Any) -> nn.LayerNorm:
  """`nn.LayerNorm` with float32 params computing in `dtype`.

  Args:
    dtype: Computation dtype.
    name: Module (and parameter scope) name.
    **kwargs: Further `nn.LayerNorm` arguments (e.g. `epsilon`).
  """
  return nn.LayerNorm(dtype=dtype, param_dtype=jnp.float32, name=name,
                      **kwargs)


def conv(features: int, kernel: int, dtype: Dtype, name: str,
         **kwargs: Any) -> nn.Conv:
  """Square `nn.Conv` with float32 params computing in `dtype`.

  Args:
    features: Output channels.
    kernel: Side of the square kernel.
    dtype: Computation dtype.
    name: Module (and parameter scope) name.
    **kwargs: Further `nn.Conv` arguments (`strides`, `padding`, which is
      'SAME' unless given, initialisers, ...).
  """
  return nn.Conv(features, (kernel, kernel), dtype=dtype,
                 param_dtype=jnp.float32, name=name, **kwargs)
