r"""Train-step benchmark: compile time, FLOPs, memory and speed of the real
train step (and the evaluation forward) of any config, on synthetic data.

    python -m refseg_jax.benchmarks.train_step \
        --config=configs/text.py:model=paper --batch_size=32 \
        --expressions_per_image=1 [--compile_only] [--steps=10 --warmup=2] \
        [--json=/tmp/train_step.json]

builds the train step exactly as training does (`train.make_train_step`
over the config's mesh, the state of `train_state.create`, compiled by
`train._compile`) and the evaluator's jitted step
(`evaluator.make_eval_step`), feeds them random batches of the shapes and
dtypes the input pipeline would give the config's task (uint8 images,
tokens with a valid mask, and the boxes, clicks and masks its supervision
reads; no dataset on disk), and reports, for each:

    compile_s                 lowering + XLA compilation
    gflop_per_step, _example  the model's FLOPs per step, per example:
                              XLA's cost analysis of the step's program
                              lowered (not compiled) in `PLAIN_LAYOUT`,
                              blocks unrolled and nothing rematerialised,
                              so neither remat's recomputation nor a scan
                              (whose body XLA counts once) changes them
    gflop_per_device          XLA's cost analysis of the compiled program
                              (one device's partition of it; a scan's
                              body counted once)
    memory                    XLA's memory analysis, per device: argument,
                              output, temporary, generated-code bytes
and unless `--compile_only`:
    s_per_step                median over `--steps` timed steps, after
                              `--warmup` untimed ones (each step waited for)
    examples_per_s, gflop_per_s, mfu   MFU = achieved GFLOP/s / the matmul
                              peak measured in the same run on the same
                              devices (`matmul_peak`, before and after the
                              timed steps, the faster), in the compute
                              dtype of the config's model
    peak_rss_gb, device_peak_bytes  the process' peak resident memory, and
                              on an accelerator the devices' peak bytes
                              (so far: after the train steps, then after
                              evaluation)

The evaluation's figures have the same names (a step is one batch).

`--batch_size` overrides `config.batch_size` (expressions),
`--expressions_per_image` `config.data.expressions_per_image` (k >= 1:
B / k images with k expressions each; 0: B random image-expression pairs),
`--eval_batch_size` `config.eval.batch_size`; `--config.x.y=...` changes
anything else. The learning-rate schedule runs over `config.total_steps`
as written (a config with `total_epochs` would resolve it from the
dataset's size, which changes no cost). Everything goes to stdout as JSON
(and to `--json`), then one summary line; on a loaded 2-core CPU,
`--config=configs/text.py:data=ref_shapes_tiny --batch_size=4 --steps=2
--warmup=1` printed (wrapped here)

    train: 0.0345 s/step, 116 ex/s, 15.7 GFLOP/s, MFU 23.5% of 66.6 GFLOP/s
    float32 matmul; 0.541 GFLOP/step (0.135/example); mem args 0.00447 GB
    + temps 0.0134 GB; compile 25.1 s | eval: 0.0851 s/batch, 752 ex/s,
    ... | peak RSS 1.76 GB

On CPU it keeps freed host memory for reuse, as training does
(`--nokeep_freed_host_memory`: not). `--num_devices=N` uses the first N
devices only (scaling); `--noeval`
leaves the evaluation out; `--peak_size`, `--peak_repeats`, `--peak_dtype`
set the matmul of the peak.

GB are 10^9 bytes. The model's GFLOP are of the whole (global) program;
a data-parallel compiled step repeats the optimiser update on every
device, which `gflop_per_device` counts and they do not.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from refseg_jax import host_memory
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax import train_state
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator
from refseg_jax.models import bert

GB = 1e9
MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes',
                 'alias_size_in_bytes')


# ------------------------------------------------------------------ config

def configure(config: ml_collections.ConfigDict,
              batch_size: int | None = None,
              expressions_per_image: int | None = None,
              eval_batch_size: int | None = None,
              overrides: Mapping[str, Any] | None = None
              ) -> ml_collections.ConfigDict:
  """A copy of `config` with the benchmark's overrides (None: keep).

  Args:
    config: a training config (`configs/*.py`).
    batch_size: `config.batch_size`, expressions per train step.
    expressions_per_image: `config.data.expressions_per_image`.
    eval_batch_size: `config.eval.batch_size`.
    overrides: {dotted key: value}, e.g. {'model.dtype': 'float32'}.

  Raises:
    ValueError: naming a key the config does not have, or a batch size
      that is not positive, or a negative expressions_per_image.
  """
  config = config.copy_and_resolve_references()
  for name, value in (('batch_size', batch_size),
                      ('eval_batch_size', eval_batch_size)):
    if value is not None and value < 1:
      raise ValueError(f'--{name}={value} must be positive.')
  if expressions_per_image is not None and expressions_per_image < 0:
    raise ValueError(f'--expressions_per_image={expressions_per_image} must '
                     'be >= 0 (0: random pairs).')
  changes = dict(overrides or {})
  for key, value in (('batch_size', batch_size),
                     ('data.expressions_per_image', expressions_per_image),
                     ('eval.batch_size', eval_batch_size)):
    if value is not None:
      changes[key] = value
  config.lock()  # Locked, so that an unknown key raises, not adds.
  for key, value in changes.items():
    try:
      config.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError) as error:
      raise ValueError(f'Unknown config key {key!r} (value {value!r}): '
                       f'{error}') from None
  return config


def split_batch(batch_size: int, expressions_per_image: int, num_shards: int,
                what: str = 'batch_size') -> tuple[int, int]:
  """(images, expressions) of a batch of `batch_size` expressions.

  k = `expressions_per_image` >= 1 groups them k per image (B / k images,
  `refseg_jax.data.pipeline`); 0 gives every expression its own image.
  Both arrays are split over `num_shards` devices (`batch_sharding`).

  Raises:
    ValueError: naming the batch size when k or the shards do not divide it.
  """
  group = max(expressions_per_image, 1)
  if batch_size % group:
    raise ValueError(f'{what}={batch_size} is not divisible by '
                     f'expressions_per_image={expressions_per_image}.')
  images = batch_size // group
  for count, kind in ((batch_size, 'expressions'), (images, 'images')):
    if count % num_shards:
      raise ValueError(
          f'{what}={batch_size} ({count} {kind}) is not divisible by the '
          f"mesh's {num_shards} devices (the batch axis).")
  return images, batch_size


def vocab_size(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(vocabulary size, where it came from): the tokenizer training loads
  (`config.data.tokenizer`, or the dataset's own), else BERT's, which the
  RefCOCO family is tokenized with."""
  try:
    tokenizer = pipeline.load_tokenizer(config.data.tokenizer,
                                        config.data.name)
  except (ValueError, OSError) as error:
    logging.warning('No tokenizer (%s); vocabulary of BERT (%d).', error,
                    bert.BERT_VOCAB_SIZE)
    return bert.BERT_VOCAB_SIZE, 'bert-base-uncased (fallback)'
  return tokenizer.vocab_size, 'tokenizer'


