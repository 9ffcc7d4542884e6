"""Procedural scenes and referring expressions for `ref_shapes`.

A scene is 2-6 flat-coloured shapes, drawn in order (later ones on top, so
objects may partly hide each other) over a textured gradient. Each scene
draws its shapes and colours from a small pool so that look-alikes are
common and a model has to read locations and relations, not only nouns.
Everything is a pure function of a NumPy `Generator`, hence deterministic.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from refseg_jax.data.ref_shapes import language as lang

RGB = {
    'red': (215, 35, 35), 'orange': (245, 135, 20), 'yellow': (240, 215, 30),
    'green': (35, 160, 55), 'cyan': (30, 200, 215), 'blue': (35, 65, 215),
    'purple': (140, 50, 185), 'brown': (120, 75, 35),
}
# Circumradius as a fraction of the image side; jittered by +-10 %.
RADIUS = {'small': 0.065, 'big': 0.115}
MIN_VISIBLE_FRACTION = 0.6  # An occluded object keeps most of itself.
MAX_REFERRED_OBJECTS = 3
MAX_EXPRESSIONS_PER_OBJECT = 3


@dataclasses.dataclass(frozen=True)
class Scene:
  """A rendered scene: image, visible masks and what the language sees."""
  image: np.ndarray  # uint8 [S, S, 3]
  masks: np.ndarray  # bool [N, S, S], visible pixels, in drawing order.
  objects: tuple[lang.SceneObject, ...]
  visible_fraction: tuple[float, ...]  # Visible / drawn pixels per object.


def _polygon(shape: str, cy: float, cx: float, radius: float,
             angle: float) -> list[tuple[float, float]]:
  """Vertices (x, y) in pixels of a regular shape or star."""
  if shape == 'star':
    radii = [radius * 1.2, radius * 0.5] * 5
  else:
    corners = {'square': 4, 'triangle': 3, 'hexagon': 6}[shape]
    radii = [radius * (1.15 if shape == 'triangle' else 1.0)] * corners
  # Start at the top so that triangles and stars stand upright at angle 0.
  thetas = -np.pi / 2 + angle + 2 * np.pi * np.arange(len(radii)) / len(radii)
  if shape == 'square':
    thetas += np.pi / 4
  return [(cx + r * np.cos(t), cy + r * np.sin(t))
          for r, t in zip(radii, thetas)]


def shape_mask(shape: str, cy: float, cx: float, radius: float, angle: float,
               size: int) -> np.ndarray:
  """Binary [size, size] mask of one shape (no anti-aliasing)."""
  canvas = Image.new('L', (size, size), 0)
  draw = ImageDraw.Draw(canvas)
  if shape == 'circle':
    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
  else:
    draw.polygon(_polygon(shape, cy, cx, radius, angle), fill=1)
  return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A muted two-colour gradient with stripes and noise, float [S, S, 3]."""
  grey = np.full(3, 128.0)
  ends = 0.35 * rng.uniform(0, 255, (2, 3)) + 0.65 * grey
  yy, xx = np.mgrid[0:size, 0:size] / size
  theta = rng.uniform(0, 2 * np.pi)
  t = np.cos(theta) * xx + np.sin(theta) * yy
  t = (t - t.min()) / (t.max() - t.min())
  image = ends[0] * (1 - t[..., None]) + ends[1] * t[..., None]
  frequency, phi = rng.uniform(4, 12), rng.uniform(0, np.pi)
  stripes = np.sin(2 * np.pi * frequency *
                   (np.cos(phi) * xx + np.sin(phi) * yy))
  image += rng.uniform(4, 14) * stripes[..., None]
  return image + rng.normal(0, 5, image.shape)


def _visible_centroid(mask: np.ndarray) -> tuple[float, float]:
  ys, xs = np.nonzero(mask)
  return ((ys.mean() + 0.5) / mask.shape[0], (xs.mean() + 0.5) / mask.shape[1])


