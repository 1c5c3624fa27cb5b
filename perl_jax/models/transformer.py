"""A decoder-only transformer covering Llama 2/3, Gemma 1/2, Qwen2/2.5 and GPT-2.

The model knows nothing of training: it maps token ids to next-token logits (``head='lm'``)
or to one scalar per token (``head='scalar'``, for value and reward models). Params are a
plain nested dict used through ``model.apply({'params': params}, tokens_BxT, ...)``.

Shape suffixes: B batch, T query length, S key (cache) length, D embed, N query heads,
K key/value heads, G = N // K query heads per KV head, H head dim, F MLP width, V vocab.

* Every parameter is created with logical axis names (``vocab``, ``embed``, ``heads``,
  ``kv_heads``, ``head_dim``, ``mlp``, ...) so `perl_jax.sharding` can map them to a mesh with
  one rules table; activations carry logical constraints that are no-ops without a mesh.
* Attention takes a padding mask and explicit position ids, so left-padded prompts work.
  Causality and sliding windows are defined on slot indices (as in transformers), padding on
  the mask, rotary phases on the position ids.
* A KV cache of static shape can be passed in; the call then writes its keys and values at
  ``cache['index']`` and returns the updated cache. Prefill and decode are the same code.
* Norms, softmax and logits run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import lora as lora_lib
from perl_jax.lora import LoraConfig
from perl_jax.models.config import ModelConfig

Cache = dict[str, Any]
_NEG_INF = float(np.finfo(np.float32).min)  # finite, so fully masked (padding) rows stay finite


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint; a no-op unless logical axis rules and a mesh are active."""
  return nn.with_logical_constraint(x, axes)


class Linear(nn.Module):
  """y = x W (+ b) contracting the trailing len(in_axes) dims of x, with an optional LoRA adapter.

  The kernel has shape in_shape + features. When the model holds a `LoraConfig` and the call
  supplies a 'lora' collection with this layer's {'a', 'b'}, it adds scale * (x A) B.
  """

  features: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = 0.02
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_axes)
    in_shape = x.shape[x.ndim - n_in:]
    kernel = self.param("kernel",
                        nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                     self.in_axes + self.out_axes),
                        in_shape + self.features, self.param_dtype)
    x = x.astype(self.dtype)
    adapter = self._adapter(x, in_shape) if self._adapted() else None
    if (adapter is not None and adapter[0] is x
        and all(v.dtype == jnp.float32 for v in (x, kernel, adapter[1], adapter[2]))):
      # No dropout, float32: one matmul by the merged kernel (see lora.adapted_matmul).
      _, a, b, scale = adapter
      lead, k = x.shape[:x.ndim - n_in], int(np.prod(in_shape))
      y = lora_lib.adapted_matmul(x.reshape(-1, k), kernel.reshape(k, -1), a.reshape(k, -1),
                                  b.reshape(b.shape[0], -1), scale)
      y = y.reshape(lead + self.features)
      adapter = None
    else:
      y = _contract(x, kernel.astype(self.dtype), n_in)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.out_axes),
                        self.features, self.param_dtype)
      y = y + bias.astype(self.dtype)
    if adapter is not None:  # y + scale * (x A) B, unmerged
      x_in, a, b, scale = adapter
      y = y + scale * _contract(_contract(x_in, a.astype(self.dtype), n_in),
                                b.astype(self.dtype), 1)
    return y

  def _adapted(self) -> bool:
    if self.is_mutable_collection("lora") and self.lora is not None:
      return self.lora.targets_path("/".join(self.path) + "/kernel")  # being created
    if self.has_variable("lora", "a"):
      if self.lora is None:
        raise ValueError(f"LoRA adapter given for {'/'.join(self.path)} but the model was built "
                         "without lora=LoraConfig(...)")
      return True
    return False

  def _adapter(self, x: jax.Array, in_shape: tuple[int, ...]):
    """(adapter input after dropout, A, B, scale); creates A and B when 'lora' is mutable."""
    r = self.lora.rank
    fan_in = int(np.prod(in_shape))
    a = self.variable("lora", "a",
                      nn.with_logical_partitioning(nn.initializers.normal(fan_in ** -0.5),
                                                   self.in_axes + ("lora_rank",)),
                      self.make_rng("lora_init") if self.is_mutable_collection("lora") else None,
                      in_shape + (r,), self.param_dtype).value
    b = self.variable("lora", "b",
                      nn.with_logical_partitioning(nn.initializers.zeros,
                                                   ("lora_rank",) + self.out_axes),
                      None, (r,) + self.features, self.param_dtype).value
    a, b = nn.meta.unbox(a), nn.meta.unbox(b)
    if self.lora.dropout > 0 and self.has_rng("lora_dropout"):
      keep = jax.random.bernoulli(self.make_rng("lora_dropout"), 1.0 - self.lora.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora.dropout), 0.0).astype(x.dtype)
    return x, a, b, self.lora.alpha / a.shape[-1]


