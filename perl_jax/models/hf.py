"""Hugging Face checkpoint interop: load `config.json` + safetensors into perl_jax, and save back.

Design
------
* One table per family, built by `_tensor_specs`, lists every Hugging Face tensor of a
  checkpoint: its name, its torch-layout shape, the perl_jax param leaves it becomes and the two
  layout conversions (HF -> ours, ours -> HF). Loading and saving both read this one table, so
  they cannot drift apart, and validation is a set comparison against it: every missing,
  unexpected or mis-shaped tensor is reported by name, all at once, before any tensor is read.
* Loading never returns a partial tree: after conversion the tree is compared (structure and
  shapes) with ``jax.eval_shape`` of `init_params(Transformer(cfg))`.
* `config.json` is parsed by hand, not through the installed transformers, so both formats load:
  transformers 5 (``rope_parameters``) and transformers 4 / older files (``rope_theta`` +
  ``rope_scaling``). Settings the model cannot reproduce (yarn or dynamic RoPE, Qwen2 sliding
  windows, GPT-2 attention variants, ...) are errors naming the key, never silently dropped.
* Saving builds `config.json` with the installed transformers' own config class, so the file is
  in that version's format, and checks that re-parsing it gives back the same `ModelConfig`
  (a setting the family cannot express is an error instead of a silently different model).
* Layouts: torch `nn.Linear` weights are (out, in) and are transposed; GPT-2's `Conv1D` weights
  are already (in, out). Head axes are split out of the flat projection dims, e.g.
  ``q_proj.weight`` (N*H, D) <-> ``attn/q/kernel`` (D, N, H). Arrays stay on the host (numpy,
  ml_dtypes bfloat16) so nothing is placed on an accelerator until the caller shards it.
* Quirks kept as transformers has them: Gemma 1's legacy ``hidden_act: "gelu"`` means the tanh
  approximation; stored non-persistent buffers (GPT-2 ``attn.bias`` / ``attn.masked_bias``,
  old Llama-style ``rotary_emb.inv_freq``) are skipped, since they are derived, not learned.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from perl_jax.lora import LoraConfig, merge
from perl_jax.models.config import FAMILY_DEFAULTS, ModelConfig
from perl_jax.models.transformer import Transformer, init_params

Params = dict[str, Any]
PathLike = str | os.PathLike

__all__ = ["CheckpointError", "load_hf_checkpoint", "save_hf_checkpoint", "check_hf_checkpoint",
           "config_from_hf", "read_hf_config", "SUPPORTED_ARCHITECTURES"]

# Hugging Face class -> (family, head). Family names equal the HF `model_type`.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "lm"),
    "LlamaForSequenceClassification": ("llama", "scalar"),
    "GemmaForCausalLM": ("gemma", "lm"),
    "GemmaForSequenceClassification": ("gemma", "scalar"),
    "Gemma2ForCausalLM": ("gemma2", "lm"),
    "Gemma2ForSequenceClassification": ("gemma2", "scalar"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "Qwen2ForSequenceClassification": ("qwen2", "scalar"),
    "GPT2LMHeadModel": ("gpt2", "lm"),
    "GPT2ForSequenceClassification": ("gpt2", "scalar"),
}
_ARCH_OF = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}

# HF activation names -> ours. Gemma 1's legacy `hidden_act: "gelu"` is handled separately.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_GPT2_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint (or a ModelConfig to be saved as one) that perl_jax cannot load faithfully."""


# ----------------------------------------------------------------------------- config.json


def _get(hf: dict, key: str, default: Any = None) -> Any:
  value = hf.get(key)
  return default if value is None else value


def _require(hf: dict, *keys: str) -> Any:
  """The first of `keys` present in config.json; an error naming them if none is."""
  for key in keys:
    if hf.get(key) is not None:
      return hf[key]
  raise CheckpointError(f"config.json has no {' / '.join(repr(k) for k in keys)}")


