"""The referring-expression language of `ref_shapes`: meaning, words, parser.

An expression is a structured `Expression` (a noun phrase, optionally with an
absolute location or a relation to a landmark noun phrase) realised through
one of a few RefCOCO-style templates. `matches` gives its meaning on a
scene; `realize` and `parse` map it to and from a sentence. The generator
only emits expressions that pick exactly one object under a strict and a
lenient reading (`is_unambiguous`), and the tests parse every stored
sentence back and check that it still picks its object.

Coordinates are normalised (y down, x right), so a horizontal flip maps
x -> 1 - x and swaps the words `left` and `right` (the input pipeline's
`swap_left_right`): those are the only words that depend on orientation.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Sequence

SHAPES = ('circle', 'square', 'triangle', 'star', 'hexagon')
COLOURS = ('red', 'orange', 'yellow', 'green', 'cyan', 'blue', 'purple',
           'brown')
SIZES = ('small', 'big')
# Several surface words per size, as annotators vary their words.
SIZE_WORDS = {'small': ('small', 'little'), 'big': ('big', 'large')}

# Absolute locations: the object that is extreme along a direction.
LOCATION_TEMPLATES = {
    'left': ('the leftmost {np}', 'the {np} on the left', 'left {np}',
             'the {np} furthest to the left'),
    'right': ('the rightmost {np}', 'the {np} on the right', 'right {np}',
              'the {np} furthest to the right'),
    'top': ('the topmost {np}', 'the {np} at the top', 'top {np}',
            'the highest {np}'),
    'bottom': ('the lowest {np}', 'the {np} at the bottom', 'bottom {np}',
               'the bottommost {np}'),
}
RELATION_TEMPLATES = {
    'left of': ('the {np} left of the {lm}', '{np} to the left of the {lm}',
                'the {np} on the left of the {lm}'),
    'right of': ('the {np} right of the {lm}', '{np} to the right of the {lm}',
                 'the {np} on the right of the {lm}'),
    'above': ('the {np} above the {lm}', '{np} over the {lm}'),
    'below': ('the {np} below the {lm}', '{np} under the {lm}',
              'the {np} beneath the {lm}'),
}
ATTRIBUTE_TEMPLATES = ('the {np}', '{np}')

# Coordinate and sign along which each direction is "smaller is more so":
# leftmost = smallest x, lowest = largest y (y grows downwards).
_AXIS = {'left': ('x', 1.0), 'right': ('x', -1.0), 'top': ('y', 1.0),
         'bottom': ('y', -1.0), 'left of': ('x', 1.0),
         'right of': ('x', -1.0), 'above': ('y', 1.0), 'below': ('y', -1.0)}


@dataclasses.dataclass(frozen=True)
class SceneObject:
  """What the language can see of an object: attributes and position."""
  shape: str
  colour: str
  size: str
  y: float  # Normalised centroid of the visible pixels.
  x: float


@dataclasses.dataclass(frozen=True)
class NounPhrase:
  """`[size] [colour] shape`; None leaves an attribute unsaid."""
  shape: str
  colour: str | None = None
  size: str | None = None

  def describes(self, obj: SceneObject) -> bool:
    return (obj.shape == self.shape and
            self.colour in (None, obj.colour) and
            self.size in (None, obj.size))


@dataclasses.dataclass(frozen=True)
class Expression:
  """A noun phrase, optionally located or related to a landmark."""
  head: NounPhrase
  location: str | None = None  # A LOCATION_TEMPLATES key.
  relation: str | None = None  # A RELATION_TEMPLATES key.
  landmark: NounPhrase | None = None

  @property
  def kind(self) -> str:
    if self.location:
      return 'location'
    return 'relation' if self.relation else 'attribute'


def _coordinate(obj: SceneObject, direction: str) -> float:
  axis, sign = _AXIS[direction]
  return sign * getattr(obj, axis)


def matches(expression: Expression, objects: Sequence[SceneObject],
            tolerance: float = 0.0) -> list[int]:
  """Indices of the objects `expression` may refer to.

  Args:
    expression: what is said.
    objects: the scene.
    tolerance: how loosely spatial words are read, in normalised units. For
      an absolute location, every candidate within `tolerance` of the extreme
      one qualifies (max(tolerance, 0)); for a relation, a candidate
      qualifies when it is on the named side of the landmark by more than
      -tolerance (so a negative tolerance demands a clear margin).

  Returns:
    Sorted indices; exactly one for an unambiguous expression.
  """
  candidates = [i for i, o in enumerate(objects)
                if expression.head.describes(o)]
  if expression.location:
    coordinate = {i: _coordinate(objects[i], expression.location)
                  for i in candidates}
    if not coordinate:
      return []
    best = min(coordinate.values())
    return [i for i in candidates
            if coordinate[i] <= best + max(tolerance, 0.0)]
  if expression.relation:
    landmarks = [j for j, o in enumerate(objects)
                 if expression.landmark.describes(o)]
    return sorted({
        i for i, j in itertools.product(candidates, landmarks)
        if i != j and _coordinate(objects[i], expression.relation) <
        _coordinate(objects[j], expression.relation) + tolerance})
  return candidates


def is_unambiguous(expression: Expression, objects: Sequence[SceneObject],
                   referent: int, margin: float) -> bool:
  """True when strict and lenient readings both pick exactly `referent`."""
  if expression.relation and len(
      matches(Expression(expression.landmark), objects)) != 1:
    return False  # The landmark itself must be unique.
  return all(matches(expression, objects, t) == [referent]
             for t in (-margin, margin))


def _realize_np(phrase: NounPhrase, size_word: int = 0) -> str:
  words = []
  if phrase.size:
    words.append(SIZE_WORDS[phrase.size][size_word % 2])
  if phrase.colour:
    words.append(phrase.colour)
  return ' '.join(words + [phrase.shape])


def templates(expression: Expression) -> tuple[str, ...]:
  """The templates that can realise `expression`."""
  if expression.location:
    return LOCATION_TEMPLATES[expression.location]
  if expression.relation:
    return RELATION_TEMPLATES[expression.relation]
  return ATTRIBUTE_TEMPLATES


def realize(expression: Expression, template: int = 0,
            size_word: int = 0) -> str:
  """The sentence for `expression` in its `template`-th surface form."""
  form = templates(expression)[template]
  landmark = expression.landmark
  return form.format(
      np=_realize_np(expression.head, size_word),
      lm=_realize_np(landmark, size_word) if landmark else '')


_SIZE_OF_WORD = {w: s for s, words in SIZE_WORDS.items() for w in words}
_NP_PATTERN = r'(?:(?:{sizes}) )?(?:(?:{colours}) )?(?:{shapes})'.format(
    sizes='|'.join(_SIZE_OF_WORD), colours='|'.join(COLOURS),
    shapes='|'.join(SHAPES))


def _template_regex(form: str) -> re.Pattern[str]:
  pattern = re.escape(form).replace(r'\{np\}', f'(?P<np>{_NP_PATTERN})')
  pattern = pattern.replace(r'\{lm\}', f'(?P<lm>{_NP_PATTERN})')
  return re.compile(pattern)


def _parse_np(text: str) -> NounPhrase:
  words = text.split()
  size = _SIZE_OF_WORD.get(words[0])
  colour = next((w for w in words if w in COLOURS), None)
  return NounPhrase(shape=words[-1], colour=colour, size=size)


_PARSERS = (
    [(_template_regex(f), None, None) for f in ATTRIBUTE_TEMPLATES] +
    [(_template_regex(f), where, None)
     for where, forms in LOCATION_TEMPLATES.items() for f in forms] +
    [(_template_regex(f), None, relation)
     for relation, forms in RELATION_TEMPLATES.items() for f in forms])


def parse(sentence: str) -> Expression:
  """Inverse of `realize`; raises ValueError naming an unknown sentence."""
  parsed = []
  for regex, location, relation in _PARSERS:
    match = regex.fullmatch(sentence)
    if match:
      groups = match.groupdict()
      parsed.append(Expression(
          head=_parse_np(groups['np']), location=location, relation=relation,
          landmark=_parse_np(groups['lm']) if relation else None))
  if len(parsed) != 1:
    raise ValueError(f'{len(parsed)} parses of ref_shapes sentence '
                     f'{sentence!r}; expected exactly one.')
  return parsed[0]


def vocabulary() -> list[str]:
  """Every word the templates can produce, sorted."""
  words = set(COLOURS) | set(SHAPES) | set(_SIZE_OF_WORD)
  for form in itertools.chain(ATTRIBUTE_TEMPLATES,
                              *LOCATION_TEMPLATES.values(),
                              *RELATION_TEMPLATES.values()):
    words.update(w for w in form.split() if not w.startswith('{'))
  return sorted(words)