def render_scene(rng: np.random.Generator, size: int, num_objects: int,
                 first_pair: tuple[str, str] | None = None) -> Scene:
  """Draws up to `num_objects` shapes (at least 2) on a background.

  Args:
    rng: the only source of randomness.
    size: image side in pixels.
    num_objects: how many shapes to try to place; a shape that would hide
      too much of the others is re-drawn elsewhere, then dropped.
    first_pair: (colour, shape) forced for the first object (for scenes that
      must contain a given pair).

  Returns:
    The scene; raises RuntimeError if fewer than two shapes fit.
  """
  shape_pool = rng.choice(lang.SHAPES, rng.integers(2, 4), replace=False)
  colour_pool = rng.choice(lang.COLOURS, rng.integers(2, 5), replace=False)
  image = _background(rng, size)
  full, visible, attributes = [], [], []
  for k in range(num_objects):
    colour, shape = first_pair if (k == 0 and first_pair) else (
        str(rng.choice(colour_pool)), str(rng.choice(shape_pool)))
    size_name = str(rng.choice(lang.SIZES))
    radius = RADIUS[size_name] * size * rng.uniform(0.9, 1.1)
    for _ in range(30):
      cy, cx = rng.uniform(1.25 * radius, size - 1.25 * radius, 2)
      mask = shape_mask(shape, cy, cx, radius, rng.uniform(-0.3, 0.3), size)
      still = [v & ~mask for v in visible]
      if all(s.sum() >= MIN_VISIBLE_FRACTION * f.sum()
             for s, f in zip(still, full)):
        full.append(mask)
        visible = still + [mask]
        attributes.append((shape, colour, size_name))
        break
  if len(visible) < 2:
    raise RuntimeError('render_scene: fewer than two shapes fit.')
  for mask, (_, colour, _) in zip(visible, attributes):
    shade = np.array(RGB[colour]) * rng.uniform(0.9, 1.1)
    image[mask] = shade + rng.normal(0, 5, (mask.sum(), 3))
  objects = tuple(lang.SceneObject(s, c, z, *_visible_centroid(m))
                  for m, (s, c, z) in zip(visible, attributes))
  return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8),
               np.stack(visible), objects,
               tuple(v.sum() / f.sum() for v, f in zip(visible, full)))


def _noun_phrases(obj: lang.SceneObject) -> list[lang.NounPhrase]:
  return [lang.NounPhrase(obj.shape, colour, size)
          for colour, size in itertools.product((None, obj.colour),
                                                (None, obj.size))]


def candidate_expressions(objects: Sequence[lang.SceneObject], referent: int,
                          may_name: Callable[[lang.SceneObject], bool],
                          margin: float) -> dict[str, list[lang.Expression]]:
  """All unambiguous expressions for `referent`, grouped by kind.

  Locations and relations are only offered when the head noun phrase alone
  is ambiguous, so that they carry information.

  Args:
    objects: the scene.
    referent: index of the object to describe.
    may_name: whether an object may be named as a landmark.
    margin: clarity margin of spatial words, normalised.
  """
  found = {'attribute': [], 'location': [], 'relation': []}
  landmark_phrases = [
      (j, phrase) for j, o in enumerate(objects)
      if j != referent and may_name(o) for phrase in _noun_phrases(o)
      if lang.matches(lang.Expression(phrase), objects) == [j]]
  for head in _noun_phrases(objects[referent]):
    options = [lang.Expression(head)]
    if len(lang.matches(lang.Expression(head), objects)) > 1:
      options += [lang.Expression(head, location=where)
                  for where in lang.LOCATION_TEMPLATES]
      options += [lang.Expression(head, relation=relation, landmark=phrase)
                  for relation in lang.RELATION_TEMPLATES
                  for _, phrase in landmark_phrases]
    for expression in options:
      if lang.is_unambiguous(expression, objects, referent, margin):
        found[expression.kind].append(expression)
  return found


def sample_sentences(rng: np.random.Generator,
                     found: dict[str, list[lang.Expression]]) -> list[str]:
  """1-3 distinct sentences, spreading over the kinds that are available."""
  kinds = [k for k in ('location', 'relation', 'attribute') if found[k]]
  wanted = int(rng.integers(1, MAX_EXPRESSIONS_PER_OBJECT + 1))
  sentences = []
  for kind in itertools.islice(itertools.cycle(rng.permutation(kinds)),
                               2 * wanted):
    options = found[str(kind)]
    expression = options[rng.integers(len(options))]
    sentence = lang.realize(expression,
                            int(rng.integers(len(lang.templates(expression)))),
                            int(rng.integers(2)))
    if sentence not in sentences:
      sentences.append(sentence)
    if len(sentences) == wanted:
      break
  return sentences


def referred_scene(rng: np.random.Generator, size: int,
                   may_refer: Callable[[lang.SceneObject], bool],
                   may_name: Callable[[lang.SceneObject], bool],
                   margin: float,
                   first_pair: tuple[str, str] | None = None,
                   ) -> tuple[Scene, dict[int, list[str]]]:
  """A scene and its sentences: {object index: [sentence, ...]}.

  Redraws until at least one object may be referred to and has an
  unambiguous expression; then refers to 1-3 such objects.
  """
  while True:
    try:
      scene = render_scene(rng, size, int(rng.integers(2, 7)), first_pair)
    except RuntimeError:
      continue
    found = {i: candidate_expressions(scene.objects, i, may_name, margin)
             for i, o in enumerate(scene.objects) if may_refer(o)}
    referable = [i for i, f in found.items() if any(f.values())]
    if referable:
      break
  count = int(rng.integers(1, min(MAX_REFERRED_OBJECTS, len(referable)) + 1))
  chosen = sorted(rng.choice(referable, count, replace=False).tolist())
  return scene, {i: sample_sentences(rng, found[i]) for i in chosen}
