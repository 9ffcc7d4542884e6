"""`ref_shapes`, the built-in benchmark (docs/ref_shapes.md).

    builder.py    the TFDS builder (`ref_shapes`, `ref_shapes/tiny`) and its
                  WordPiece vocabulary, vocab.txt
    scene.py      procedural scenes: shapes, colours, occlusion, masks
    language.py   the expression language: meaning, templates, parser
"""
