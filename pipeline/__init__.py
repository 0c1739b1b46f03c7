"""jax-pipeline: one config from a laptop CPU to a TPU pod or a rack of GPU nodes."""