def _contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
  """Contracts the last n dims of x with the first n dims of w, as ONE 2-D matmul.

  Flattening first matters for speed: with 3-D dot_generals, XLA:CPU materialises transposed
  copies of the activation gradients for the weight gradients (LoRA updates spent more time
  copying than multiplying).
  """
  lead, inner, out = x.shape[:x.ndim - n], w.shape[:n], w.shape[n:]
  k = int(np.prod(inner))
  y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1))
  return y.reshape(lead + out)


class Norm(nn.Module):
  """RMSNorm (optionally Gemma's (1 + w) scale) or LayerNorm, computed in float32."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    d = x.shape[-1]
    init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (d,),
                       cfg.weight_dtype).astype(jnp.float32)
    h = x.astype(jnp.float32)
    if cfg.norm == "layer":
      h = h - h.mean(-1, keepdims=True)
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_plus_one:
      return (h * (1.0 + scale)).astype(x.dtype)
    if cfg.norm == "layer":
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (d,), cfg.weight_dtype).astype(jnp.float32)
      return (h * scale + bias).astype(x.dtype)
    # Llama casts to the input dtype before the scale; identical in float32.
    return scale.astype(x.dtype) * h.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies, float32, including linear and Llama-3 scaling."""
  h = cfg.head_dim
  inv = (1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.int64).astype(np.float32) / h)))
  inv = inv.astype(np.float32)
  if cfg.rope_type == "linear":
    inv = inv / cfg.rope_factor
  elif cfg.rope_type == "llama3":
    old = cfg.rope_original_max_positions
    low_wavelen = old / cfg.rope_low_freq_factor
    high_wavelen = old / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
    smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  return inv


