"""Pictures a person would rather look at: masks and clicks over images."""

from __future__ import annotations

from typing import Mapping, Sequence

from etils import epath
import numpy as np
from PIL import Image, ImageDraw

# Ground truth in green, predictions in red (where both: yellow-ish).
TRUE_COLOUR = (0, 220, 0)
PREDICTED_COLOUR = (255, 40, 40)


def write_png(picture: Image.Image, path: epath.PathLike) -> epath.Path:
  """Writes `picture` as a PNG at `path`, local or remote (gs://), creating
  its directory; returns the path."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    picture.save(f, format='PNG')
  return path


def overlay(image: np.ndarray, masks: Sequence[tuple[np.ndarray, tuple]],
            clicks: np.ndarray | None = None, alpha: float = 0.45,
            dim: float = 1.0) -> Image.Image:
  """Blends [H, W] 0/1 masks in their colours over a uint8 [H, W, 3] image.

  Args:
    image: the picture.
    masks: (mask, RGB colour) pairs, drawn in order.
    clicks: optional [K, 2] normalised (y, x) points, drawn as crosses.
    alpha: mask opacity.
    dim: brightness of the pixels outside every mask (1 = unchanged), to make
      the masked objects stand out whatever their colour.
  """
  out = image.astype(np.float32)
  outside = ~np.any([m.astype(bool) for m, _ in masks], axis=0)
  out[outside] *= dim
  for mask, colour in masks:
    on = mask.astype(bool)
    out[on] = (1 - alpha) * out[on] + alpha * np.array(colour, np.float32)
  picture = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
  if clicks is not None:
    draw = ImageDraw.Draw(picture)
    height, width = image.shape[:2]
    arm = max(2, round(min(height, width) / 40))
    for y, x in np.asarray(clicks) * [height, width]:
      draw.line([(x - arm, y), (x + arm, y)], fill=(255, 255, 255), width=1)
      draw.line([(x, y - arm), (x, y + arm)], fill=(255, 255, 255), width=1)
  return picture


def spotlight(image: np.ndarray, mask: np.ndarray,
              colour: tuple[int, int, int] = PREDICTED_COLOUR,
              dim: float = 0.45) -> Image.Image:
  """`mask` over a uint8 [H, W, 3] image, its own colours kept: the rest
  dimmed, the mask's edge drawn in `colour` (a tint would change the very
  colours that expressions name)."""
  mask = mask.astype(bool)
  out = np.where(mask[..., None], image, image * dim).astype(np.uint8)
  width = max(1, round(min(mask.shape) / 150))
  inner = mask.copy()
  for _ in range(width):  # Erode by one pixel (4-neighbourhood) per pass.
    padded = np.pad(inner, 1)
    inner &= (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
              & padded[1:-1, 2:])
  out[mask & ~inner] = colour
  return Image.fromarray(out)


def _wrap(caption: str, width: int, lines: int) -> str:
  """`caption` in at most `lines` lines of about `width` characters."""
  wrapped = ['']
  for word in caption.split():
    if wrapped[-1] and len(wrapped[-1]) + len(word) > width:
      wrapped.append('')
    wrapped[-1] = f'{wrapped[-1]} {word}'.strip()
  return '\n'.join(wrapped[:lines])


# Pixels per character and per line of PIL's default font.
_CHAR_WIDTH, _LINE_HEIGHT = 6.4, 16


def captioned_grid(panels: Sequence[tuple[Image.Image, str]], columns: int,
                   panel_size: int = 256) -> Image.Image:
  """Panels scaled to `panel_size` wide, each with its caption underneath."""
  caption_height = 34
  rows = -(-len(panels) // columns)
  grid = Image.new('RGB', (columns * panel_size,
                           rows * (panel_size + caption_height)), 'white')
  draw = ImageDraw.Draw(grid)
  for i, (panel, caption) in enumerate(panels):
    left = (i % columns) * panel_size
    top = (i // columns) * (panel_size + caption_height)
    grid.paste(panel.resize((panel_size, panel_size), Image.NEAREST),
               (left, top))
    # Two lines of ~40 characters fit under a 256 px panel.
    draw.multiline_text((left + 4, top + panel_size + 2),
                        _wrap(caption, 40, 2), fill='black')
  return grid


def with_caption(picture: Image.Image, caption: str) -> Image.Image:
  """`picture` at its own size with `caption` underneath (wrapped to its
  width, at most 3 lines)."""
  text = _wrap(caption, max(8, int(picture.width / _CHAR_WIDTH) - 1), 3)
  height = _LINE_HEIGHT * (text.count('\n') + 1) + 4
  out = Image.new('RGB', (picture.width, picture.height + height), 'white')
  out.paste(picture, (0, 0))
  ImageDraw.Draw(out).multiline_text((3, picture.height + 2), text,
                                     fill='black')
  return out


def overlay_grid(batch: Mapping[str, np.ndarray], response: np.ndarray,
                 count: int) -> Image.Image | None:
  """Predicted (red) and true (green) masks over an eval batch's first
  valid examples.

  Args:
    batch: host-local eval batch (canvas images, original-size masks).
    response: host-local [b, S, S] canvas responses (> 0 = referent).
    count: how many panels at most.

  Returns:
    A captioned grid (expression and IoU under each), None if no example.
  """
  panels = []
  for i in np.flatnonzero(batch['valid'])[:count]:
    (h, w), (orig_h, orig_w) = batch['content_size'][i], batch['orig_size'][i]
    true = Image.fromarray(batch['eval_mask'][i, :orig_h, :orig_w] * 255)
    true = np.asarray(true.resize((w, h), Image.NEAREST)) > 0
    pred = response[i, :h, :w] > 0
    iou = (pred & true).sum() / max((pred | true).sum(), 1)
    picture = overlay(batch['image'][i, :h, :w],
                      [(true, TRUE_COLOUR), (pred, PREDICTED_COLOUR)], dim=0.6)
    panels.append((picture, f'{batch["sentence"][i].decode()} '
                            f'(IoU {100 * iou:.0f})'))
  if not panels:
    return None
  return captioned_grid(panels, columns=min(4, len(panels)))
