"""Evaluation utilities for referring expression segmentation."""

from refseg_jax.evaluation.metrics import PREC_KEYS
from refseg_jax.evaluation.metrics import PREC_THRESHOLDS_TENTHS
from refseg_jax.evaluation.metrics import RESMetrics
from refseg_jax.evaluation.metrics import expression_stats
from refseg_jax.evaluation.metrics import resize_to_original

__all__ = [
  'PREC_KEYS',
  'PREC_THRESHOLDS_TENTHS',
  'RESMetrics',
  'expression_stats',
  'resize_to_original',
]
