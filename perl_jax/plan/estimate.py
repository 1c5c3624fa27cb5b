"""Analytic per-device memory of each trainer phase, from the model's dimensions alone.

The compiled figures of `perl_jax.plan` are the authority where a compiler is at hand; this is
the fallback (GPUs, or TPUs without libtpu) and a cross-check printed next to them. Every
figure is bytes per device. Notation: L layers, D embed, H query heads, K KV heads, h head dim,
F MLP width, V vocab, r LoRA rank, w bytes of the param/compute dtype; "rows" are sequences.

Sharding (the `perl_jax.sharding` layouts, assumed to divide evenly): params and optimizer
state are split over fsdp x tensor and replicated over data; rows are split over data x fsdp;
head, KV-head, MLP and vocab widths over tensor.

* Params: ``ModelConfig.num_params()`` x w for each distinct frozen checkpoint held (PPO's
  policy, reference, reward and value share one base when built on one checkpoint, PERL).
* Adapters: r x (fan-in + fan-out) per targeted kernel and layer, plus a scalar head (D).
  A LoRA factor is sharded like its side of the kernel: over fsdp where that side is the embed
  dimension, over tensor where it is heads or MLP width (so on a pure FSDP mesh the B factors
  of q, k, v, gate and up are replicated).
* Optimizer: AdamW keeps mu and nu like each trainable leaf (optax: same dtype), 2 x trainable.
* KV cache: 2 (k and v) x L x rows x K x h x (prompt + new tokens) x w.
* Training activations, per layer and token: what reverse-mode AD keeps for the backward pass,
  counted tensor by tensor in `perl_jax.models.transformer` the way Korthikanti et al. (2022,
  "Reducing Activation Recomputation in Large Transformer Models", section 4.1) count them
  for GPT, and checked against XLA's buffer assignment of the compiled PPO update:
  w x (2D + 2(H + K)h + 5F) for the two norm outputs, q, k, v, the attention output, and in a
  gated MLP the gate and up outputs, the activation's internal value (sigmoid or tanh) and
  output and the gated product (3F ungated); 8D for the two float32 norm inputs (the residual
  stream); H x S x (4 + w) for the attention probabilities (float32 softmax and its cast; S =
  key length); w x r per adapted kernel. No rematerialisation. Plus one layer's gradients
  while the backward pass runs (w x (3F + 2D) + H x S x (4 + w)), the float32 logits over the
  response positions five times (logits, log-softmax, softmax for the entropy, their
  gradients), and 3 x trainable for the gradient, its accumulator over microbatches and the
  optimizer's update.
* Forward-only phases (sampling, scoring) keep one layer's activations at a time:
  w x (2D + 2F) per token plus the attention scores H x S x (4 + w), the float32 logits three
  times (the projection, the response slice, the log-softmax), and, for float32 LoRA models,
  the adapters folded into float32 copies of the targeted kernels (`lora.inference_variables`).

* Sampling on an FSDP mesh (fsdp > 1) may hold the policy's weights unsharded over fsdp: XLA
  can gather every weight once, before the decode loop (loop-invariant), rather than layer by
  layer in every step. XLA:CPU does (its buffer assignment lists whole kernels), and the TPU
  v5e figures of a 0.5B model agree; counted, as an upper bound (BUILD_NOTES.md).

The estimate leaves out what XLA adds by scheduling (two independent forward passes of the
scoring phase may run side by side) and fusion; BUILD_NOTES.md compares it with compiled
figures.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from perl_jax.lora import LoraConfig
from perl_jax.models.config import ModelConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device of one phase; `total` is what must fit."""

  params: float = 0.0  # frozen weights
  trainable: float = 0.0  # adapters and heads (every weight for full fine-tuning)
  optimizer: float = 0.0
  kv_cache: float = 0.0
  activations: float = 0.0  # everything else the phase allocates: activations, gradients, ...

  @property
  def total(self) -> float:
    return self.params + self.trainable + self.optimizer + self.kv_cache + self.activations


