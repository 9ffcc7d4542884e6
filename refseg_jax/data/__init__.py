"""Datasets (TFDS builders), their shared schema and the input pipeline."""