def _architecture(hf: dict) -> tuple[str, str, str]:
  """(HF class name, family, head) from `architectures` (or `model_type` when that is absent)."""
  archs = hf.get("architectures") or []
  model_type = hf.get("model_type")
  if not archs:
    if (model_type, "lm") in _ARCH_OF:
      archs = [_ARCH_OF[(model_type, "lm")]]
    else:
      raise CheckpointError(f"config.json names no 'architectures' and its "
                            f"model_type={model_type!r} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
  if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
    raise CheckpointError(f"unsupported architecture {archs} in config.json 'architectures' "
                          f"(supported: {sorted(SUPPORTED_ARCHITECTURES)})")
  family, head = SUPPORTED_ARCHITECTURES[archs[0]]
  if model_type is not None and model_type != family:
    raise CheckpointError(f"config.json model_type={model_type!r} does not match architecture "
                          f"{archs[0]} (expected model_type={family!r})")
  return archs[0], family, head


def _activation(name: str, key: str) -> str:
  if name not in _ACTIVATIONS:
    raise CheckpointError(f"config.json {key}={name!r} is not supported "
                          f"(supported: {sorted(_ACTIVATIONS)})")
  return _ACTIVATIONS[name]


def _rope(hf: dict) -> dict[str, Any]:
  """ModelConfig RoPE fields from either config format.

  transformers 5: ``rope_parameters = {rope_type, rope_theta, factor, ...}``. transformers 4:
  top-level ``rope_theta`` plus ``rope_scaling = {type | rope_type, factor, ...}`` (or null).
  As in transformers, `rope_scaling` wins when both are given.
  """
  params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
  key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  if not isinstance(params, dict):
    raise CheckpointError(f"config.json {key}={params!r} is not a dict")
  if params and all(isinstance(v, dict) or v is None for v in params.values()):
    # Per-layer-type parameters ({"full_attention": {...}, ...}): one rotary for all layers only.
    distinct = [v for v in params.values() if v is not None]
    if any(v != distinct[0] for v in distinct):
      raise CheckpointError(f"config.json {key} differs per layer type ({sorted(params)}); "
                            "per-layer RoPE is not supported")
    params = distinct[0] if distinct else {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = params.get("rope_theta", _get(hf, "rope_theta", 10000.0))
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
  if partial is not None and partial != 1.0:
    raise CheckpointError(f"config.json partial_rotary_factor={partial} is not supported "
                          "(rotary on the whole head only)")
  out: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
  if rope_type == "default":
    pass
  elif rope_type == "linear":
    out["rope_factor"] = float(_require(params, "factor"))
  elif rope_type == "llama3":
    for ours, theirs in (("rope_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                         ("rope_high_freq_factor", "high_freq_factor")):
      if params.get(theirs) is None:
        raise CheckpointError(f"config.json {key} of rope_type 'llama3' has no {theirs!r}")
      out[ours] = float(params[theirs])
    # transformers falls back to max_position_embeddings (a top-level value has priority).
    original = _get(hf, "original_max_position_embeddings",
                    params.get("original_max_position_embeddings",
                               hf.get("max_position_embeddings")))
    if original is None:
      raise CheckpointError(f"config.json {key} of rope_type 'llama3' has no "
                            "'original_max_position_embeddings'")
    out["rope_original_max_positions"] = int(original)
  else:
    raise CheckpointError(f"config.json {key}['rope_type']={rope_type!r} is not supported "
                          "(supported: default, linear, llama3)")
  return out


def _num_labels(hf: dict) -> int:
  # transformers writes id2label rather than num_labels; with neither its default is 2.
  if hf.get("num_labels") is not None:
    return int(hf["num_labels"])
  if hf.get("id2label"):
    return len(hf["id2label"])
  return 2


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of a parsed Hugging Face `config.json` (params in `dtype`)."""
  arch, family, head = _architecture(hf)
  if head == "scalar" and _num_labels(hf) != 1:
    raise CheckpointError(f"{arch} has num_labels={_num_labels(hf)}; only num_labels=1 (one scalar "
                          "per sequence: a reward or value model) is supported")
  fields: dict[str, Any] = dict(FAMILY_DEFAULTS[family])
  fields.update(family=family, head=head, dtype=dtype, param_dtype=dtype,
                vocab_size=int(_require(hf, "vocab_size")),
                bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"))
  eos = hf.get("eos_token_id")
  fields["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos

  if family == "gpt2":
    for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                     ("scale_attn_weights", False), ("add_cross_attention", True)):
      if hf.get(key, not bad) == bad:
        raise CheckpointError(f"config.json {key}={bad} is not supported for GPT-2")
    d = int(_require(hf, "n_embd", "hidden_size"))
    heads = int(_require(hf, "n_head", "num_attention_heads"))
    if d % heads:
      raise CheckpointError(f"config.json n_embd={d} is not a multiple of n_head={heads}")
    act = _get(hf, "activation_function", "gelu_new")
    fields.update(embed_dim=d, num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                  num_layers=int(_require(hf, "n_layer", "num_hidden_layers")),
                  mlp_dim=int(_get(hf, "n_inner", 4 * d)),
                  max_positions=int(_require(hf, "n_positions", "max_position_embeddings")),
                  norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5)),
                  activation=_activation(act, "activation_function"),
                  tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)))
    return _make_config(fields)

  d, heads = int(_require(hf, "hidden_size")), int(_require(hf, "num_attention_heads"))
  default_head_dim = 256 if family in ("gemma", "gemma2") else d // heads
  fields.update(embed_dim=d, num_heads=heads,
                num_kv_heads=int(_get(hf, "num_key_value_heads", heads)),
                head_dim=int(_get(hf, "head_dim", default_head_dim)),
                num_layers=int(_require(hf, "num_hidden_layers")),
                mlp_dim=int(_require(hf, "intermediate_size")),
                norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
                max_positions=int(_get(hf, "max_position_embeddings",
                                       {"llama": 2048, "qwen2": 32768}.get(family, 8192))),
                tie_embeddings=bool(_get(hf, "tie_word_embeddings", family in ("gemma", "gemma2"))),
                **_rope(hf))
  if family in ("llama", "gemma", "gemma2"):
    bias = bool(hf.get("attention_bias", False))  # q, k, v and o projections alike
    fields.update(qkv_bias=bias, out_bias=bias)
  if family == "llama":
    fields.update(mlp_bias=bool(hf.get("mlp_bias", False)),
                  activation=_activation(_get(hf, "hidden_act", "silu"), "hidden_act"))
  elif family == "qwen2":
    fields["activation"] = _activation(_get(hf, "hidden_act", "silu"), "hidden_act")
    if hf.get("use_sliding_window"):
      raise CheckpointError("config.json use_sliding_window=true (Qwen2 sliding-window layers) is "
                            "not supported")
    if any(t != "full_attention" for t in hf.get("layer_types") or ()):
      raise CheckpointError(f"config.json layer_types={hf['layer_types']} is not supported for Qwen2 "
                            "(full attention layers only)")
  else:  # gemma, gemma2
    if hf.get("use_bidirectional_attention"):
      raise CheckpointError("config.json use_bidirectional_attention=true is not supported")
    if hf.get("hidden_activation") is not None:
      fields["activation"] = _activation(hf["hidden_activation"], "hidden_activation")
    elif family == "gemma" and _get(hf, "hidden_act", "gelu") == "gelu":
      # Gemma 1 releases say hidden_act="gelu" but mean the tanh approximation; transformers
      # (both 4 and 5) runs gelu_pytorch_tanh for it, so do we.
      fields["activation"] = "gelu_tanh"
    else:
      fields["activation"] = _activation(_get(hf, "hidden_act", "gelu_pytorch_tanh"), "hidden_act")
  if family == "gemma2":
    n = fields["num_layers"]
    types = hf.get("layer_types")
    if types is None:  # transformers 4: even layers slide
      types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    if len(types) != n or set(types) - set(names):
      raise CheckpointError(f"config.json layer_types={types} must list {n} of {sorted(names)}")
    layer_types = tuple(names[t] for t in types)
    window = hf.get("sliding_window", 4096) if "sliding" in layer_types else None
    q_scalar = float(_get(hf, "query_pre_attn_scalar", 256))
    fields.update(layer_types=layer_types if window else None, sliding_window=window,
                  query_scale=None if q_scalar == fields["head_dim"] else q_scalar ** -0.5,
                  attn_softcap=hf.get("attn_logit_softcapping", 50.0),
                  final_softcap=hf.get("final_logit_softcapping", 30.0))
  return _make_config(fields)


def _names(names: Sequence[str], limit: int = 20) -> str:
  """A list of tensor names for an error message, shortened when a whole layout is off."""
  names = list(names)
  shown = ", ".join(names[:limit])
  return f"[{shown}{f', ... ({len(names) - limit} more)' if len(names) > limit else ''}]"


def _make_config(fields: dict[str, Any]) -> ModelConfig:
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise CheckpointError(f"config.json gives an invalid model: {e}") from e


# ----------------------------------------------------------------------------- tensor table


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One Hugging Face tensor and the perl_jax leaves it holds."""

  name: str
  shape: tuple[int, ...]  # torch layout
  leaves: tuple[tuple[str, ...], ...]
  to_ours: Callable[[np.ndarray], Sequence[np.ndarray]]
  to_hf: Callable[..., np.ndarray]


def _path(s: str) -> tuple[str, ...]:
  return tuple(s.split("/"))


def _copy(name: str, leaf: str, shape: tuple[int, ...]) -> _Spec:
  return _Spec(name, shape, (_path(leaf),), lambda w: (w,), lambda w: w)


def _linear(name: str, leaf: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Spec:
  """torch nn.Linear weight (out, in) <-> kernel in_shape + out_shape."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return _Spec(name, (n_out, n_in), (_path(leaf),),
               lambda w: (w.T.reshape(in_shape + out_shape),),
               lambda k: k.reshape(n_in, n_out).T)


def _conv1d(name: str, leaf: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Spec:
  """GPT-2 Conv1D weight (in, out) <-> kernel in_shape + out_shape."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return _Spec(name, (n_in, n_out), (_path(leaf),),
               lambda w: (w.reshape(in_shape + out_shape),), lambda k: k.reshape(n_in, n_out))


def _bias(name: str, leaf: str, out_shape: tuple[int, ...]) -> _Spec:
  n = math.prod(out_shape)
  return _Spec(name, (n,), (_path(leaf),), lambda b: (b.reshape(out_shape),),
               lambda b: b.reshape(n))


def _fused_qkv(name: str, layer: str, d: int, n: int, h: int, bias: bool) -> _Spec:
  """GPT-2 c_attn (Conv1D, q|k|v along the output axis) <-> separate q, k, v leaves."""
  leaf = "bias" if bias else "kernel"
  leaves = tuple(_path(f"{layer}/attn/{p}/{leaf}") for p in "qkv")
  if bias:
    return _Spec(name, (3 * n * h,), leaves,
                 lambda b: tuple(x.reshape(n, h) for x in np.split(b, 3)),
                 lambda *bs: np.concatenate([x.reshape(n * h) for x in bs]))
  return _Spec(name, (d, 3 * n * h), leaves,
               lambda w: tuple(x.reshape(d, n, h) for x in np.split(w, 3, axis=1)),
               lambda *ws: np.concatenate([x.reshape(d, n * h) for x in ws], axis=1))


def _tensor_specs(cfg: ModelConfig, prefix: str) -> list[_Spec]:
  """Every tensor of a checkpoint of `cfg` (the tied lm_head excepted), base names after `prefix`."""
  d, v, f = cfg.embed_dim, cfg.vocab_size, cfg.mlp_dim
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  p = prefix
  specs: list[_Spec] = []
  if cfg.family == "gpt2":
    specs += [_copy(f"{p}wte.weight", "embed/embedding", (v, d)),
              _copy(f"{p}wpe.weight", "pos_embed/embedding", (cfg.max_positions, d))]
    for i in range(cfg.num_layers):
      hf, us = f"{p}h.{i}.", f"layers_{i}"
      specs += [
          _copy(f"{hf}ln_1.weight", f"{us}/attn_norm/scale", (d,)),
          _copy(f"{hf}ln_1.bias", f"{us}/attn_norm/bias", (d,)),
          _fused_qkv(f"{hf}attn.c_attn.weight", us, d, n, h, bias=False),
          _fused_qkv(f"{hf}attn.c_attn.bias", us, d, n, h, bias=True),
          _conv1d(f"{hf}attn.c_proj.weight", f"{us}/attn/o/kernel", (n, h), (d,)),
          _bias(f"{hf}attn.c_proj.bias", f"{us}/attn/o/bias", (d,)),
          _copy(f"{hf}ln_2.weight", f"{us}/mlp_norm/scale", (d,)),
          _copy(f"{hf}ln_2.bias", f"{us}/mlp_norm/bias", (d,)),
          _conv1d(f"{hf}mlp.c_fc.weight", f"{us}/mlp/up/kernel", (d,), (f,)),
          _bias(f"{hf}mlp.c_fc.bias", f"{us}/mlp/up/bias", (f,)),
          _conv1d(f"{hf}mlp.c_proj.weight", f"{us}/mlp/down/kernel", (f,), (d,)),
          _bias(f"{hf}mlp.c_proj.bias", f"{us}/mlp/down/bias", (d,)),
      ]
    specs += [_copy(f"{p}ln_f.weight", "final_norm/scale", (d,)),
              _copy(f"{p}ln_f.bias", "final_norm/bias", (d,))]
  else:
    specs.append(_copy(f"{p}embed_tokens.weight", "embed/embedding", (v, d)))
    for i in range(cfg.num_layers):
      hf, us = f"{p}layers.{i}.", f"layers_{i}"
      for name, heads in (("q", n), ("k", k), ("v", k)):
        specs.append(_linear(f"{hf}self_attn.{name}_proj.weight", f"{us}/attn/{name}/kernel",
                             (d,), (heads, h)))
        if cfg.qkv_bias:
          specs.append(_bias(f"{hf}self_attn.{name}_proj.bias", f"{us}/attn/{name}/bias",
                             (heads, h)))
      specs.append(_linear(f"{hf}self_attn.o_proj.weight", f"{us}/attn/o/kernel", (n, h), (d,)))
      if cfg.out_bias:
        specs.append(_bias(f"{hf}self_attn.o_proj.bias", f"{us}/attn/o/bias", (d,)))
      for name, fan_in, fan_out in (("gate", d, f), ("up", d, f), ("down", f, d)):
        specs.append(_linear(f"{hf}mlp.{name}_proj.weight", f"{us}/mlp/{name}/kernel",
                             (fan_in,), (fan_out,)))
        if cfg.mlp_bias:
          specs.append(_bias(f"{hf}mlp.{name}_proj.bias", f"{us}/mlp/{name}/bias", (fan_out,)))
      specs.append(_copy(f"{hf}input_layernorm.weight", f"{us}/attn_norm/scale", (d,)))
      if cfg.sandwich_norms:
        # Gemma 2: post_attention_layernorm normalises the attention OUTPUT; the pre-MLP norm
        # is pre_feedforward_layernorm.
        specs += [_copy(f"{hf}post_attention_layernorm.weight", f"{us}/post_attn_norm/scale", (d,)),
                  _copy(f"{hf}pre_feedforward_layernorm.weight", f"{us}/mlp_norm/scale", (d,)),
                  _copy(f"{hf}post_feedforward_layernorm.weight", f"{us}/post_mlp_norm/scale", (d,))]
      else:
        # Llama, Qwen2, Gemma 1: post_attention_layernorm is the pre-MLP norm.
        specs.append(_copy(f"{hf}post_attention_layernorm.weight", f"{us}/mlp_norm/scale", (d,)))
    specs.append(_copy(f"{p}norm.weight", "final_norm/scale", (d,)))
  if cfg.head == "scalar":
    specs.append(_linear("score.weight", "score/kernel", (d,), (1,)))
  elif not cfg.tie_embeddings:
    specs.append(_linear("lm_head.weight", "lm_head/kernel", (d,), (v,)))
  return specs


def _prefix(cfg: ModelConfig, names: set[str]) -> str:
  if cfg.family != "gpt2":
    return "model."
  # Current transformers writes "transformer."; the original OpenAI-converted files have none.
  return "transformer." if any(s.startswith("transformer.") for s in names) else ""


def _ignored(cfg: ModelConfig, prefix: str) -> re.Pattern:
  """Non-persistent buffers that some older checkpoints contain; transformers skips them too."""
  if cfg.family == "gpt2":
    return re.compile(rf"^{re.escape(prefix)}h\.\d+\.attn\.(bias|masked_bias)$")
  return re.compile(rf"^{re.escape(prefix)}layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# ----------------------------------------------------------------------------- param trees


def _expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
  """{leaf path: (shape, dtype)} of `init_params(Transformer(cfg))`, computed abstractly."""
  model = Transformer(cfg)
  abstract = jax.eval_shape(lambda rng: init_params(model, rng), jax.random.PRNGKey(0))
  return {tuple(str(getattr(k, "key", k)) for k in path): (tuple(x.shape), x.dtype)
          for path, x in jax.tree_util.tree_leaves_with_path(abstract)}


def _flatten(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, collections.abc.Mapping):  # dict or flax FrozenDict
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _check_tree(cfg: ModelConfig, flat: dict[tuple[str, ...], Any], what: str) -> None:
  """Errors naming every leaf that is missing, extra or mis-shaped versus init_params(cfg)."""
  expected = _expected_shapes(cfg)
  problems = []
  missing = sorted("/".join(p) for p in expected.keys() - flat.keys())
  extra = sorted("/".join(p) for p in flat.keys() - expected.keys())
  if missing:
    problems.append(f"missing params {_names(missing)}")
  if extra:
    problems.append(f"unexpected params {_names(extra)}")
  for path in sorted(expected.keys() & flat.keys()):
    shape = tuple(np.shape(flat[path]))
    if shape != expected[path][0]:
      problems.append(f"param {'/'.join(path)} has shape {shape}, expected {expected[path][0]}")
  if problems:
    raise CheckpointError(f"{what} does not match the {cfg.family} model: " + "; ".join(problems))


# ----------------------------------------------------------------------------- loading


def _open_checkpoint(path: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
  """{tensor name: open safetensors handle holding it}, for a single or a sharded checkpoint."""
  from safetensors import safe_open

  if (path / _SINGLE_FILE).exists():  # transformers also prefers the single file
    files, index = [_SINGLE_FILE], None
  elif (path / _INDEX_FILE).exists():
    index = json.loads((path / _INDEX_FILE).read_text())["weight_map"]
    files = sorted(set(index.values()))
  else:
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    raise CheckpointError(f"{path} has neither {_SINGLE_FILE} nor {_INDEX_FILE}"
                          + (f" (found {others}: only safetensors is supported)" if others else ""))
  where: dict[str, Any] = {}
  for name in files:
    if not (path / name).exists():
      raise CheckpointError(f"{_INDEX_FILE} lists shard {name!r}, which is not in {path}")
    try:
      handle = stack.enter_context(safe_open(str(path / name), framework="numpy"))
    except Exception as e:  # safetensors raises its own SafetensorError for a corrupt header
      raise CheckpointError(f"{path / name} is not a readable safetensors file: {e}") from None
    for key in handle.keys():
      if key in where:
        raise CheckpointError(f"tensor {key!r} is stored in more than one shard")
      where[key] = handle
  if index is not None:
    absent = sorted(k for k in index if k not in where)
    if absent:
      raise CheckpointError(f"{_INDEX_FILE} lists tensors its shards do not hold: {_names(absent)}")
  return where


def read_hf_config(path: PathLike, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of checkpoint directory `path`'s config.json (reads no weights)."""
  config_file = Path(path) / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{path} has no config.json")
  try:
    hf = json.loads(config_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f"{config_file}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else config_file
    raise CheckpointError(f"{where}: not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{config_file}: expected a JSON object")
  try:
    return config_from_hf(hf, dtype)
  except CheckpointError as e:  # name the file: several checkpoints may be in play
    raise CheckpointError(f"{config_file}: {e}") from None


def _check_tensors(path: Path, cfg: ModelConfig, where: dict[str, Any]
                   ) -> tuple[list[_Spec], bool]:
  """(the tensor table, whether a tied lm_head copy is stored) after checking every stored
  tensor's name, shape and dtype against `cfg`, from the safetensors headers alone."""
  prefix = _prefix(cfg, set(where))
  specs = _tensor_specs(cfg, prefix)
  expected = {s.name: s.shape for s in specs}
  tied_head = cfg.head == "lm" and cfg.tie_embeddings and "lm_head.weight" in where
  if tied_head:  # allowed, but only as a copy of the embedding (checked when loading)
    expected["lm_head.weight"] = (cfg.vocab_size, cfg.embed_dim)
  ignored = _ignored(cfg, prefix)
  problems = []
  missing = [name for name in expected if name not in where]
  unexpected = sorted(name for name in where if name not in expected and not ignored.match(name))
  if missing:
    problems.append(f"missing tensors {_names(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors {_names(unexpected)}")
  for name, shape in expected.items():
    if name in where:
      tensor = where[name].get_slice(name)
      found = tuple(tensor.get_shape())
      if found != shape:
        problems.append(f"tensor {name} has shape {found}, expected {shape}")
      if tensor.get_dtype() not in _FLOAT_DTYPES:
        problems.append(f"tensor {name} has dtype {tensor.get_dtype()}, expected a float type")
  if problems:
    raise CheckpointError(f"checkpoint {path} does not fit {cfg.family} "
                          f"({'scalar head' if cfg.head == 'scalar' else 'lm head'}) as its "
                          "config.json describes it: " + "; ".join(problems))
  return specs, tied_head


def check_hf_checkpoint(path: PathLike, dtype: str = "float32") -> ModelConfig:
  """The ModelConfig of checkpoint `path`, after checking config.json and every tensor's name,
  shape and dtype against it. Reads only config.json and the safetensors headers (no tensor
  data), so it is cheap for any model size; raises `CheckpointError` as `load_hf_checkpoint`."""
  path = Path(path)
  cfg = read_hf_config(path, dtype)
  with contextlib.ExitStack() as stack:
    _check_tensors(path, cfg, _open_checkpoint(path, stack))
  return cfg


def load_hf_checkpoint(path: PathLike, dtype: str = "float32") -> tuple[ModelConfig, Params]:
  """Loads a Hugging Face checkpoint directory as (ModelConfig, params).

  Supports Llama, Gemma, Gemma 2, Qwen2 and GPT-2, as `*ForCausalLM` / `GPT2LMHeadModel` (next
  token logits) or `*ForSequenceClassification` with num_labels=1 (a scalar head). Params are a
  nested dict of host numpy arrays in `dtype` ('float32', 'bfloat16' or 'float16'), laid out
  exactly as `init_params(Transformer(cfg), rng)`. Anything that does not fit - architecture,
  config setting, missing / unexpected / mis-shaped tensor - raises `CheckpointError` naming it.
  """
  path = Path(path)
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype={dtype!r} must be 'float32', 'bfloat16' or 'float16'")
  cfg = read_hf_config(path, dtype)
  np_dtype = np.dtype(cfg.weight_dtype)

  with contextlib.ExitStack() as stack:
    where = _open_checkpoint(path, stack)
    # Validate every name, shape and dtype before reading any data.
    specs, tied_head = _check_tensors(path, cfg, where)
    embed_name = specs[0].name
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for spec in specs:
      arrays = spec.to_ours(where[spec.name].get_tensor(spec.name))
      for leaf, array in zip(spec.leaves, arrays):
        flat[leaf] = np.ascontiguousarray(array.astype(np_dtype, copy=False))
    if tied_head and not np.array_equal(where["lm_head.weight"].get_tensor("lm_head.weight"),
                                        where[embed_name].get_tensor(embed_name)):
      raise CheckpointError(f"tie_word_embeddings is set but tensor lm_head.weight differs from "
                            f"{embed_name}; an untied head needs tie_word_embeddings=false")

  _check_tree(cfg, flat, f"checkpoint {path}")
  return cfg, _unflatten(flat)


# ----------------------------------------------------------------------------- saving


def _hf_config(cfg: ModelConfig) -> Any:
  """The installed transformers' config object for `cfg` (so config.json is in its format)."""
  import transformers

  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
                eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
                else cfg.eos_token_id, dtype=cfg.param_dtype)
  if cfg.head == "scalar":
    common["num_labels"] = 1
  if cfg.family == "gpt2":
    if cfg.activation not in _GPT2_ACTIVATION:
      raise CheckpointError(f"activation={cfg.activation!r} cannot be written for GPT-2")
    kw = dict(n_embd=cfg.embed_dim, n_layer=cfg.num_layers, n_head=cfg.num_heads,
              n_inner=cfg.mlp_dim, n_positions=cfg.max_positions,
              layer_norm_epsilon=cfg.norm_eps, activation_function=_GPT2_ACTIVATION[cfg.activation])
  else:
    rope_scaling = None
    if cfg.rope_type == "linear":
      rope_scaling = dict(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_type == "llama3":
      rope_scaling = dict(rope_type="llama3", factor=cfg.rope_factor,
                          low_freq_factor=cfg.rope_low_freq_factor,
                          high_freq_factor=cfg.rope_high_freq_factor,
                          original_max_position_embeddings=cfg.rope_original_max_positions)
    # Legacy rope_theta / rope_scaling kwargs: transformers 4 takes them as they are and
    # transformers 5 converts them to its `rope_parameters`.
    kw = dict(hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=rope_scaling)
    if cfg.family in ("llama", "gemma", "gemma2"):
      kw["attention_bias"] = cfg.qkv_bias
    act = _HF_ACTIVATION.get(cfg.activation)
    if cfg.family == "llama":
      kw.update(mlp_bias=cfg.mlp_bias, hidden_act=act)
    elif cfg.family == "qwen2":
      kw["hidden_act"] = act
      if cfg.head_dim == cfg.embed_dim // cfg.num_heads:
        del kw["head_dim"]  # Qwen2 derives it
    elif cfg.family == "gemma":
      kw.update(hidden_act=act, hidden_activation=act)
    else:  # gemma2
      scalar = cfg.head_dim if cfg.query_scale is None else cfg.query_scale ** -2
      if abs(scalar - round(scalar)) < 1e-6 * max(1.0, scalar):
        scalar = int(round(scalar))
      types = [("sliding_attention" if cfg.is_sliding(i) else "full_attention")
               for i in range(cfg.num_layers)]
      # transformers 5 builds the sliding mask even when no layer uses it, so it needs a window.
      kw.update(hidden_activation=act, query_pre_attn_scalar=scalar, layer_types=types,
                sliding_window=cfg.sliding_window or 4096,
                attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
  hf_config = transformers.AutoConfig.for_model(cfg.family, **kw, **common)
  hf_config.architectures = [_ARCH_OF[(cfg.family, cfg.head)]]
  return hf_config


def _canonical(cfg: ModelConfig) -> dict[str, Any]:
  """The fields of `cfg` that change the computation or are written to config.json."""
  c = dataclasses.asdict(cfg)
  del c["dtype"], c["param_dtype"]
  if c["query_scale"] is not None and math.isclose(c["query_scale"], cfg.head_dim ** -0.5):
    c["query_scale"] = None
  if not any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
    c["layer_types"], c["sliding_window"] = None, None
  if isinstance(c["eos_token_id"], (list, tuple)):
    c["eos_token_id"] = tuple(c["eos_token_id"])
  llama3 = ["rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_positions"]
  unused = {"default": ["rope_factor"] + llama3, "linear": llama3}.get(cfg.rope_type, [])
  if cfg.positions == "learned":
    unused = [k for k in c if k.startswith("rope_")]
  for key in unused:
    c[key] = None
  if cfg.head == "scalar":
    c["final_softcap"] = None  # the scalar head is never soft-capped
  return c


def _check_expressible(cfg: ModelConfig, hf_dict: dict) -> None:
  """Errors if re-reading the config.json we write would give a different model."""
  reread = _canonical(config_from_hf(hf_dict, cfg.param_dtype))
  ours = _canonical(cfg)
  differ = []
  for key, value in ours.items():
    other = reread[key]
    same = (math.isclose(value, other, rel_tol=1e-9)
            if isinstance(value, float) and isinstance(other, (int, float)) else value == other)
    if not same:
      differ.append(f"{key}={value!r} (a {cfg.family} checkpoint would give {other!r})")
  if differ:
    raise CheckpointError(f"this ModelConfig cannot be written as a {cfg.family} checkpoint: "
                          + "; ".join(differ))


def save_hf_checkpoint(config: ModelConfig, params: Params, out_dir: PathLike,
                       lora: tuple[LoraConfig, Params] | None = None) -> None:
  """Writes `config.json` and `model.safetensors` loadable by transformers' `from_pretrained`.

  `lora` is None or ``(LoraConfig, adapters)``; adapters are merged into the kernels first
  (`perl_jax.lora.merge`). head='lm' writes `*ForCausalLM` (`GPT2LMHeadModel`), head='scalar'
  writes `*ForSequenceClassification` with num_labels=1. Raises `CheckpointError` (naming the
  tensor or field) for non-finite params or a config the family's checkpoint cannot express.
  """
  cfg = config
  out_dir = Path(out_dir)
  params = nn.meta.unbox(params)  # accept params still in logical-partitioning boxes
  if lora is not None:
    lora_cfg, adapters = lora
    if not isinstance(lora_cfg, LoraConfig):
      raise TypeError(f"lora must be (LoraConfig, adapters), got {type(lora_cfg).__name__} first")
    params = merge(params, nn.meta.unbox(adapters), lora_cfg)
  flat = {path: np.asarray(jax.device_get(x)) for path, x in _flatten(params).items()}
  _check_tree(cfg, flat, "params")

  hf_config = _hf_config(cfg)
  _check_expressible(cfg, hf_config.to_dict())

  tensors: dict[str, np.ndarray] = {}
  for spec in _tensor_specs(cfg, "transformer." if cfg.family == "gpt2" else "model."):
    leaves = [flat[leaf] for leaf in spec.leaves]
    for leaf, x in zip(spec.leaves, leaves):
      if not np.isfinite(x.astype(np.float32)).all():
        raise CheckpointError(f"param {'/'.join(leaf)} (tensor {spec.name}) has non-finite values")
    tensors[spec.name] = np.ascontiguousarray(spec.to_hf(*leaves))
    if tensors[spec.name].shape != spec.shape:  # the table is wrong, not the params
      raise AssertionError(f"{spec.name}: wrote {tensors[spec.name].shape}, expected {spec.shape}")

  from safetensors.numpy import save_file

  out_dir.mkdir(parents=True, exist_ok=True)
  if (out_dir / _INDEX_FILE).exists():
    raise CheckpointError(f"{out_dir} already holds a sharded checkpoint ({_INDEX_FILE}); "
                          "write to an empty directory")
  hf_config.save_pretrained(str(out_dir))
  # transformers refuses safetensors files without format metadata.
  save_file(tensors, str(out_dir / _SINGLE_FILE), metadata={"format": "pt"})