# ----------------------------------------------------------------- batches

def _tokens(rng: np.random.Generator, count: int, length: int,
            vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """Random int32 tokens and their mask [count, length]: 2 to `length`
  valid tokens each, the rest padding (0)."""
  lengths = rng.integers(2, length + 1, count)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(1, vocab, (count, length)).astype(np.int32)
  return tokens * mask, mask


def _boxes(rng: np.random.Generator, count: int) -> np.ndarray:
  """Random float32 (ymin, xmin, ymax, xmax) boxes inside [0, 1]."""
  low = rng.uniform(0.0, 0.5, (count, 2))
  return np.concatenate([low, low + rng.uniform(0.1, 0.5, (count, 2))],
                        1).astype(np.float32)


def train_batch(config: ml_collections.ConfigDict, supervision: str,
                vocab: int, seed: int = 0,
                batch_size: int | None = None) -> dict[str, np.ndarray]:
  """A random train batch with exactly the fields, shapes and dtypes that
  `pipeline.train_dataset` gives `supervision` (module doc there).

  Args:
    config: the training config (data section, batch size).
    supervision: 'text', 'click' or 'full'.
    vocab: token ids are drawn below it.
    seed: of the draw.
    batch_size: expressions (default `config.batch_size`): this host's
      share of the global batch.
  """
  batch_size = config.batch_size if batch_size is None else batch_size
  images, texts = split_batch(batch_size,
                              config.data.expressions_per_image, 1)
  size, length = config.data.image_size, config.data.max_text_len
  rng = np.random.default_rng(seed)
  tokens, mask = _tokens(rng, texts, length, vocab)
  box = _boxes(rng, texts)
  centre = (box[:, :2] + box[:, 2:]) / 2
  grid = (np.arange(size) + 0.5) / size
  inside = lambda lo, hi: (grid >= lo[:, None]) & (grid <= hi[:, None])
  fields = {
      'image': lambda: rng.integers(0, 256, (images, size, size, 3),
                                    dtype=np.uint8),
      'image_id': lambda: np.arange(images, dtype=np.int32),
      'text_tokens': lambda: tokens,
      'text_mask': lambda: mask,
      'box': lambda: box,
      'clicks': lambda: np.stack([centre, box[:, :2], box[:, 2:]], 1),
      'mask': lambda: (inside(box[:, 0], box[:, 2])[:, :, None]
                       & inside(box[:, 1], box[:, 3])[:, None, :]
                       ).astype(np.uint8),
  }
  return {k: fields[k]() for k in pipeline.SUPERVISION_FIELDS[supervision]}


def eval_batch(config: ml_collections.ConfigDict, vocab: int, seed: int = 0,
               batch_size: int | None = None) -> dict[str, np.ndarray]:
  """A random evaluation batch (`pipeline.eval_dataset`'s device fields,
  not grouped; default `config.eval.batch_size` expressions), every row
  valid, the original size taken as eval_mask_size squared."""
  batch_size = config.eval.batch_size if batch_size is None else batch_size
  size, length = config.data.image_size, config.data.max_text_len
  mask_size = config.data.eval_mask_size
  rng = np.random.default_rng(seed)
  tokens, mask = _tokens(rng, batch_size, length, vocab)
  ids = np.arange(batch_size, dtype=np.int32)
  fields = {
      'image': lambda: rng.integers(0, 256, (batch_size, size, size, 3),
                                    dtype=np.uint8),
      'text_tokens': lambda: tokens,
      'text_mask': lambda: mask,
      'eval_mask': lambda: rng.integers(
          0, 2, (batch_size, mask_size, mask_size), dtype=np.uint8),
      'orig_size': lambda: np.full((batch_size, 2), mask_size, np.int32),
      'content_size': lambda: np.full((batch_size, 2), size, np.int32),
      'valid': lambda: np.ones(batch_size, bool),
      'image_id': lambda: ids,
      'sentence_id': lambda: ids,
  }
  return {k: fields[k]() for k in pipeline.EVAL_FIELDS
          if k not in evaluator.HOST_ONLY_FIELDS}


# ------------------------------------------------------ compiled programs

class _Recorder:
  """A metric writer that keeps the scalars `train._compile` writes."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step
    self.scalars.update(scalars)


def compile_train_step(train_step, state, batch) -> tuple[Any, float]:
  """(compiled step, seconds) through training's own `train._compile`."""
  recorder = _Recorder()
  # pylint: disable-next=protected-access
  compiled = train._compile(train_step, state, batch, recorder, 0)
  return compiled, float(recorder.scalars['compile_time_s'])


def _analysis(compiled, name: str) -> Any:
  """`compiled.<name>()` (XLA's 'cost_analysis' or 'memory_analysis'), or
  None where the backend gives none."""
  try:
    return getattr(compiled, name)()
  except (NotImplementedError, RuntimeError) as error:
    logging.warning('No %s: %s', name, error)
    return None


def flops(compiled) -> float | None:
  """FLOPs of one device's program by XLA's cost analysis; None if the
  backend gives none. (A dict, or in some JAX versions a list of one dict
  per program: summed.)"""
  analysis = _analysis(compiled, 'cost_analysis')
  if analysis is None:
    return None
  if isinstance(analysis, Mapping):
    analysis = [analysis]
  values = [a['flops'] for a in analysis if a and 'flops' in a]
  return float(sum(values)) if values else None


def memory(compiled) -> dict[str, int] | None:
  """Bytes per device of XLA's memory analysis (`MEMORY_FIELDS`); None if
  the backend gives none."""
  stats = _analysis(compiled, 'memory_analysis')
  if stats is None:
    return None
  return {field: int(getattr(stats, field, 0) or 0)
          for field in MEMORY_FIELDS}


def cost_report(compiled, compile_s: float, batch_size: int,
                model_flops: float | None) -> dict[str, Any]:
  """Compile time, GFLOP (the model's per step and per example, XLA's per
  device of the compiled program) and memory."""
  per_device = flops(compiled)
  report = {'compile_s': compile_s, 'batch_size': batch_size,
            'gflop_per_step': None, 'gflop_per_example': None,
            'gflop_per_device': (None if per_device is None
                                 else per_device / 1e9),
            'memory': memory(compiled)}
  if model_flops is not None:
    report.update(gflop_per_step=model_flops / 1e9,
                  gflop_per_example=model_flops / 1e9 / batch_size)
  return report


# What the model's FLOPs are counted in (`model_flops`): every block
# unrolled, nothing rematerialised, the all-pairs fusion at once. The keys a
# config lacks are left out.
PLAIN_LAYOUT = {'model.scan_layers': False, 'model.remat': 'none',
                'model.fusion_chunk': 0}


def model_flops(config: ml_collections.ConfigDict, vocab: int,
                mesh: jax.sharding.Mesh, batch: Mapping[str, jax.Array],
                eval_inputs: Mapping[str, jax.Array] | None
                ) -> dict[str, float | None]:
  """{'train', 'eval'}: the FLOPs of the whole (all devices') train step on
  `batch` and eval step on `eval_inputs` (None: no 'eval'), from XLA's cost
  analysis of their programs in `PLAIN_LAYOUT`, lowered, never compiled:
  what the model computes, whatever the config's remat and scans."""
  plain = configure(config, overrides={
      key: value for key, value in PLAIN_LAYOUT.items()
      if key.split('.')[-1] in config.model})
  task = tasks.build(plain, vocab)
  state, shardings = train_state.shapes_and_shardings(plain, task, mesh)
  counts = {'train': flops(train.make_train_step(
      plain, task, mesh, shardings).lower(state, batch))}
  if eval_inputs is not None:
    counts['eval'] = flops(evaluator.make_eval_step(
        task, mesh, shardings.eval_variables()).lower(
            state.eval_variables(), eval_inputs))
  return counts


# ------------------------------------------------------------------ timing

def time_calls(call: Callable[[], Any], steps: int, warmup: int
               ) -> list[float]:
  """Seconds of each of `steps` calls of `call` after `warmup` untimed
  ones, each waited for (`jax.block_until_ready` on what it returns)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f'steps={steps} must be >= 1 and warmup={warmup} >= 0.')
  for _ in range(warmup):
    jax.block_until_ready(call())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    seconds.append(time.perf_counter() - start)
  return seconds


def rates(seconds: Sequence[float], batch_size: int,
          gflop_per_step: float | None, peak_gflop_per_s: float | None
          ) -> dict[str, Any]:
  """Median s/step and what follows from it: examples/s, achieved GFLOP/s,
  and MFU = achieved / peak (None where a number is missing)."""
  median = statistics.median(seconds)
  achieved = None if gflop_per_step is None else gflop_per_step / median
  return {'steps_timed': len(seconds), 's_per_step': median,
          's_per_step_min': min(seconds), 's_per_step_max': max(seconds),
          'examples_per_s': batch_size / median, 'gflop_per_s': achieved,
          'mfu': (achieved / peak_gflop_per_s
                  if achieved is not None and peak_gflop_per_s else None)}


def matmul_peak(mesh: jax.sharding.Mesh, dtype: Any = jnp.float32,
                size: int = 2048, repeats: int = 4, trials: int = 5
                ) -> dict[str, Any]:
  """The devices' measured matmul rate: `repeats` chained [size, size]
  products per device (the rows split over the whole mesh, as a batch is),
  in one jitted call; GFLOP/s = 2 size^3 x repeats x devices / the best of
  `trials` timed calls (after one to compile and warm up)."""
  devices = mesh.devices.size
  dtype = jnp.dtype(dtype)
  rows = jax.sharding.NamedSharding(mesh, sharding.batch_sharding(mesh).spec)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x_key, w_key = jax.random.split(jax.random.key(0))
  x = jax.jit(lambda k: jax.random.normal(k, (devices * size, size), dtype),
              out_shardings=rows)(x_key)
  # Scaled so that the chained products neither blow up nor vanish.
  w = jax.jit(lambda k: (jax.random.normal(k, (size, size)) / np.sqrt(size)
                         ).astype(dtype), out_shardings=replicated)(w_key)

  @jax.jit
  def chain(x, w):
    return jax.lax.fori_loop(0, repeats, lambda _, y: y @ w, x)

  best = min(time_calls(lambda: chain(x, w), trials, 1))
  gflop = 2 * size ** 3 * repeats * devices / 1e9
  return {'dtype': dtype.name, 'size': size, 'repeats': repeats,
          'trials': trials, 'devices': devices, 'best_s': best,
          'gflop_per_s': gflop / best}


# ---------------------------------------------------------------- process

def peak_rss_gb() -> float:
  """The process' peak resident memory so far (`ru_maxrss`: KB on Linux,
  bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak * (1 if sys.platform == 'darwin' else 1024) / GB


def device_peak_bytes(devices: Sequence[jax.Device]) -> int | None:
  """The highest `peak_bytes_in_use` of `devices` (None on CPU, or where
  the backend keeps no statistics)."""
  if jax.default_backend() == 'cpu':
    return None
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use')
           for d in devices]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def _process_threads() -> int | None:
  """The process' thread count (Linux's /proc; None elsewhere)."""
  try:
    status = epath.Path('/proc/self/status').read_text()
  except OSError:
    return None
  for line in status.splitlines():
    if line.startswith('Threads:'):
      return int(line.split()[1])
  return None


