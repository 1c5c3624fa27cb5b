"""Decoder models (Flax linen, pure-functional) and Hugging Face checkpoint interop."""

from perl_jax.models.config import FAMILIES, ModelConfig, tiny_config
from perl_jax.models.hf import load_hf_checkpoint, save_hf_checkpoint
from perl_jax.models.transformer import Linear, Transformer, init_cache, init_params, logical_axes

__all__ = ["FAMILIES", "ModelConfig", "tiny_config", "Linear", "Transformer", "init_cache",
           "init_params", "logical_axes", "load_hf_checkpoint", "save_hf_checkpoint"]
