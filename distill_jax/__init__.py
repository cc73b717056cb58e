"""distill-jax."""
