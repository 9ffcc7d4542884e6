"""Flax models of refseg_jax."""