def rope_cos_sin(positions_BxT: jax.Array, inv_freq: np.ndarray, dtype: Any,
                 num_positions: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each B x T x 1 x H, of position * inv_freq in the 'rotate_half' layout of HF.

  Computed once per forward and shared by every layer's queries and keys: sine and cosine are
  costly on CPU (XLA:CPU calls the C library once per element), and XLA had fused a fresh copy
  of them into each layer's q and k. When every position is known to lie in
  ``[0, num_positions)`` and that table is smaller than B x T, the table is computed and rows
  are gathered from it: the same float32 products and the same cos / sin, for 2B times fewer
  calls in a full-sequence forward (and none again in its backward pass). Alone the two paths
  agree exactly; inside a compiled forward XLA fuses them differently, and the outputs agree
  to ~1e-7.
  """
  b, t = positions_BxT.shape
  inv = jnp.asarray(inv_freq)
  if num_positions is not None and num_positions < b * t:
    freqs_LxH = jnp.arange(num_positions, dtype=jnp.int32).astype(jnp.float32)[:, None] * inv
    emb_LxH = jnp.concatenate([freqs_LxH, freqs_LxH], axis=-1)
    rows = lambda table_LxH: jnp.take(table_LxH, positions_BxT, axis=0)[:, :, None, :]
    return rows(jnp.cos(emb_LxH)).astype(dtype), rows(jnp.sin(emb_LxH)).astype(dtype)
  freqs = positions_BxT.astype(jnp.float32)[..., None] * inv[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # B x T x 1 x H
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates pairs (i, i + H/2) by the angles of `rope_cos_sin`."""
  cos, sin = cos_sin
  x1, x2 = jnp.split(x_BxTxNxH, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x_BxTxNxH * cos.astype(x_BxTxNxH.dtype) + rotated * sin.astype(x_BxTxNxH.dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               allowed_BxTxS: jax.Array, kv_cache: Cache | None, cache_index: jax.Array | None,
               queries_from: int = 0):
    """Keys and values for all T positions; queries (and outputs) for ``queries_from:``."""
    cfg = self.cfg
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dense = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, lora=self.lora)
    x_q = x_BxTxD[:, queries_from:]
    q = Linear((n, h), ("embed",), ("heads", "head_dim"), cfg.qkv_bias, name="q", **dense)(x_q)
    kk = Linear((k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, name="k", **dense)(x_BxTxD)
    v = Linear((k, h), ("embed",), ("kv_heads", "head_dim"), cfg.qkv_bias, name="v", **dense)(x_BxTxD)
    if rope is not None:
      q = apply_rope(q, tuple(r[:, queries_from:] for r in rope))
      kk = apply_rope(kk, rope)
    allowed_BxTxS = allowed_BxTxS[:, queries_from:]
    q = constrain(q, ("batch", "length", "heads", "head_dim"))

    new_cache = None
    if kv_cache is not None:
      start = (0, cache_index, 0, 0)
      kk = jax.lax.dynamic_update_slice(kv_cache["k"], kk.astype(kv_cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(kv_cache["v"], v.astype(kv_cache["v"].dtype), start)
      kk = constrain(kk, ("batch", "cache_length", "kv_heads", "head_dim"))
      v = constrain(v, ("batch", "cache_length", "kv_heads", "head_dim"))
      new_cache = {"k": kk, "v": v}

    b, t = q.shape[:2]
    q_BxTxKxGxH = q.reshape(b, t, k, n // k, h)
    scale = cfg.query_scale if cfg.query_scale is not None else h ** -0.5
    logits = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, kk.astype(q.dtype),
                        preferred_element_type=jnp.float32) * scale
    logits = softcap(logits, cfg.attn_softcap)
    logits = jnp.where(allowed_BxTxS[:, None, None, :, :], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(cfg.compute_dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(cfg.compute_dtype)).reshape(b, t, n, h)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    y = Linear((cfg.embed_dim,), ("heads", "head_dim"), ("embed",), cfg.out_bias, name="o",
               **dense)(out)
    return y, new_cache


class Mlp(nn.Module):
  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = dict(use_bias=cfg.mlp_bias, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                 lora=self.lora)
    act = {"silu": jax.nn.silu,
           "gelu": lambda z: jax.nn.gelu(z, approximate=False),
           "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True)}[cfg.activation]
    up = Linear((cfg.mlp_dim,), ("embed",), ("mlp",), name="up", **dense)(x_BxTxD)
    if cfg.gated_mlp:
      h_BxTxF = act(Linear((cfg.mlp_dim,), ("embed",), ("mlp",), name="gate", **dense)(x_BxTxD)) * up
    else:
      h_BxTxF = act(up)
    h_BxTxF = constrain(h_BxTxF, ("batch", "length", "mlp"))
    return Linear((cfg.embed_dim,), ("mlp",), ("embed",), name="down", **dense)(h_BxTxF)


class Block(nn.Module):
  cfg: ModelConfig
  layer: int
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x_BxTxD, rope, allowed_BxTxS, kv_cache, cache_index, queries_from: int = 0):
    """Returns the residual stream of positions ``queries_from:`` (see Attention)."""
    cfg = self.cfg
    h = Norm(cfg, name="attn_norm")(x_BxTxD)
    h, new_cache = Attention(cfg, self.lora, name="attn")(h, rope, allowed_BxTxS,
                                                        kv_cache, cache_index, queries_from)
    if cfg.sandwich_norms:
      h = Norm(cfg, name="post_attn_norm")(h)
    x_BxTxD = x_BxTxD[:, queries_from:] + h
    h = Mlp(cfg, self.lora, name="mlp")(Norm(cfg, name="mlp_norm")(x_BxTxD))
    if cfg.sandwich_norms:
      h = Norm(cfg, name="post_mlp_norm")(h)
    x_BxTxD = constrain(x_BxTxD + h, ("batch", "length", "embed"))
    return x_BxTxD, new_cache


class Transformer(nn.Module):
  """Decoder-only LM (head='lm': float32 logits B x T x V) or scalar model (B x T values).

  Call: ``apply({'params': p[, 'lora': adapters]}, tokens_BxT, positions_BxT=None,
  mask_BxT=None, cache=None, outputs_from=0)``. `mask_BxT` marks real tokens (1) versus
  padding (0); positions default to ``cumsum(mask) - 1`` (right for left-padded rows). With a
  cache (see `init_cache`), returns ``(outputs, new_cache)``; without, just the outputs.
  `outputs_from` (a Python int) returns outputs for positions ``outputs_from:`` only, so a
  caller that needs the response's logits pays for no vocabulary projection of the prompt.
  """

  cfg: ModelConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               mask_BxT: jax.Array | None = None, cache: Cache | None = None,
               outputs_from: int = 0):
    cfg = self.cfg
    b, t = tokens_BxT.shape
    mask_BxT = jnp.ones((b, t), bool) if mask_BxT is None else mask_BxT.astype(bool)
    num_positions = None  # a bound on the positions, where known (a cheaper rotary table)
    if positions_BxT is None:
      if cache is not None:
        raise ValueError("pass positions_BxT explicitly when decoding with a cache")
      positions_BxT = jnp.maximum(jnp.cumsum(mask_BxT, axis=-1) - 1, 0)
      num_positions = t
    positions_BxT = positions_BxT.astype(jnp.int32)

    # Which key slots each query may attend to: real (mask), causal and, per layer, in-window.
    if cache is None:
      index = None
      keys_BxS = mask_BxT
      q_slot, k_slot = jnp.arange(t), jnp.arange(t)
    else:
      index = cache["index"]
      keys_BxS = jax.lax.dynamic_update_slice(cache["mask"], mask_BxT, (0, index))
      q_slot, k_slot = index + jnp.arange(t), jnp.arange(keys_BxS.shape[1])
    causal_TxS = k_slot[None, :] <= q_slot[:, None]
    full_BxTxS = keys_BxS[:, None, :] & causal_TxS[None]
    sliding_BxTxS = None
    if cfg.sliding_window:
      in_window = (q_slot[:, None] - k_slot[None, :]) < cfg.sliding_window
      sliding_BxTxS = full_BxTxS & in_window[None]

    embed = Embed(cfg, name="embed")
    x = embed(tokens_BxT)
    if cfg.scale_embeddings:
      x = x * jnp.asarray(cfg.embed_dim ** 0.5, cfg.compute_dtype)
    if cfg.positions == "learned":
      x = x + Embed(cfg, num=cfg.max_positions, axis_name="positions", name="pos_embed")(positions_BxT)
    x = constrain(x, ("batch", "length", "embed"))

    rope = (rope_cos_sin(positions_BxT, rope_inv_freq(cfg), cfg.compute_dtype, num_positions)
            if cfg.positions == "rope" else None)
    new_cache = {} if cache is not None else None
    for i in range(cfg.num_layers):
      allowed = sliding_BxTxS if cfg.is_sliding(i) else full_BxTxS
      name = f"layers_{i}"
      # The last block computes queries, MLP and residual only where outputs are read: its
      # keys and values still cover every position (and fill the cache).
      last = i == cfg.num_layers - 1
      x, layer_cache = Block(cfg, i, self.lora, name=name)(
          x, rope, allowed, None if cache is None else cache[name], index,
          outputs_from if last else 0)
      if cache is not None:
        new_cache[name] = layer_cache
    x = Norm(cfg, name="final_norm")(x)

    if cfg.head == "scalar":
      out = Linear((1,), ("embed",), ("score",), dtype=cfg.compute_dtype,
                   param_dtype=cfg.weight_dtype, init_std=(cfg.embed_dim + 1) ** -0.5,
                   name="score")(x)
      out = out[..., 0].astype(jnp.float32)
    else:
      if cfg.tie_embeddings:
        out = embed.attend(x)
      else:
        out = Linear((cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.compute_dtype,
                     param_dtype=cfg.weight_dtype, name="lm_head")(x)
      out = softcap(out.astype(jnp.float32), cfg.final_softcap)
      out = constrain(out, ("batch", "length", "vocab"))

    if cache is None:
      return out
    new_cache["mask"] = keys_BxS
    new_cache["index"] = index + t
    return out, new_cache


class Embed(nn.Module):
  """Lookup table (vocab or positions) x embed; `attend` gives tied-embedding logits."""

  cfg: ModelConfig
  num: int | None = None
  axis_name: str = "vocab"

  def setup(self):
    num = self.num or self.cfg.vocab_size
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                  (self.axis_name, "embed")),
        (num, self.cfg.embed_dim), self.cfg.weight_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, ids, axis=0).astype(self.cfg.compute_dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x, self.embedding.astype(x.dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any = None) -> Cache:
  """An empty KV cache of static shape: `length` slots per row for every layer."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  cache: Cache = {f"layers_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                  for i in range(cfg.num_layers)}
  cache["mask"] = jnp.zeros((batch, length), bool)
  cache["index"] = jnp.zeros((), jnp.int32)
  return cache


def init_params(model: Transformer, rng: jax.Array) -> dict:
  """Random params as plain arrays (logical axis boxes removed)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  return nn.meta.unbox(jax.jit(model.init)(rng, tokens)["params"])


def logical_axes(model: Transformer) -> dict:
  """The logical axis names of every parameter, as a tree of PartitionSpecs (no compute)."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
  return nn.get_partition_spec(abstract)["params"]
