"""siamese-jax: Siamese and metric-learning training in JAX/Flax."""

__version__ = "0.1.0"
