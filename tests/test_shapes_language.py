"""Hand-made scenes for the meaning of ref_shapes expressions."""

import pytest

from refseg_jax.data.ref_shapes import language as lang

Obj = lang.SceneObject
NP = lang.NounPhrase
E = lang.Expression

# Three circles in a row (two red), a star below the middle one.
SCENE = (Obj('circle', 'red', 'small', y=0.5, x=0.1),
         Obj('circle', 'blue', 'big', y=0.5, x=0.5),
         Obj('circle', 'red', 'big', y=0.5, x=0.9),
         Obj('star', 'green', 'small', y=0.8, x=0.55))


@pytest.mark.parametrize('sentence, expected', [
    ('the leftmost circle', [0]),
    ('the rightmost circle', [2]),
    ('the circle on the left', [0]),
    ('the red circle at the top', [0, 2]),  # Same height: ambiguous.
    ('the lowest circle', [0, 1, 2]),
    ('bottom star', [3]),
    ('the big red circle', [2]),
    ('red circle', [0, 2]),
    ('the circle left of the green star', [0, 1]),
    ('the circle right of the blue circle', [2]),
    ('the big circle above the star', [1, 2]),
    ('the star below the blue circle', [3]),
    ('star under the large circle', [3]),  # Two big circles: either works.
])
def test_matches(sentence, expected):
  assert lang.matches(lang.parse(sentence), SCENE) == expected


def test_tolerance_reads_spatial_words_strictly_or_leniently():
  left_of_star = E(NP('circle'), relation='left of', landmark=NP('star'))
  # The blue circle is only 0.05 left of the star.
  assert lang.matches(left_of_star, SCENE, tolerance=-0.1) == [0]
  assert lang.matches(left_of_star, SCENE, tolerance=0.0) == [0, 1]
  leftmost_big = E(NP('circle', size='big'), location='left')
  assert lang.matches(leftmost_big, SCENE, tolerance=0.0) == [1]
  assert lang.matches(leftmost_big, SCENE, tolerance=0.5) == [1, 2]


def test_is_unambiguous():
  assert lang.is_unambiguous(E(NP('circle'), location='left'), SCENE, 0, 0.06)
  # Too close to the landmark for a clear "right of".
  right_of = E(NP('star'), relation='right of', landmark=NP('circle', 'blue'))
  assert lang.matches(right_of, SCENE) == [3]
  assert not lang.is_unambiguous(right_of, SCENE, 3, 0.06)
  # "the red circle" names two objects, so it cannot serve as a landmark.
  above_red = E(NP('star'), relation='below', landmark=NP('circle', 'red'))
  assert not lang.is_unambiguous(above_red, SCENE, 3, 0.06)


def test_realize_parse_round_trip_over_every_template():
  heads = [NP('star'), NP('star', 'red'), NP('star', 'red', 'big'),
           NP('hexagon', size='small')]
  expressions = [E(h) for h in heads]
  expressions += [E(h, location=w) for h in heads
                  for w in lang.LOCATION_TEMPLATES]
  expressions += [E(h, relation=r, landmark=NP('circle', 'cyan'))
                  for h in heads for r in lang.RELATION_TEMPLATES]
  for expression in expressions:
    for template in range(len(lang.templates(expression))):
      for size_word in (0, 1):
        sentence = lang.realize(expression, template, size_word)
        assert lang.parse(sentence) == expression, sentence


def test_parse_rejects_unknown_sentences_naming_them():
  with pytest.raises(ValueError, match='the purple unicorn'):
    lang.parse('the purple unicorn')