def environment(mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """Backend, devices, versions and the host's CPUs and threads."""
  device = mesh.devices.flat[0]
  return {
      'backend': jax.default_backend(), 'device_kind': device.device_kind,
      'num_devices': int(mesh.devices.size), 'mesh': dict(mesh.shape),
      'process_count': jax.process_count(), 'jax_version': jax.__version__,
      'python': platform.python_version(), 'cpu_count': os.cpu_count(),
      'cpus_usable': (len(os.sched_getaffinity(0))
                      if hasattr(os, 'sched_getaffinity') else None),
      'process_threads': _process_threads(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


# -------------------------------------------------------------- benchmark

def check_batch_sizes(config: ml_collections.ConfigDict, num_shards: int,
                      evaluate: bool = True) -> None:
  """Raises a ValueError naming a batch size that the processes, the
  grouping by image or the mesh's `num_shards` devices do not divide."""
  sizes = {'batch_size': config.batch_size}
  if evaluate:
    sizes['eval_batch_size'] = config.eval.batch_size
  for name, size in sizes.items():
    if size % jax.process_count():
      raise ValueError(f'{name}={size} is not divisible by the process '
                       f'count {jax.process_count()}.')
  split_batch(config.batch_size, config.data.expressions_per_image,
              num_shards)
  if evaluate:
    split_batch(config.eval.batch_size, 0, num_shards, 'eval_batch_size')


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the report says of the config: task, batches, sizes, dtype."""
  return {
      'task': config.task, 'batch_size': config.batch_size,
      'expressions_per_image': config.data.expressions_per_image,
      'images_per_batch': split_batch(
          config.batch_size, config.data.expressions_per_image, 1)[0],
      'eval_batch_size': config.eval.batch_size,
      'image_size': config.data.image_size,
      'max_text_len': config.data.max_text_len,
      'model_dtype': str(config.model.get('dtype', 'float32')),
  }


def run(config: ml_collections.ConfigDict, *, compile_only: bool = False,
        steps: int = 10, warmup: int = 2, eval_steps: int | None = None,
        num_devices: int | None = None, peak_size: int | None = None,
        peak_repeats: int | None = None, peak_dtype: str | None = None,
        evaluate: bool = True, seed: int = 0) -> dict[str, Any]:
  """Benchmarks `config`'s train step and evaluation forward (module doc).

  Args:
    config: a training config, its batch sizes already set (`configure`).
    compile_only: compile and analyse only; no state, no timing.
    steps, warmup: timed and untimed train steps; evaluation the same,
      or `eval_steps` timed.
    num_devices: the first this many devices make the mesh (None: all).
    peak_size, peak_repeats, peak_dtype: of `matmul_peak` (None: 4096 and
      20 on an accelerator, 2048 and 4 on CPU; the model's dtype).
    evaluate: also the evaluation forward (else `report['eval']` is None).
    seed: of the synthetic batches.

  Returns:
    The report: {'train': ..., 'eval': ..., 'peak': ..., settings and
    environment}, as the JSON file holds it.
  """
  if not compile_only and (steps < 1 or warmup < 0):
    raise ValueError(f'--steps={steps} must be >= 1 and --warmup={warmup} '
                     '>= 0.')
  devices = jax.devices()[:num_devices] if num_devices else None
  mesh = sharding.make_mesh(config.mesh, devices)
  shards = int(mesh.devices.size)
  check_batch_sizes(config, shards, evaluate)
  vocab, vocab_source = vocab_size(config)
  task = tasks.build(config, vocab)
  report = {
      **settings(config), 'supervision': task.supervision,
      'vocab_size': vocab, 'vocab_source': vocab_source,
      'compile_only': compile_only, 'steps': steps, 'warmup': warmup,
      **environment(mesh),
  }
  local = lambda b: b // jax.process_count()
  batch_sharding = sharding.batch_sharding(mesh)
  batch = sharding.global_batch(
      train_batch(config, task.supervision, vocab, seed,
                  local(config.batch_size)), batch_sharding)
  eval_inputs = sharding.global_batch(
      eval_batch(config, vocab, seed + 1, local(config.eval.batch_size)),
      batch_sharding) if evaluate else None

  if compile_only:  # Shapes only: nothing initialised.
    state, state_shardings = train_state.shapes_and_shardings(config, task,
                                                              mesh)
  else:
    state, state_shardings = train_state.create(config, task, mesh)
  report['num_params'] = int(sum(x.size for x in jax.tree.leaves(
      state.params)))
  report['param_bytes'] = int(sum(x.size * jnp.dtype(x.dtype).itemsize
                                  for x in jax.tree.leaves(state.params)))

  counted = model_flops(config, vocab, mesh, batch, eval_inputs)
  logging.info('Compiling the train step (%s, batch %d).', config.task,
               config.batch_size)
  compiled, compile_s = compile_train_step(
      train.make_train_step(config, task, mesh, state_shardings), state,
      batch)
  report['train'] = cost_report(compiled, compile_s, config.batch_size,
                                counted['train'])

  report['eval'] = None
  if evaluate:
    eval_step = evaluator.make_eval_step(task, mesh,
                                         state_shardings.eval_variables())
    logging.info('Compiling the eval step (batch %d).',
                 config.eval.batch_size)
    start = time.perf_counter()
    compiled_eval = eval_step.lower(state.eval_variables(),
                                    eval_inputs).compile()
    report['eval'] = cost_report(compiled_eval, time.perf_counter() - start,
                                 config.eval.batch_size, counted['eval'])
  if compile_only:
    report['peak_rss_gb'] = peak_rss_gb()
    return report

  def train_call():
    nonlocal state
    state, step_metrics = compiled(state, batch)
    return state, step_metrics

  accelerator = jax.default_backend() != 'cpu'
  measure_peak = lambda: matmul_peak(
      mesh, peak_dtype or config.model.get('dtype', 'float32'),
      peak_size or (4096 if accelerator else 2048),
      peak_repeats or (20 if accelerator else 4))
  # Measured before and after the timed steps, the faster kept: on a
  # shared CPU one measurement moved by 15 % from process to process.
  peaks = [measure_peak()]
  seconds = {'train': time_calls(train_call, steps, warmup)}
  devices = list(mesh.devices.flat)
  report['train'].update(peak_rss_gb=peak_rss_gb(),
                         device_peak_bytes=device_peak_bytes(devices))
  if evaluate:
    variables = state.eval_variables()
    seconds['eval'] = time_calls(
        lambda: compiled_eval(variables, eval_inputs), eval_steps or steps,
        warmup)
    report['eval'].update(peak_rss_gb=peak_rss_gb(),
                          device_peak_bytes=device_peak_bytes(devices))

  peaks.append(measure_peak())
  report['peak'] = {**max(peaks, key=lambda p: p['gflop_per_s']),
                    'measured_gflop_per_s': [p['gflop_per_s'] for p in peaks]}
  for name, timed in seconds.items():
    section = report[name]
    section.update(rates(timed, section['batch_size'],
                         section['gflop_per_step'],
                         report['peak']['gflop_per_s']))
  report['peak_rss_gb'] = peak_rss_gb()
  return report


# ----------------------------------------------------------------- summary

def _g(value: float | None, digits: int = 3) -> str:
  """`value` to `digits` significant digits; '?' if None."""
  return '?' if value is None else f'{value:.{digits}g}'


def _section_summary(section: Mapping[str, Any], unit: str,
                     peak: Mapping[str, Any] | None) -> str:
  parts = []
  if 's_per_step' in section:
    mfu = section['mfu']
    parts.append(
        f"{_g(section['s_per_step'])} s/{unit}, "
        f"{_g(section['examples_per_s'])} ex/s, "
        f"{_g(section['gflop_per_s'])} GFLOP/s, MFU "
        f"{'?' if mfu is None else f'{100 * mfu:.3g}%'} of "
        f"{_g(peak['gflop_per_s'])} GFLOP/s {peak['dtype']} matmul")
  parts.append(f"{_g(section['gflop_per_step'])} GFLOP/{unit} "
               f"({_g(section['gflop_per_example'])}/example)")
  mem = section['memory']
  if mem is not None:
    parts.append(f"mem args {_g(mem['argument_size_in_bytes'] / GB)} GB + "
                 f"temps {_g(mem['temp_size_in_bytes'] / GB)} GB")
  if section.get('device_peak_bytes') is not None:
    parts.append(f"device peak {_g(section['device_peak_bytes'] / GB)} GB")
  parts.append(f"compile {_g(section['compile_s'])} s")
  return '; '.join(parts)


def summary(report: Mapping[str, Any]) -> str:
  """One line: the train step's figures, then the evaluation's."""
  peak = report.get('peak')
  line = f"train: {_section_summary(report['train'], 'step', peak)}"
  if report.get('eval') is not None:
    line += f" | eval: {_section_summary(report['eval'], 'batch', peak)}"
  return line + f" | peak RSS {_g(report['peak_rss_gb'])} GB"


def command_report(config: ml_collections.ConfigDict, config_spec: str,
                   config_overrides: Mapping[str, Any], **run_kwargs: Any
                   ) -> dict[str, Any]:
  """`run(config, **run_kwargs)`'s report as the command writes it: the
  config's spec (FILE[:ARG]) and `--config.*` overrides first, the whole
  config last."""
  report = run(config, **run_kwargs)
  return {'config_spec': config_spec,
          'config_overrides': dict(config_overrides), **report,
          'config': config.to_dict()}


def emit(report: Mapping[str, Any], json_path: str | None) -> None:
  """Prints the report as JSON (also to `json_path`, if given), then its
  one-line `summary`."""
  text = json.dumps(report, indent=2, default=str)
  print(text)
  if json_path:
    epath.Path(json_path).write_text(text + '\n')
  print(summary(report))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  kept_freed_memory = (args.keep_freed_host_memory
                       and jax.default_backend() == 'cpu'
                       and host_memory.keep_freed())
  config = configure(args.config, args.batch_size, args.expressions_per_image,
                     args.eval_batch_size)
  report = command_report(
      config, config_flags.get_config_filename(args['config']),
      config_flags.get_override_values(args['config']),
      compile_only=args.compile_only, steps=args.steps, warmup=args.warmup,
      eval_steps=args.eval_steps, num_devices=args.num_devices,
      peak_size=args.peak_size, peak_repeats=args.peak_repeats,
      peak_dtype=args.peak_dtype, evaluate=args.eval)
  report['keep_freed_host_memory'] = kept_freed_memory
  emit(report, args.json)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None,
                                  'Training config: FILE[:ARG].',
                                  lock_config=True)
  flags.DEFINE_integer('batch_size', None,
                       "Expressions per train step; None = the config's.")
  flags.DEFINE_integer('expressions_per_image', None,
                       'k expressions per image (B / k images); 0 = random '
                       "pairs; None = the config's.")
  flags.DEFINE_integer('eval_batch_size', None,
                       "Expressions per eval batch; None = the config's.")
  flags.DEFINE_bool('compile_only', False,
                    'Compile and analyse only: no state, no timing.')
  flags.DEFINE_integer('steps', 10, 'Timed steps (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps before them.')
  flags.DEFINE_bool('eval', True, 'Also the evaluation forward.')
  flags.DEFINE_integer('eval_steps', None,
                       'Timed eval batches; None = --steps.')
  flags.DEFINE_integer('num_devices', None,
                       'Use the first N devices; None = all.')
  flags.DEFINE_integer('peak_size', None, 'Matmul side of the peak '
                       'measurement; None = 4096 (accelerator), 2048 (CPU).')
  flags.DEFINE_integer('peak_repeats', None, 'Chained matmuls per timed '
                       'call; None = 20 (accelerator), 4 (CPU).')
  flags.DEFINE_string('peak_dtype', None,
                      "Matmul dtype of the peak; None = the model's dtype.")
  flags.DEFINE_bool('keep_freed_host_memory', True, 'On CPU, as '
                    '`refseg_jax.main` does by default '
                    '(`host_memory.keep_freed`).')
  flags.DEFINE_string('json', None, 'Also write the report to this file.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
