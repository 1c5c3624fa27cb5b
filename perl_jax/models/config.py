"""One configuration dataclass describes every supported decoder family.

The families differ in a handful of switches (norm type, gated MLP, biases, position scheme,
soft-capping, sliding windows), so a single `ModelConfig` plus a small preset per family keeps
the model code free of `if family == ...` branches: the modules read the switches, never the
family name. `perl_jax.models.hf` maps Hugging Face `config.json` files onto these fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

FAMILIES = ("llama", "gemma", "gemma2", "qwen2", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer. Frozen so it can be a static jit argument."""

  family: str
  vocab_size: int
  embed_dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  # Normalisation.
  norm: str = "rms"  # "rms" | "layer"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False  # Gemma scales by (1 + w)
  sandwich_norms: bool = False  # Gemma 2: extra norms after attention and MLP
  # MLP.
  activation: str = "silu"  # "silu" | "gelu" | "gelu_tanh"
  gated_mlp: bool = True
  mlp_bias: bool = False
  # Attention.
  qkv_bias: bool = False
  out_bias: bool = False
  query_scale: float | None = None  # None: head_dim ** -0.5
  attn_softcap: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None  # per layer "full" | "sliding"; None: all full
  # Positions.
  positions: str = "rope"  # "rope" | "learned"
  max_positions: int = 2048
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  # Embeddings and output.
  tie_embeddings: bool = False
  scale_embeddings: bool = False  # Gemma multiplies embeddings by sqrt(embed_dim)
  final_softcap: float | None = None
  head: str = "lm"  # "lm": next-token logits | "scalar": one value per token (value/reward)
  # Special tokens (metadata carried for samplers and trainers).
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # Numerics.
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"

  def __post_init__(self):
    problems = []
    if self.family not in FAMILIES:
      problems.append(f"family={self.family!r} is not one of {FAMILIES}")
    if self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.norm not in ("rms", "layer"):
      problems.append(f"norm={self.norm!r} must be 'rms' or 'layer'")
    if self.activation not in ("silu", "gelu", "gelu_tanh"):
      problems.append(f"activation={self.activation!r} must be 'silu', 'gelu' or 'gelu_tanh'")
    if self.positions not in ("rope", "learned"):
      problems.append(f"positions={self.positions!r} must be 'rope' or 'learned'")
    if self.rope_type not in ROPE_TYPES:
      problems.append(f"rope_type={self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
    if self.head not in ("lm", "scalar"):
      problems.append(f"head={self.head!r} must be 'lm' or 'scalar'")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
      if set(self.layer_types) - {"full", "sliding"}:
        problems.append(f"layer_types={self.layer_types} may only hold 'full' and 'sliding'")
      if "sliding" in self.layer_types and not self.sliding_window:
        problems.append("layer_types has sliding layers but sliding_window is not set")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        problems.append(f"{name}={getattr(self, name)!r} is not one of {tuple(_DTYPES)}")
    if problems:
      raise ValueError("Invalid ModelConfig: " + "; ".join(problems))

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    return _DTYPES[self.param_dtype]

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def is_sliding(self, layer: int) -> bool:
    return self.layer_types is not None and self.layer_types[layer] == "sliding"

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count computed from the architecture (no arrays needed)."""
    d, h = self.embed_dim, self.head_dim
    attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.num_heads + 2 * self.num_kv_heads)
    if self.out_bias:
      attn += d
    mlp = d * self.mlp_dim * (3 if self.gated_mlp else 2)
    if self.mlp_bias:
      mlp += self.mlp_dim * (2 if self.gated_mlp else 1) + d
    norm = d * (2 if self.norm == "layer" else 1)
    per_layer = attn + mlp + norm * (4 if self.sandwich_norms else 2)
    total = self.num_layers * per_layer + norm + self.vocab_size * d
    if self.positions == "learned":
      total += self.max_positions * d
    if self.head == "scalar":
      total += d
    elif not self.tie_embeddings:
      total += self.vocab_size * d
    return total


def tiny_config(family: str, **overrides: Any) -> ModelConfig:
  """A few-thousand-parameter model of `family` with every family switch turned on.

  Used by tests, demos and benchmarks. The values are deliberately non-default where a
  loader could silently ignore them (rope_theta, rope scaling, small sliding windows).
  """
  base = dict(family=family, vocab_size=128, embed_dim=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, mlp_dim=128, max_positions=256, rope_theta=20000.0,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
  base.update(FAMILY_DEFAULTS[family])
  if family == "gemma2":
    base.update(sliding_window=8, layer_types=("sliding", "full"))
  if family == "gpt2":
    base.update(num_kv_heads=base["num_heads"])  # GPT-2 checkpoints cannot express GQA
  base.update(overrides)
  return ModelConfig(**base)


# The switches that define each family; sizes come from the checkpoint's config.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(norm="rms", activation="silu", gated_mlp=True),
    "qwen2": dict(norm="rms", activation="silu", gated_mlp=True, qkv_bias=True),
    "gemma": dict(norm="rms", norm_plus_one=True, activation="gelu_tanh", gated_mlp=True,
                  tie_embeddings=True, scale_embeddings=True),
    "gemma2": dict(norm="rms", norm_plus_one=True, activation="gelu_tanh", gated_mlp=True,
                   tie_embeddings=True, scale_embeddings=True, sandwich_norms=True,
                   attn_softcap=50.0, final_softcap=30.0),
    "gpt2": dict(norm="layer", norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False,
                 mlp_bias=True, qkv_bias=True, out_bias=True, positions="learned",
                 tie_embeddings=True),
}