@dataclasses.dataclass(frozen=True)
class Mesh:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  @property
  def param_shards(self) -> int:
    return self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    return self.data * self.fsdp


def kernels(cfg: ModelConfig) -> dict[str, tuple[tuple[int, str], tuple[int, str]]]:
  """{'attn/q': ((fan-in, side), (fan-out, side)), ...}: the projections of one layer that LoRA
  can target; a side is 'embed' (split over fsdp) or 'width' (heads, MLP: split over tensor)."""
  d, h, f = cfg.embed_dim, cfg.head_dim, cfg.mlp_dim
  e, w = (d, "embed"), lambda n: (n, "width")
  out = {"attn/q": (e, w(cfg.num_heads * h)), "attn/k": (e, w(cfg.num_kv_heads * h)),
         "attn/v": (e, w(cfg.num_kv_heads * h)), "attn/o": (w(cfg.num_heads * h), e),
         "mlp/up": (e, w(f)), "mlp/down": (w(f), e)}
  if cfg.gated_mlp:
    out["mlp/gate"] = (e, w(f))
  return out


def _targeted(cfg: ModelConfig, lora: LoraConfig) -> list[tuple[tuple[int, str], tuple[int, str]]]:
  return [sides for i in range(cfg.num_layers) for name, sides in kernels(cfg).items()
          if lora.targets_path(f"layers_{i}/{name}/kernel")]


def adapter_params(cfg: ModelConfig, lora: LoraConfig | None, mesh: Mesh | None = None) -> float:
  """LoRA parameters, r x (fan-in + fan-out) per targeted kernel; per device with `mesh`: the
  A factor is split like the kernel's input side, B like its output side."""
  if lora is None:
    return 0
  split = lambda side: 1 if mesh is None else mesh.fsdp if side == "embed" else mesh.tensor
  return sum(lora.rank * (i / split(i_side) + o / split(o_side))
             for (i, i_side), (o, o_side) in _targeted(cfg, lora))


def trainable_params(cfg: ModelConfig, lora: LoraConfig | None, mesh: Mesh | None = None) -> float:
  """Adapters plus a scalar head (D, split over fsdp) with LoRA; every parameter without (split
  over fsdp x tensor). Per device with `mesh`."""
  if lora is None:
    return cfg.num_params() / (1 if mesh is None else mesh.param_shards)
  head = cfg.embed_dim / (1 if mesh is None else mesh.fsdp) if cfg.head == "scalar" else 0
  return adapter_params(cfg, lora, mesh) + head


def merged_kernel_bytes(cfg: ModelConfig, lora: LoraConfig | None) -> int:
  """float32 copies of the targeted kernels that forward-only passes fold LoRA into."""
  if lora is None or cfg.param_dtype != "float32":
    return 0  # 16-bit kernels stay unmerged (lora.inference_variables)
  return 4 * sum(i * o for (i, _), (o, _) in _targeted(cfg, lora))


def kv_cache_bytes(cfg: ModelConfig, rows: int, length: int) -> int:
  return 2 * cfg.num_layers * rows * cfg.num_kv_heads * cfg.head_dim * length * _BYTES[cfg.dtype]


def _logits_bytes(cfg: ModelConfig, rows: int, positions: int, copies: int) -> int:
  return 0 if cfg.head == "scalar" else copies * rows * positions * cfg.vocab_size * 4


def train_activation_bytes(cfg: ModelConfig, lora: LoraConfig | None, rows: int, length: int,
                           logit_positions: int) -> int:
  """Activations of a forward + backward pass over rows x length tokens (see above)."""
  w, d, h, f = _BYTES[cfg.dtype], cfg.embed_dim, cfg.head_dim, cfg.mlp_dim
  attention = cfg.num_heads * length * (4 + w)  # probabilities, per token
  mlp = (5 if cfg.gated_mlp else 3) * f
  saved = w * (2 * d + 2 * (cfg.num_heads + cfg.num_kv_heads) * h + mlp) + 8 * d + attention
  working = w * ((3 if cfg.gated_mlp else 2) * f + 2 * d) + attention  # one layer's gradients
  adapted = 0 if lora is None else len(_targeted(cfg, lora)) * lora.rank * w
  return ((saved * cfg.num_layers + working + adapted) * rows * length
          + _logits_bytes(cfg, rows, logit_positions, 5))


