"""The interface every task offers: a model under one kind of supervision.

The training loop, the evaluator, the benchmarks and prediction know a task
only through `Task`: its model, built from `config.model`; its variables'
initialisation; the forward pass for training or inference; the loss
(batch, model outputs -> scalar + logged terms), whose settings are exactly
`config.loss`; the response map that evaluation and prediction threshold at
0; and the rng streams the model draws from. A new task (a model, or a new
mix of supervision) is one module with a `Task` subclass, registered in
`refseg_jax.tasks`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Batch = Mapping[str, jax.Array]
Outputs = Mapping[str, jax.Array]

# Per rng stream, what the training keys are folded from: `seed + offset`
# and the step, so that a resumed run draws the same keys.
_TRAIN_SEED_OFFSETS = {'dropout': 1, 'slots': 2}
# Evaluation draws its (non-dropout) streams from one fixed key, so that an
# evaluation is reproducible and every checkpoint is scored on one draw.
_EVAL_SEED_OFFSET = 3


class Task:
  """A model under one kind of supervision (see module doc).

  Subclasses set the class attributes and implement `train_inputs`, `loss`
  and `response_map`.

  Attributes:
    config: the whole training config.
    model: the flax module, `module(vocab_size, **config.model)`.
  """

  # The labels its training batches carry ('full', 'click' or 'text'):
  # the input pipeline gives a batch only those fields.
  supervision: ClassVar[str]
  # The flax module class; `config.model` holds exactly its fields.
  module: ClassVar[type[nn.Module]]
  # The rng streams the model draws from when training; those other than
  # 'dropout' are also drawn at initialisation and evaluation.
  rng_streams: ClassVar[tuple[str, ...]] = ('dropout',)

  def __init__(self, config: ml_collections.ConfigDict, vocab_size: int):
    self.config = config
    fields = dict(config.model)
    fields['dtype'] = jnp.dtype(fields['dtype'])
    self.model = self.module(vocab_size=vocab_size, **fields)

  # -------------------------------------------------------------- rng streams

  def _sampling_streams(self) -> tuple[str, ...]:
    return tuple(s for s in self.rng_streams if s != 'dropout')

  def train_rngs(self, step: jax.Array) -> dict[str, jax.Array]:
    """The keys of training step `step`, one per stream."""
    return {stream: jax.random.fold_in(
        jax.random.key(self.config.seed + _TRAIN_SEED_OFFSETS[stream]), step)
            for stream in self.rng_streams}

  def eval_rngs(self) -> dict[str, jax.Array]:
    """The fixed keys every evaluation and prediction draws with."""
    key = jax.random.key(self.config.seed + _EVAL_SEED_OFFSET)
    return {stream: key for stream in self._sampling_streams()}

  # ------------------------------------------------------- model and variables

  def dummy_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(image, tokens, mask) of one example at the config's shapes."""
    size, length = self.config.data.image_size, self.config.data.max_text_len
    return (jnp.zeros((1, size, size, 3), jnp.uint8),
            jnp.zeros((1, length), jnp.int32),
            jnp.ones((1, length), jnp.int32))

  def init_variables(self, rng: jax.Array) -> dict[str, Any]:
    """Freshly initialised variables ('params', maybe 'batch_stats')."""
    rngs = {'params': rng, **{s: rng for s in self._sampling_streams()}}
    return self.model.init(rngs, *self.dummy_inputs(), train=False)

  def train_inputs(self, batch: Batch) -> dict[str, jax.Array]:
    """What the training forward pass takes besides image and text."""
    raise NotImplementedError

  def forward(self, variables: Mapping[str, Any], batch: Batch, *,
              train: bool, rngs: Mapping[str, jax.Array],
              mutable: Any = False) -> Any:
    """The model on a batch: training (`train_inputs` added) or inference.

    Returns the outputs, or (outputs, updated collections) when `mutable`.
    """
    extra = self.train_inputs(batch) if train else {}
    return self.model.apply(
        variables, batch['image'], batch['text_tokens'], batch['text_mask'],
        train=train, rngs=rngs, mutable=mutable, **extra)

  def pseudo_label(self, teacher: Mapping[str, Any], batch: Batch,
                   step: jax.Array) -> Batch:
    """The batch a training step learns from, given the teacher's variables
    (`TrainState.eval_variables()`: the params' moving average when there
    is one), which get no gradient. A task that learns from a teacher's
    pseudo-labels adds them here; by default the batch itself."""
    del teacher, step
    return batch

  # --------------------------------------------------------- loss and response

  def loss(self, outputs: Outputs, batch: Batch, step: jax.Array
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, {term: value}) of a training forward pass's outputs."""
    raise NotImplementedError

  def response_map(self, outputs: Outputs, size: int,
                   content_size: jax.Array) -> jax.Array:
    """[B, size, size] canvas map of an inference forward pass, > 0 on the
    predicted referent; int [B, 2] `content_size` is the (h, w) the image
    takes at the canvas' top-left (the rest is padding)."""
    raise NotImplementedError
