"""Layer factories shared by the models: float32 params, `dtype` compute.

Every model keeps its parameters in float32 and computes in a `dtype` of
its choice (e.g. bfloat16); these build the Flax layers that way, so that
each model only states what is its own (initialisers, epsilon, padding).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
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


# Rematerialisation policies by name (`config.model.remat`): 'none' keeps
# every activation for the backward pass; the others wrap each repeated
# block in `nn.remat` and keep only what the `jax.checkpoint_policies` of
# that name saves ('nothing_saveable': only the block's inputs, the least
# memory, recomputing the whole block; 'dots_saveable' also its matmul
# outputs, less recomputation).
REMAT_POLICIES = ('none', 'nothing_saveable', 'dots_saveable',
                  'dots_with_no_batch_dims_saveable')


def remat(module_class: type[nn.Module], policy: str,
          static_argnums: Sequence[int] = ()) -> type[nn.Module]:
  """`module_class`, rematerialised under the named `policy` (one of
  `REMAT_POLICIES`; 'none' returns it unchanged). Parameters keep their
  names and shapes either way. `static_argnums` index `__call__`'s
  arguments with `self` as 0 (e.g. (2,) for `train` in (self, x, train)).
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {policy!r}; known: '
                     f'{REMAT_POLICIES}.')
  if policy == 'none':
    return module_class
  return nn.remat(module_class,
                  policy=getattr(jax.checkpoint_policies, policy),
                  static_argnums=tuple(static_argnums))
