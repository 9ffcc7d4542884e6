"""refseg_jax: referring expression segmentation in JAX/Flax."""
