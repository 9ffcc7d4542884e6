"""Layer factories shared by the models: float32 params, `dtype` compute.

Every model keeps its parameters in float32 and computes in a `dtype` of
its choice (e.g. bfloat16); these build the Flax layers that way, so that
each model only states what is its own (initialisers, epsilon, padding).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def stack_blocks(block: type[nn.Module], fields: Mapping[str, Any],
                 x: jax.Array, shared: Sequence[Any] = (),
                 per_layer: Sequence[np.ndarray] = (), *, depth: int,
                 name: str, remat_policy: str, scan: bool,
                 static_argnums: Sequence[int] = (),
                 first_index: int = 0) -> jax.Array:
  """Applies `depth` blocks in sequence: x <- block_i(x, *shared, *args_i).

  Call it from a compact method: the blocks are submodules of the caller.

  Unrolled (`scan=False`), block i is the submodule `{name}_{i}` (i from
  `first_index`, e.g. 1 where block 0 of a ResNet stage differs) and gets
  `float(a[i])` for each [depth] array `a` of `per_layer` (e.g. its
  stochastic-depth rate). Scanned (`scan=True`), one `nn.scan` runs the
  blocks: the submodule `name` holds every block's parameters stacked on a
  leading [depth] axis (`refseg_jax.models.convert` stacks unrolled
  checkpoints into it) and `per_layer` is scanned over. The scan compiles
  one block instead of `depth`, and it is where XLA honours the
  rematerialisation of each block (`remat_policy`, see `remat`): on
  XLA:CPU, remat in an unrolled loop was scheduled away
  (docs/training.md). The two compute the same function; random draws
  (initialisation, dropout) differ.

  Args:
    block: The block's module class.
    fields: Its constructor's arguments (the same for every block).
    x: The input, carried from block to block.
    shared: Arguments every block gets after `x`, static ones included.
    per_layer: [depth] arrays, one value of each per block, after `shared`.
    depth: Number of blocks.
    name: The blocks' submodule name (prefix when unrolled).
    remat_policy: One of `REMAT_POLICIES`.
    scan: Scan over the blocks (stacked parameters) or unroll them.
    static_argnums: As `remat`'s, over (self, x, *shared, *per_layer).
    first_index: The unrolled blocks' first number.
  """
  block = remat(block, remat_policy, static_argnums)
  if not scan or depth == 0:
    for i in range(depth):
      x = block(**fields, name=f'{name}_{first_index + i}')(
          x, *shared, *(float(a[i]) for a in per_layer))
    return x

  def step(module, carry, layer_args):
    return module(carry, *shared, *layer_args), None

  scanned = nn.scan(step, variable_axes={'params': 0, 'batch_stats': 0,
                                         'intermediates': 0},
                    split_rngs={'params': True, 'dropout': True},
                    length=depth)
  x, _ = scanned(block(**fields, name=name), x,
                 tuple(jnp.asarray(a, jnp.float32) for a in per_layer))
  return x