def forward_activation_bytes(cfg: ModelConfig, rows: int, length: int, keys: int,
                             logit_positions: int) -> int:
  """The live activations of a forward pass, one layer at a time (see above)."""
  w = _BYTES[cfg.dtype]
  per_token = w * (2 * cfg.embed_dim + 2 * cfg.mlp_dim) + cfg.num_heads * keys * (4 + w)
  return per_token * rows * length + _logits_bytes(cfg, rows, logit_positions, 3)


# --- Phases -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
  cfg: ModelConfig  # with the head the trainer uses ('lm' or 'scalar')
  lora: LoraConfig | None


def state(bases: Sequence[ModelConfig], trained: Sequence[Model], frozen: Sequence[Model],
          mesh: Mesh) -> Memory:
  """What a trainer holds throughout: distinct frozen checkpoints, trainable trees (`trained`
  with optimizer state, `frozen` without: PPO's reward adapters), AdamW moments."""
  trainable = lambda m: trainable_params(m.cfg, m.lora, mesh) * _BYTES[m.cfg.param_dtype]
  return Memory(
      params=sum(b.num_params() * _BYTES[b.param_dtype] / mesh.param_shards for b in bases),
      trainable=sum(trainable(m) for m in (*trained, *frozen)),
      optimizer=sum(2 * trainable(m) for m in trained))


def _scaled(bytes_: float, mesh: Mesh, split_width: bool = True) -> float:
  """Row-proportional bytes per device (rows over data x fsdp; widths over tensor)."""
  return bytes_ / mesh.batch_shards / (mesh.tensor if split_width else 1)


def update(m: Model, rows: int, length: int, response: int, mesh: Mesh) -> float:
  """Transient bytes of one minibatch gradient step of `m` on `rows` rows (one microbatch)."""
  act = _scaled(train_activation_bytes(m.cfg, m.lora, rows, length, response), mesh)
  return act + 3 * trainable_params(m.cfg, m.lora, mesh) * _BYTES[m.cfg.param_dtype]


def generate(policy: Model, prompts: int, samples: int, prompt_len: int, new_tokens: int,
             mesh: Mesh) -> tuple[float, float]:
  """(KV cache, other transient bytes) of sampling `samples` responses to `prompts` prompts."""
  rows, total = prompts * samples, prompt_len + new_tokens
  kv = kv_cache_bytes(policy.cfg, rows, total) / mesh.batch_shards / mesh.tensor
  prefill = forward_activation_bytes(policy.cfg, prompts, prompt_len, prompt_len, 0)
  # A decode step; 9 bytes per row and step for the tokens, mask and log-probs written.
  decode = forward_activation_bytes(policy.cfg, rows, 1, total, 1) + rows * new_tokens * 9
  merged = merged_kernel_bytes(policy.cfg, policy.lora) / mesh.param_shards
  # FSDP: every decode step needs every weight; XLA may gather them once, before the decode
  # loop, so a device holds an unsharded copy (split over tensor only) while sampling.
  gathered = (policy.cfg.num_params() * _BYTES[policy.cfg.param_dtype] / mesh.tensor
              if mesh.fsdp > 1 else 0)
  return kv, merged + gathered + _scaled(max(prefill, decode), mesh)


def score(forwards: Sequence[tuple[Model, int]], rows: int, length: int, mesh: Mesh) -> float:
  """Transient bytes of the scoring forwards ((model, logit positions) each) over rows x length;
  every LoRA model's folded kernels counted as live together, activations one model at a time."""
  merged = sum(merged_kernel_bytes(m.cfg, m.lora) for m, _ in forwards) / mesh.param_shards
  act = max(forward_activation_bytes(m.cfg, rows, length, length, n) for m, n in forwards)
  return merged + _scaled(act, mesh)
