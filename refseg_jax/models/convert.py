r"""Pretrained PyTorch / Hugging Face weights for the project's encoders.

Reads a local (or gs://) checkpoint and returns flax variables for one of the
encoder modules: `bert.BertEncoder`, `vit.ViT` or `resnet.ResNet`. What the
checkpoint may be (docs/pretrained.md has the table):

* a Hugging Face model directory (`model.safetensors`, else
  `pytorch_model.bin`) of `BertModel`, `ViTModel` or `ResNetModel`, or of a
  task model around one (`BertFor*`, `ViTFor*`, `ResNetFor*`);
* a timm ViT (`vit_*_patch16_*`) or torchvision ResNet state dict, as a
  `.safetensors` file or a pickled `.bin` / `.pth` / `.pt` file;
* an orbax checkpoint written by this module's command line (below).

Pickled files are read with `torch.load(weights_only=True)`, which builds
tensors and refuses to run pickled code; only they need torch.

How a checkpoint key finds its flax variable, one mechanism for every format:

1. A task model's prefix (`bert.`, `vit.`, `resnet.`) is dropped, and
   Hugging Face names are renamed to the *canonical* names by the
   architecture's regex rules: HF's for BERT, timm's for ViT (whose HF
   query/key/value are then fused into timm's `qkv`), torchvision's for
   ResNet. Canonical names pass through unchanged.
2. A canonical key becomes a flax path: a `.` before a number becomes `_`
   (`blocks.3.` -> `blocks_3/`, `layer1.0.` -> `layer1_0/`), other dots `/`.
3. The leaf is renamed by what the model has there: `weight` -> `kernel`
   (linear: transposed; conv: OIHW -> HWIO), `scale` (norms) or `embedding`;
   `running_mean` / `running_var` -> the `batch_stats` `mean` / `var`.
4. Where the model scans its blocks (`config.model.scan_layers`,
   `layers.stack_blocks`: `blocks/...` with a leading block axis instead
   of `blocks_0/...`, `blocks_1/...`), the blocks' tensors are stacked in
   block order (`stack_scanned`).

Shapes are then checked against the model; the first mismatch is an error
naming the checkpoint key, the flax path and both shapes. The one exception
is a ViT `pos_embed` laid out for another image size: its grid is resized
with `vit.interpolate_pos_embed` (bilinear, aligned corners: the resize the
model itself applies to other input sizes), the class token kept. Checkpoint
tensors without a place in the model (classifier heads, a pooler the model
lacks) are returned and logged as unused, model variables the checkpoint
lacks as missing; the buffers `position_ids` and `num_batches_tracked` are
skipped silently.

The official Shatter and Gather's training checkpoints (kdwonn/SaG) have
their own command, which writes a workdir of `configs/text.py:model=paper`
(`convert_sag_official`; names mapped by `sag_official_head`, the encoders
by the rules above):

    python -m refseg_jax.models.convert sag-official \
        --checkpoint=model_best.pth.tar --tokenizer=/ckpt/bert-base-uncased \
        --output=/ckpt/sag_official   # a workdir: evaluate / predict it

Command line: convert once, for the encoders a training config's
`model_init` names, into orbax checkpoints that later runs read directly:

    python -m refseg_jax.models.convert --config=configs/text.py:model=paper \
        --config.model_init.backbone=/ckpt/vit_small_patch16_384.safetensors \
        --config.model_init.text=/ckpt/bert-base-uncased \
        --config.data.tokenizer=/ckpt/bert-base-uncased --output=/ckpt/sag

writes `/ckpt/sag/backbone` and `/ckpt/sag/text`; then train with
`--config.model_init.backbone=/ckpt/sag/backbone` (and `.text=...`). With
`--workdir=W` it also writes a workdir of the whole model with these
weights (`write_workdir`), which `refseg_jax.evaluate` and
`refseg_jax.predict` load like a trained one.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import re
from typing import Any, Callable, Collection, Mapping

from absl import app
from absl import flags
from absl import logging
from etils import epath
from flax import traverse_util
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from refseg_jax.models import vit

Path = tuple[str, ...]
# A flax variable path (collection first) -> (array, the checkpoint key(s)).
Tensors = dict[Path, tuple[np.ndarray, str]]

# Files looked for, in order, in a Hugging Face (or timm hub) directory.
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
# Buffers that are no weights: dropped without being reported as unused.
_SKIPPED = re.compile(r'(^|\.)(position_ids|num_batches_tracked)$')
# Older checkpoints name LayerNorm parameters as TensorFlow did.
_COMMON_RENAMES = ((r'\.gamma$', '.weight'), (r'\.beta$', '.bias'))
# Where a torch leaf may go: (collection, flax leaf), the first the model has.
_LEAVES = {
    'weight': (('params', 'kernel'), ('params', 'scale'),
               ('params', 'embedding')),
    'running_mean': (('batch_stats', 'mean'),),
    'running_var': (('batch_stats', 'var'),),
}

Rename = tuple[str, str | Callable[[re.Match], str]]


@dataclasses.dataclass(frozen=True)
class Architecture:
  """How checkpoints of one encoder family name their tensors.

  Attributes:
    name: 'bert', 'vit' or 'resnet'.
    marker: A top-level module only this family's flax params have.
    prefix: Prefix of the encoder's keys inside a task model, dropped.
    renames: (regex, replacement) rules, applied in order to every key,
      from Hugging Face names to the canonical ones.
    fuse: (fused, parts): the modules `*.parts[i]` whose weights and biases
      are concatenated (torch's output axis) into one module `*.fused`.
  """
  name: str
  marker: str
  prefix: str
  renames: tuple[Rename, ...] = ()
  fuse: tuple[str, tuple[str, ...]] | None = None


_BLOCK = r'^(blocks\.\d+)\.'
ARCHITECTURES = (
    # Canonical names are Hugging Face's (see `bert` module doc).
    Architecture('bert', marker='embeddings', prefix='bert.'),
    # Canonical names are timm's (see `vit` module doc).
    Architecture('vit', marker='patch_embed', prefix='vit.', renames=(
        (r'^embeddings\.cls_token$', 'cls_token'),
        (r'^embeddings\.position_embeddings$', 'pos_embed'),
        (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
        (r'^encoder\.layer\.(\d+)\.', r'blocks.\1.'),
        (_BLOCK + r'attention\.attention\.', r'\1.attn.'),
        (_BLOCK + r'attention\.output\.dense\.', r'\1.attn.proj.'),
        (_BLOCK + r'layernorm_before\.', r'\1.norm1.'),
        (_BLOCK + r'layernorm_after\.', r'\1.norm2.'),
        (_BLOCK + r'intermediate\.dense\.', r'\1.mlp.fc1.'),
        (_BLOCK + r'output\.dense\.', r'\1.mlp.fc2.'),
        (r'^layernorm\.', 'norm.'),
    ), fuse=('qkv', ('query', 'key', 'value'))),
    # Canonical names are torchvision's (see `resnet` module doc).
    Architecture('resnet', marker='conv1', prefix='resnet.', renames=(
        (r'^embedder\.embedder\.convolution\.', 'conv1.'),
        (r'^embedder\.embedder\.normalization\.', 'bn1.'),
        (r'^encoder\.stages\.(\d+)\.layers\.(\d+)\.',
         lambda m: f'layer{int(m[1]) + 1}.{m[2]}.'),
        (r'\.shortcut\.convolution\.', '.downsample.0.'),
        (r'\.shortcut\.normalization\.', '.downsample.1.'),
        (r'\.layer\.(\d+)\.convolution\.', lambda m: f'.conv{int(m[1]) + 1}.'),
        (r'\.layer\.(\d+)\.normalization\.', lambda m: f'.bn{int(m[1]) + 1}.'),
    )),
)


@dataclasses.dataclass
class Converted:
  """A checkpoint converted for one module.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} nested dicts of float
      numpy arrays, for the model variables the checkpoint holds.
    unused: Checkpoint keys with no place in the model.
    missing: Model variables ('params/pooler/dense/kernel') the checkpoint
      lacks; they keep their initialisation.
  """
  variables: dict[str, Any]
  unused: list[str]
  missing: list[str]


def architecture_of(target: Mapping[str, Any]) -> Architecture:
  """The family whose `marker` module `target['params']` has."""
  for arch in ARCHITECTURES:
    if arch.marker in target['params']:
      return arch
  raise ValueError('Not the variables of a BERT, ViT or ResNet module: '
                   f'top-level modules {sorted(target["params"])}.')


# --- reading -----------------------------------------------------------------


def _to_numpy(tensor: Any) -> np.ndarray:
  """A torch tensor as numpy; floats as float32 (numpy has no bfloat16)."""
  if tensor.is_floating_point():
    tensor = tensor.float()
  return tensor.detach().cpu().numpy()


def _read_pickled(data: bytes) -> dict[str, np.ndarray]:
  """A torch state dict from `torch.save` bytes, without running pickled code.

  A `{'state_dict': ...}` or `{'model': ...}` training checkpoint is unwrapped.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Reading a pickled (.bin/.pth/.pt) checkpoint needs '
                      'PyTorch (pip install torch); .safetensors files do '
                      'not.') from e
  # Training checkpoints (the official SaG's among them) keep their
  # command-line flags as an argparse.Namespace: a plain attribute bag,
  # allowed; anything else that is not a tensor or a container is refused.
  with torch.serialization.safe_globals([argparse.Namespace]):
    state = torch.load(io.BytesIO(data), map_location='cpu',
                       weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(state.get(wrapper), Mapping):
      state = state[wrapper]
      break
  return {k: _to_numpy(v) for k, v in state.items()
          if isinstance(v, torch.Tensor)}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The tensors of a checkpoint file or Hugging Face directory, by key.

  Args:
    path: A `.safetensors` file, a pickled torch file (any other name), or a
      directory holding one of `HF_WEIGHT_FILES`.

  Returns:
    {key: numpy array}, floats as float32.
  """
  file = epath.Path(path)
  if file.is_dir():
    found = [file / name for name in HF_WEIGHT_FILES if (file / name).exists()]
    if not found:
      raise FileNotFoundError(f'{path} holds none of {HF_WEIGHT_FILES}.')
    file = found[0]
  if not file.exists():
    raise FileNotFoundError(f'No checkpoint {path}.')
  data = file.read_bytes()
  if file.suffix == '.safetensors':
    tensors = safetensors.numpy.load(data)
    return {k: v.astype(np.float32, copy=False) if v.dtype.kind == 'f' else v
            for k, v in tensors.items()}
  return _read_pickled(data)


def is_orbax_checkpoint(path: str) -> bool:
  """Whether `path` is an orbax checkpoint (as the command line writes)."""
  return (epath.Path(path) / '_CHECKPOINT_METADATA').exists()


# --- torch names to flax paths -----------------------------------------------


def canonical_names(state: Mapping[str, np.ndarray], arch: Architecture
                    ) -> dict[str, tuple[np.ndarray, str]]:
  """Step 1 of the module doc: {canonical key: (array, checkpoint key)}."""
  renamed = {}
  for key, array in state.items():
    if _SKIPPED.search(key):
      continue
    name = key.removeprefix(arch.prefix)
    for pattern, replacement in _COMMON_RENAMES + arch.renames:
      name = re.sub(pattern, replacement, name)
    renamed[name] = (array, key)
  if arch.fuse:
    renamed = _fuse(renamed, *arch.fuse)
  return renamed


def _fuse(renamed: dict[str, tuple[np.ndarray, str]], fused: str,
          parts: tuple[str, ...]) -> dict[str, tuple[np.ndarray, str]]:
  """Concatenates `X.{parts}.{weight,bias}` into `X.{fused}.{weight,bias}`.

  A set with a part missing is left as it is (and reported unused).
  """
  first = re.compile(rf'(.*)\.{parts[0]}\.(weight|bias)')
  for key in list(renamed):
    match = first.fullmatch(key)
    if not match:
      continue
    keys = [f'{match[1]}.{part}.{match[2]}' for part in parts]
    if all(k in renamed for k in keys):
      arrays, sources = zip(*(renamed.pop(k) for k in keys))
      renamed[f'{match[1]}.{fused}.{match[2]}'] = (
          np.concatenate(arrays), ' + '.join(sources))
  return renamed


def _flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
  """A torch weight in flax's layout: Linear [out, in] -> [in, out],
  Conv OIHW -> HWIO; anything else unchanged."""
  if leaf == 'kernel' and array.ndim == 2:
    return array.T
  if leaf == 'kernel' and array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array


def to_flax_paths(canonical: Mapping[str, tuple[np.ndarray, str]],
                  target_paths: frozenset[Path]) -> Tensors:
  """Steps 2 and 3 of the module doc, for the model with `target_paths`."""
  tensors = {}
  for key, (array, source) in canonical.items():
    module, _, leaf = re.sub(r'\.(\d+)(?=\.|$)', r'_\1', key).rpartition('.')
    module = tuple(module.split('.')) if module else ()
    candidates = [(collection, *module, name) for collection, name
                  in _LEAVES.get(leaf, (('params', leaf),))]
    # Without a match the first candidate stands, reported as unused later.
    path = next((p for p in candidates if p in target_paths
                 or _scanned_place(p, target_paths)), candidates[0])
    tensors[path] = (_flax_layout(array, path[-1]), source)
  return tensors


# --- checking against the model ----------------------------------------------

# A numbered block in a flax path: `blocks_3`, `layer_11`.
_NUMBERED = re.compile(r'(.+)_(\d+)')


def _scanned_place(path: Path, wanted: Collection[Path]
                   ) -> tuple[Path, int] | None:
  """(the scanned path, block index) of a numbered block's `path` when the
  model has no `path` but scans those blocks; else None."""
  if path in wanted:
    return None
  for k, part in enumerate(path):
    match = _NUMBERED.fullmatch(part)
    if match and (scanned := path[:k] + (match[1],) + path[k + 1:]) in wanted:
      return scanned, int(match[2])
  return None


def stack_scanned(tensors: Tensors, wanted: Collection[Path]) -> Tensors:
  """Step 4 of the module doc: the tensors of numbered blocks stacked, in
  block order, where the model (its flat `wanted` paths) scans them. (A
  block the model keeps apart, such as a ResNet stage's block 0 before
  the scanned `layer3`, stays where it is; a missing block shows as a
  shape mismatch later.)

  Raises:
    ValueError: when a scanned tensor's blocks are not consecutive.
  """
  stacked, blocks = {}, {}
  for path, tensor in tensors.items():
    place = _scanned_place(path, wanted)
    if place is None:
      stacked[path] = tensor
    else:
      blocks.setdefault(place[0], {})[place[1]] = tensor
  for path, by_index in blocks.items():
    numbers = sorted(by_index)
    if numbers != list(range(numbers[0], numbers[0] + len(numbers))):
      raise ValueError(f'{"/".join(path)}: the checkpoint\'s blocks '
                       f'{numbers} are not consecutive.')
    arrays, sources = zip(*(by_index[i] for i in numbers))
    stacked[path] = (np.stack(arrays), sources[0] if len(sources) == 1
                     else f'{sources[0]} ... {sources[-1]}')
  return stacked


def _square_grid(tokens: int, source: str) -> tuple[int, int]:
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f'{source}: {tokens} position embeddings are not a '
                     'square grid.')
  return side, side


def _resized_pos_embed(array: np.ndarray, shape: tuple[int, ...],
                       source: str) -> np.ndarray:
  """[1, 1 + n, D] position embeddings for a model's [1, 1 + m, D]."""
  resized = vit.interpolate_pos_embed(
      array, _square_grid(array.shape[1] - 1, source),
      _square_grid(shape[1] - 1, source), num_prefix_tokens=1)
  logging.info('%s: position embeddings resized from %s to %s.', source,
               array.shape, shape)
  return np.asarray(resized)


def _shape_error(path: Path, source: str, array: np.ndarray,
                 shape: tuple[int, ...]) -> ValueError:
  return ValueError(
      f'Checkpoint tensor {source!r} (-> {"/".join(path)}) has shape '
      f'{array.shape} in the model\'s layout; the model wants {shape}.')


def check_and_place(tensors: Tensors, target: Mapping[str, Any]) -> Converted:
  """Checks `tensors` against `target`'s shapes and nests them like it.

  Args:
    tensors: {flax path (collection first): (array, checkpoint key)}.
    target: The module's variables or their shapes, {'params': ...,
      'batch_stats': ...}; every leaf has `.shape` and `.dtype`.

  Returns:
    The converted variables, unused keys and missing paths.

  Raises:
    ValueError: At the first tensor whose shape differs from the model's, or
      when none fits the architecture's `marker` module (another
      architecture's checkpoint).
  """
  wanted = traverse_util.flatten_dict(dict(target))
  tensors = stack_scanned(tensors, wanted)
  arch = architecture_of(target)
  if not any(p in wanted and p[1] == arch.marker for p in tensors):
    raise ValueError(f'No checkpoint tensor fits the {arch.name} module\'s '
                     f'{arch.marker!r}: is it a {arch.name} checkpoint? Keys: '
                     f'{sorted(source for _, source in tensors.values())[:6]}')
  placed, unused = {}, []
  for path, (array, source) in tensors.items():
    if path not in wanted:
      unused.append(source)
      continue
    shape = tuple(wanted[path].shape)
    if path[-1] == 'pos_embed' and array.shape != shape and (
        array.shape[::2] == shape[::2]):
      array = _resized_pos_embed(array, shape, source)
    if array.shape != shape:
      raise _shape_error(path, source, array, shape)
    placed[path] = np.asarray(array, wanted[path].dtype)
  missing = sorted('/'.join(p) for p in wanted if p not in placed)
  return Converted(traverse_util.unflatten_dict(placed), sorted(unused),
                   missing)


# --- entry points ------------------------------------------------------------


def convert(state: Mapping[str, np.ndarray],
            target: Mapping[str, Any]) -> Converted:
  """Converts a torch-format state dict for the module with `target`.

  Args:
    state: {key: numpy array} in Hugging Face, timm or torchvision naming.
    target: The module's variables or shapes (see `check_and_place`); they
      also tell which architecture the state dict is for.
  """
  canonical = canonical_names(state, architecture_of(target))
  paths = frozenset(traverse_util.flatten_dict(dict(target)))
  return check_and_place(to_flax_paths(canonical, paths), target)


def load(path: str, target: Mapping[str, Any]) -> Converted:
  """Reads and converts the checkpoint at `path` (see module doc).

  Args:
    path: A Hugging Face directory, a `.safetensors` or pickled torch file,
      or an orbax checkpoint written by `save` (the command line).
    target: The module's variables or shapes (see `check_and_place`).
  """
  if is_orbax_checkpoint(path):
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(epath.Path(path).absolute())
    tensors = {p: (np.asarray(x), '/'.join(p)) for p, x in
               traverse_util.flatten_dict(restored).items()}
    return check_and_place(tensors, target)
  return convert(read_state_dict(path), target)


# --- the official Shatter and Gather -----------------------------------------

# The official SaG (kdwonn/SaG, `CrossModalAttentionRecon`) names of the
# modules of `refseg_jax.models.sag.SaG`'s own layers (not the encoders),
# by regex -> flax module path (named groups fill it in). `b` is the
# aggregation block: the blocks after 0 share its weights
# (`--agg_weight_sharing`) and must equal it.
_SAG_AGG = r'encoders\.img_enc\.set_pred_module\.agg\.'
_SAG_BLOCK = _SAG_AGG + r'agg_blocks\.(?P<b>\d+)\.'
_SAG_MODULES = (
    (r'encoders\.img_enc\.spm_1x1', 'visual_projection'),
    (_SAG_BLOCK + r'0\.fn\.to_(?P<qkv>q|k|v)', 'entities/aggregation/{qkv}'),
    (_SAG_BLOCK + r'0\.fn\.to_out\.0', 'entities/aggregation/output'),
    (_SAG_BLOCK + r'0\.norm', 'entities/aggregation/norm_slots'),
    (_SAG_BLOCK + r'0\.norm_context', 'entities/norm_inputs'),
    (_SAG_BLOCK + r'2\.fn\.net\.0', 'entities/aggregation/mlp/fc1'),
    (_SAG_BLOCK + r'2\.fn\.net\.3', 'entities/aggregation/mlp/fc2'),
    (_SAG_BLOCK + r'2\.norm', 'entities/aggregation/norm_mlp'),
    (_SAG_BLOCK + r'4\.0\.0\.fn\.to_(?P<qkv>q|k|v)',
     'entities/interaction/{qkv}'),
    (_SAG_BLOCK + r'4\.0\.0\.fn\.to_out\.0', 'entities/interaction/output'),
    (_SAG_BLOCK + r'4\.0\.0\.norm', 'entities/interaction/norm_attention'),
    (_SAG_BLOCK + r'4\.0\.2\.fn\.net\.0', 'entities/interaction/mlp/fc1'),
    (_SAG_BLOCK + r'4\.0\.2\.fn\.net\.3', 'entities/interaction/mlp/fc2'),
    (_SAG_BLOCK + r'4\.0\.2\.norm', 'entities/interaction/norm_mlp'),
    (_SAG_AGG + r'last_layer\.1', 'entities/output'),
    (r'encoders\.img_enc\.set_pred_module\.residual_norm',
     'entities/norm_output'),
    (r'encoders\.txt_enc\.linear', 'text_projection'),
    (r'cma\.attn\.fn\.to_(?P<qkv>q|k|v)', 'fusion/{qkv}'),
    (r'cma\.attn\.fn\.to_out\.0', 'fusion/output'),
    (r'cma\.attn\.norm', 'fusion/norm_text'),
    (r'cma\.attn\.norm_context', 'fusion/norm_slots'),
    (r'cma\.ff\.fn\.net\.0', 'fusion/mlp/fc1'),
    (r'cma\.ff\.fn\.net\.3', 'fusion/mlp/fc2'),
    (r'cma\.ff\.norm', 'fusion/norm_mlp'),
    (r'decoder\.mlp\.(?P<layer>0|2|4|6)', 'decoder/layer_{layer}'),
)
_QKV = {'q': 'query', 'k': 'key', 'v': 'value'}
# Official decoder Sequential index -> our layer (ReLUs in between).
_DECODER_LAYERS = {'0': 0, '2': 1, '4': 2, '6': 3}
# The slot Gaussians, [1, G, D] officially, [G, D] here.
_SAG_QUERIES = {
    'mean': 'encoders.img_enc.set_pred_module.agg.queries.slots_mu',
    'log_var': 'encoders.img_enc.set_pred_module.agg.queries.slots_log_sigma'}
# The decoder's learned row and column embeddings (`_decoder_position`).
_SAG_DECODER_EMBEDDINGS = ('decoder.pos_emb.row_embed.weight',
                           'decoder.pos_emb.col_embed.weight')
# Where the official SaG keeps its encoders, and the prefix each encoder
# converter expects instead.
SAG_ENCODERS = {'backbone': ('encoders.img_enc.img_backbone.', ''),
                'text': ('encoders.txt_enc.bert.', 'bert.')}
_SAG_UNUSED = re.compile(r'encoders\.img_enc\.(residual_fc|set_pred_module'
                         r'\.fc)\.')


def _sag_module(key: str) -> tuple[str, str, int] | None:
  """(flax module path, torch leaf, aggregation block or -1) of an official
  SaG key, or None when it is not one of SaG's own layers."""
  module, _, leaf = key.rpartition('.')
  for pattern, path in _SAG_MODULES:
    match = re.fullmatch(pattern, module)
    if match:
      named = match.groupdict()
      path = path.format(qkv=_QKV.get(named.get('qkv'), ''),
                         layer=_DECODER_LAYERS.get(named.get('layer'), ''))
      return path, leaf, int(named.get('b', -1))
  return None


def _decoder_position(row: np.ndarray, col: np.ndarray,
                      grid: tuple[int, int]) -> np.ndarray:
  """The official decoder's learned position of each patch, [H * W, D]:
  [col_embed(j) | row_embed(i)] at row i, column j (DETR's
  `PositionEmbeddingLearned`), row-major."""
  height, width = grid
  x = np.broadcast_to(col[None, :width], (height, width, col.shape[-1]))
  y = np.broadcast_to(row[:height, None], (height, width, row.shape[-1]))
  return np.concatenate([x, y], -1).reshape(height * width, -1)


def sag_official_head(state: Mapping[str, np.ndarray],
                      target: Mapping[str, Any],
                      grid: tuple[int, int]) -> Converted:
  """SaG's own layers (all but the ViT and BERT) from the official SaG's
  `model` state dict.

  Args:
    state: {official key: array} (PyTorch layout); the encoders' keys
      (`SAG_ENCODERS`) are skipped here.
    target: SaG's variables or shapes, {'params': ...}.
    grid: The patch grid (h, w) the model runs on, for the decoder's
      row and column embeddings.

  Returns:
    The converted variables of the modules `_SAG_MODULES` names, the
    unused keys (the official `residual_fc` and `set_pred_module.fc`, which
    its forward pass never reads) and the missing paths.

  Raises:
    ValueError: naming the key, when a tensor's shape differs from the
      model's, or an aggregation block differs from block 0 (a checkpoint
      trained without weight sharing, which this model cannot hold).
  """
  wanted = traverse_util.flatten_dict(dict(target))
  tensors: Tensors = {}
  block_zero: dict[str, tuple[np.ndarray, str]] = {}
  unused = []
  special = {*_SAG_QUERIES.values(), *_SAG_DECODER_EMBEDDINGS}
  # Sorted, so that aggregation block 0 comes before the blocks after it.
  for key, array in sorted(state.items()):
    if key in special or any(key.startswith(prefix)
                             for prefix, _ in SAG_ENCODERS.values()):
      continue
    found = _sag_module(key)
    if found is None:
      unused.append(key)
      continue
    module, leaf, block = found
    if block > 0:
      reference, source = block_zero.get(f'{module}.{leaf}',
                                         (None, None))
      if reference is not None and not np.array_equal(reference, array):
        raise ValueError(f'Checkpoint tensor {key!r} differs from {source!r}: '
                         'the aggregation blocks do not share weights '
                         '(trained without --agg_weight_sharing?).')
      continue
    if block == 0:
      block_zero[f'{module}.{leaf}'] = (array, key)
    path = ('params', *module.split('/'))
    if leaf == 'weight':
      path += ('kernel' if (*path, 'kernel') in wanted else 'scale',)
    else:
      path += (leaf,)
    tensors[path] = (_flax_layout(array, path[-1]), key)
  for name, source in _SAG_QUERIES.items():
    if source in state:
      tensors[('params', 'entities', name)] = (state[source][0], source)
  rows, cols = _SAG_DECODER_EMBEDDINGS
  if rows in state and cols in state:
    tensors[('params', 'decoder', 'position')] = (
        _decoder_position(state[rows], state[cols], grid), f'{rows} + {cols}')
  placed = {}
  for path, (array, source) in tensors.items():
    if path not in wanted:
      unused.append(source)
      continue
    if array.shape != tuple(wanted[path].shape):
      raise _shape_error(path, source, array, tuple(wanted[path].shape))
    placed[path] = np.asarray(array, wanted[path].dtype)
  own = {path[:2] for path in placed}
  missing = sorted('/'.join(p) for p in wanted
                   if p[:2] in own and p not in placed)
  return Converted(traverse_util.unflatten_dict(placed), sorted(unused),
                   missing)


def _log_report(name: str, path: str, converted: Converted) -> None:
  count = len(traverse_util.flatten_dict(converted.variables))
  logging.info('%s: %d tensors from %s.', name, count, path)
  if converted.unused:
    logging.info('%s: unused checkpoint tensors: %s', name,
                 ', '.join(converted.unused))
  if converted.missing:
    logging.warning('%s: not in the checkpoint, left as initialised: %s',
                    name, ', '.join(converted.missing))


def load_modules(paths: Mapping[str, str | None], variables: Mapping[str, Any]
                 ) -> dict[str, Converted]:
  """Converts the checkpoints of top-level modules of a model.

  Args:
    paths: {top-level module name (e.g. 'backbone', 'text'): checkpoint path
      or None}, as `config.model_init`; None entries are skipped.
    variables: The whole model's variables or shapes, {'params': ...,
      'batch_stats': ...}.

  Returns:
    {module name: its converted checkpoint}, the report logged.
  """
  converted = {}
  for name, path in paths.items():
    if not path:
      continue
    if name not in variables['params']:
      raise ValueError(f'model_init.{name}: the model has no module {name!r}; '
                       f'it has {sorted(variables["params"])}.')
    target = {collection: tree[name] for collection, tree in variables.items()
              if name in tree}
    converted[name] = load(path, target)
    _log_report(name, path, converted[name])
  return converted


def load_model_tensors(paths: Mapping[str, str | None],
                       variables: Mapping[str, Any]
                       ) -> dict[tuple[str, ...], np.ndarray]:
  """`load_modules`' tensors keyed by their path in the whole model:
  (collection, module name, ...), as `traverse_util.flatten_dict` of the
  model's variables keys them."""
  return {(collection, name, *rest): value
          for name, converted in load_modules(paths, variables).items()
          for (collection, *rest), value in traverse_util.flatten_dict(
              converted.variables).items()}


def save(variables: Mapping[str, Any], directory: str) -> None:
  """Writes converted variables as an orbax checkpoint `load` reads."""
  with ocp.StandardCheckpointer() as checkpointer:  # Closing waits.
    checkpointer.save(epath.Path(directory).absolute(), dict(variables))


def convert_config(config: Any, output: str) -> dict[str, str]:
  """Converts every checkpoint `config.model_init` names, for `config`'s model.

  Args:
    config: A training config (`configs/*.py`).
    output: Directory receiving one orbax checkpoint per module.

  Returns:
    {module name: the orbax checkpoint written}, ready for `model_init`.
  """
  # Only the command line needs the task registry and the tokenizer (which
  # bring in the models and TensorFlow).
  from refseg_jax import tasks  # pylint: disable=g-import-not-at-top
  from refseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  task = tasks.build(config, tokenizer.vocab_size)
  shapes = jax.eval_shape(task.init_variables, jax.random.key(0))
  written = {}
  for name, converted in load_modules(config.model_init, shapes).items():
    written[name] = str(epath.Path(output) / name)
    save(converted.variables, written[name])
    logging.info('Wrote %s.', written[name])
  return written


def write_workdir(config: Any, written: Mapping[str, str],
                  workdir: str) -> None:
  """A workdir of the model with the converted weights, untrained.

  Writes WORKDIR/config.json (`model_init` naming the `written`
  checkpoints) and, in WORKDIR/best/0, the variables evaluation applies:
  the converted modules, the rest as `config.seed` initialises them (what
  training with this `model_init` starts from). So `refseg_jax.evaluate`
  and `refseg_jax.predict` take it as they take a trained workdir.
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model_init.update(written)
  write_variables_workdir(
      config, lambda variables: load_model_tensors(config.model_init,
                                                   variables), workdir)


def write_variables_workdir(
    config: Any,
    converted: Callable[[Mapping[str, Any]],
                        Mapping[tuple[str, ...], np.ndarray]],
    workdir: str) -> None:
  """Writes WORKDIR/config.json and WORKDIR/best/0 (see `write_workdir`).

  Args:
    config: The config to save (resolved).
    converted: Given the model's initialised variables, the converted
      tensors by flattened path (collection first); they replace the
      initialised ones.
    workdir: Output directory.
  """
  # pylint: disable=g-import-not-at-top
  from refseg_jax import checkpointing
  from refseg_jax import results
  from refseg_jax import tasks
  from refseg_jax.data import pipeline
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  task = tasks.build(config, tokenizer.vocab_size)
  # Jitted as training initialises (eager float order differs by an ulp).
  variables = jax.jit(task.init_variables)(jax.random.key(config.seed))
  flat = traverse_util.flatten_dict(variables)
  flat.update(converted(variables))
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results.write_json(workdir / 'config.json', config.to_dict())
  best = checkpointing.managers(workdir, config)[1]
  with best:  # Saved without a score: no evaluation has run.
    best.save(0, args=ocp.args.StandardSave(
        {'params': {}, 'batch_stats': {},
         **traverse_util.unflatten_dict(flat)}))


def _torch_bilinear_pos_embed(pos_embed: np.ndarray,
                              grid: tuple[int, int]) -> np.ndarray:
  """A timm / Segmenter [1, 1 + n * n, D] position embedding resized to
  `grid` as the official SaG's ViT resizes it at run time
  (`F.interpolate(mode='bilinear')`: half-pixel centres, no antialiasing),
  the class token kept."""
  side = math.isqrt(pos_embed.shape[1] - 1)
  if (side, side) == tuple(grid):
    return pos_embed
  patches = pos_embed[0, 1:].reshape(side, side, -1)
  resized = jax.image.resize(patches, (*grid, patches.shape[-1]), 'bilinear',
                             antialias=False)
  return np.concatenate([pos_embed[:, :1], np.asarray(resized).reshape(
      1, -1, patches.shape[-1])], axis=1).astype(pos_embed.dtype)


def sag_official(state: Mapping[str, np.ndarray], config: Any,
                 shapes: Mapping[str, Any]) -> dict[Path, np.ndarray]:
  """Every variable of `configs/text.py`'s SaG from an official SaG
  training checkpoint's `model` state dict.

  Args:
    state: {official key: array}; a `module.` prefix (DataParallel) is
      dropped.
    config: The text config whose model receives it (its `model.iterations`
      must be the checkpoint's `--agg_depth`; the ViT's patch grid at
      `model.image_size` gets the position embeddings, resized as the
      official model resizes them).
    shapes: The model's variables or shapes.

  Returns:
    {flattened variable path: array} of the whole model (ViT and BERT
    through their converters, SaG's own layers through
    `sag_official_head`), unused keys logged.

  Raises:
    ValueError: naming the key or the setting, for a checkpoint that does
      not fit the config.
  """
  state = {k.removeprefix('module.'): v for k, v in state.items()}
  blocks = {int(m['b']) for k in state
            if (m := re.match(_SAG_BLOCK, k))}
  if blocks and len(blocks) != config.model.iterations:
    raise ValueError(f'The checkpoint has {len(blocks)} aggregation blocks '
                     f'(--agg_depth); config.model.iterations is '
                     f'{config.model.iterations}.')
  # The ViT's [1, 1 + h * w, D] position embeddings give the patch grid.
  side = math.isqrt(shapes['params']['backbone']['pos_embed'].shape[1] - 1)
  grid = (side, side)
  tensors = {}
  for module, (prefix, renamed) in SAG_ENCODERS.items():
    encoder = {renamed + k.removeprefix(prefix): v for k, v in state.items()
               if k.startswith(prefix)}
    if 'pos_embed' in encoder:
      encoder['pos_embed'] = _torch_bilinear_pos_embed(encoder['pos_embed'],
                                                       grid)
    target = {collection: tree[module] for collection, tree in shapes.items()
              if module in tree}
    converted = convert(encoder, target)
    _log_report(module, 'the official SaG checkpoint', converted)
    tensors.update({(collection, module, *rest): value
                    for (collection, *rest), value in
                    traverse_util.flatten_dict(converted.variables).items()})
  head = sag_official_head(state, shapes, grid)
  _log_report('SaG', 'the official SaG checkpoint', head)
  tensors.update(traverse_util.flatten_dict(head.variables))
  return tensors


def convert_sag_official(checkpoint: str, config: Any, workdir: str) -> None:
  """`sag-official`: an official SaG checkpoint -> a workdir of `config`'s
  model (config.json, best/0) that evaluation and prediction load.

  Args:
    checkpoint: The official training checkpoint (`ckpt.pth.tar` or
      `model_best.pth.tar`: a dict whose `model` is the state dict), or a
      bare state dict.
    config: A `configs/text.py` config of the official model
      (`model=paper`), with the tokenizer of its BERT.
    workdir: Output directory.
  """
  from refseg_jax import tasks  # pylint: disable=g-import-not-at-top
  from refseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  state = read_state_dict(checkpoint)
  tokenizer = pipeline.load_tokenizer(config.data.tokenizer, config.data.name)
  shapes = jax.eval_shape(tasks.build(config, tokenizer.vocab_size)
                          .init_variables, jax.random.key(0))
  tensors = sag_official(state, config, shapes)
  write_variables_workdir(config, lambda _: tensors, workdir)


def main(argv) -> None:
  if argv[1:] == ['sag-official']:
    if not flags.FLAGS.checkpoint:
      raise app.UsageError('sag-official needs --checkpoint=PATH.pth.')
    config = flags.FLAGS.config or _default_sag_config()
    if flags.FLAGS.tokenizer:
      with config.unlocked():
        config.data.tokenizer = flags.FLAGS.tokenizer
    convert_sag_official(flags.FLAGS.checkpoint, config, flags.FLAGS.output)
    print(f'Wrote the workdir {flags.FLAGS.output}: evaluate or predict with '
          f'--workdir={flags.FLAGS.output}.')
    return
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}; the one '
                         "command is 'sag-official'.")
  if flags.FLAGS.config is None:
    raise app.UsageError('--config is required (the training config whose '
                         'model_init names the checkpoints).')
  written = convert_config(flags.FLAGS.config, flags.FLAGS.output)
  for name, path in written.items():
    print(f'--config.model_init.{name}={path}')
  if flags.FLAGS.workdir:
    write_workdir(flags.FLAGS.config, written, flags.FLAGS.workdir)
    print(f'Wrote the workdir {flags.FLAGS.workdir}: evaluate or predict '
          'with --workdir; train (in a new workdir) with the flags above.')


def _default_sag_config() -> Any:
  """`configs/text.py:data=refcoco_unc,model=paper`: the official run's."""
  from refseg_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load(str(epath.Path(__file__).parents[2] / 'configs' /
                             'text.py') + ':data=refcoco_unc,model=paper')


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so),
  # so that importing this module defines no flag.
  config_flags.DEFINE_config_file(
      'config', None, 'Training config whose model_init names the '
      'checkpoints: FILE:ARG. For sag-official, the model to convert to '
      '(default configs/text.py:data=refcoco_unc,model=paper).')
  flags.DEFINE_string(
      'output', None, 'Directory for the converted orbax checkpoints; for '
      'sag-official, the workdir written.')
  flags.DEFINE_string(
      'checkpoint', None, 'sag-official: the official SaG checkpoint '
      '(.pth / .pth.tar with its `model` state dict).')
  flags.DEFINE_string(
      'tokenizer', None, "sag-official: the BERT tokenizer (vocab.txt or a "
      "local bert-base-uncased directory), if the config has none.")
  flags.DEFINE_string(
      'workdir', None, 'Also write a workdir of the whole model with these '
      'weights (config.json, best/0) for refseg_jax.evaluate / predict.')
  flags.mark_flags_as_required(['output'])
  app.run(main)
