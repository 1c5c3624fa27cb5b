"""perl_jax: parameter-efficient RLHF (PPO with LoRA) in JAX."""

__version__ = "0.1.0"
