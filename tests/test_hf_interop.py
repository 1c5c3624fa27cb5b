"""Hugging Face checkpoint interop, checked against transformers' own PyTorch models.

Every family is built as a tiny random PyTorch model inside the test, with settings a loader
could silently ignore (rope_theta, RoPE scaling, head_dim != hidden / heads, biases, small
sliding windows, soft-caps, non-default layer types) and with norm weights and biases moved
away from their init values. Logits are compared on left-padded batches, on real positions.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from perl_jax.lora import ALL_TARGETS, LoraConfig, unbox
from perl_jax.models import (Transformer, init_params, load_hf_checkpoint, save_hf_checkpoint,
                             tiny_config)
from perl_jax.models.hf import CheckpointError

VOCAB = 96
PAD_LENGTHS = (0, 3, 6)  # left padding per row
T = 10
TOL = 1e-4
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)

# name -> builder of a transformers config (extra kwargs, e.g. num_labels, pass through).
HF_CONFIGS = {
    # Llama 3 scaling with a short original context, so it changes the phases of a 10-token batch.
    "llama3": lambda **kw: transformers.LlamaConfig(
        **SIZES, max_position_embeddings=64, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8), **kw),
    "llama_linear": lambda **kw: transformers.LlamaConfig(
        **SIZES, head_dim=24, rope_theta=20000.0, rope_scaling=dict(rope_type="linear", factor=4.0),
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, rms_norm_eps=1e-5, **kw),
    "gemma": lambda **kw: transformers.GemmaConfig(
        **SIZES, head_dim=24, rope_theta=20000.0, hidden_act="gelu_pytorch_tanh", **kw),
    "gemma2": lambda **kw: transformers.Gemma2Config(
        **{**SIZES, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, rope_theta=20000.0, **kw),
    "qwen2": lambda **kw: transformers.Qwen2Config(**SIZES, rope_theta=1e6, **kw),
    "gpt2": lambda **kw: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=32,
        activation_function="gelu_new", bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw),
    # Exact (erf) GELU, to tell it apart from the tanh approximation.
    "gpt2_gelu": lambda **kw: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32,
        activation_function="gelu", bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw),
}
LM_MODELS = ("llama3", "llama_linear", "gemma", "gemma2", "qwen2", "gpt2")
SCALAR_MODELS = ("llama3", "gemma", "gemma2", "qwen2", "gpt2_gelu")


def _batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.arange(T)[None, :] >= np.asarray(PAD_LENGTHS)[:, None]
  tokens = rng.integers(3, VOCAB, (len(PAD_LENGTHS), T))  # never the pad id 0 on real positions
  return np.where(mask, tokens, 0), mask.astype(np.int64)


def _perturb(model: torch.nn.Module) -> None:
  """O(1) activations, and every norm weight and bias moved off its init value."""
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.3 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.12 * torch.randn(p.shape, generator=g))


def _hf_out(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  ids, m = torch.tensor(tokens), torch.tensor(mask)
  positions = torch.clamp(m.cumsum(-1) - 1, min=0)  # perl_jax's default positions
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=m, position_ids=positions).logits.float().numpy()


@functools.cache
def _apply(cfg, lora=None):
  return jax.jit(Transformer(cfg, lora).apply)


def _ours(cfg, params, tokens, mask, lora=None, adapters=None) -> np.ndarray:
  variables = {"params": params}
  if adapters is not None:
    variables["lora"] = adapters
  out = _apply(cfg, lora)(variables, jnp.asarray(tokens), mask_BxT=jnp.asarray(mask))
  return np.asarray(out, np.float32)


def _max_diff_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  """(directory, torch model) of a saved tiny HF model, built once per (name, head)."""
  cache = {}

  def get(name: str, head: str = "lm"):
    if (name, head) not in cache:
      torch.manual_seed(0)
      if head == "scalar":
        config = HF_CONFIGS[name](num_labels=1)
        model = transformers.AutoModelForSequenceClassification.from_config(
            config, attn_implementation="eager")
      else:
        config = HF_CONFIGS[name]()
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
      model.eval()
      _perturb(model)
      path = tmp_path_factory.mktemp(f"{name}_{head}")
      model.save_pretrained(path)
      cache[(name, head)] = (path, model)
    return cache[(name, head)]

  return get


def _from_pretrained(path, head: str = "lm") -> torch.nn.Module:
  auto = (transformers.AutoModelForSequenceClassification if head == "scalar"
          else transformers.AutoModelForCausalLM)
  return auto.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def _assert_init_layout(cfg, params) -> None:
  abstract = jax.eval_shape(lambda r: init_params(Transformer(cfg), r), jax.random.PRNGKey(0))
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert isinstance(got, np.ndarray)  # host arrays


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", LM_MODELS)
def test_causal_lm_parity_and_save_roundtrip(name, hf_checkpoint, tmp_path):
  path, model = hf_checkpoint(name)
  cfg, params = load_hf_checkpoint(path)
  _assert_init_layout(cfg, params)
  assert cfg.head == "lm" and cfg.dtype == cfg.param_dtype == "float32"
  assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
  tokens, mask = _batch()
  want = _hf_out(model, tokens, mask)
  got = _ours(cfg, params, tokens, mask)
  assert got.shape == want.shape
  assert _max_diff_real(got, want, mask) <= TOL

  # perl_jax save -> transformers load reproduces the original model.
  save_hf_checkpoint(cfg, params, tmp_path / "out")
  reloaded = _from_pretrained(tmp_path / "out")
  assert type(reloaded) is type(model)
  assert _max_diff_real(_hf_out(reloaded, tokens, mask), want, mask) <= 1e-5
  cfg2, params2 = load_hf_checkpoint(tmp_path / "out")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("name", SCALAR_MODELS)
def test_sequence_classification_parity(name, hf_checkpoint, tmp_path):
  path, model = hf_checkpoint(name, "scalar")
  cfg, params = load_hf_checkpoint(path)
  _assert_init_layout(cfg, params)
  assert cfg.head == "scalar" and params["score"]["kernel"].shape == (cfg.embed_dim, 1)
  tokens, mask = _batch(1)
  want = _hf_out(model, tokens, mask)  # B x 1, pooled at the last non-pad token
  got = _ours(cfg, params, tokens, mask)  # B x T
  np.testing.assert_allclose(got[:, -1], want[:, 0], atol=TOL, rtol=0)

  save_hf_checkpoint(cfg, params, tmp_path / "out")
  reloaded = _from_pretrained(tmp_path / "out", "scalar")
  assert type(reloaded) is type(model) and reloaded.config.num_labels == 1
  np.testing.assert_allclose(_hf_out(reloaded, tokens, mask), want, atol=1e-5, rtol=0)


def test_sharded_checkpoint(hf_checkpoint, tmp_path):
  _, model = hf_checkpoint("llama_linear")
  model.save_pretrained(tmp_path, max_shard_size="60KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert not (tmp_path / "model.safetensors").exists()
  cfg, params = load_hf_checkpoint(tmp_path)
  tokens, mask = _batch()
  assert _max_diff_real(_ours(cfg, params, tokens, mask), _hf_out(model, tokens, mask), mask) <= TOL


def _random_like(abstract, seed: int, matrix_std: float, vector_noise: float, base=None):
  """Numpy random leaves shaped like `abstract` (host-side: no XLA compile per shape)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(abstract)
  bases = jax.tree.leaves(base) if base is not None else [0.0] * len(leaves)
  out = []
  for x, b in zip(leaves, bases):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    out.append(np.asarray(b) + vector_noise * noise if x.ndim == 1 else matrix_std * noise)
  return jax.tree.unflatten(treedef, out)


def _perturbed_tiny(family: str, head: str = "lm", **overrides):
  """tiny_config params at O(1)-activation scale, norm scales and biases off their init values."""
  cfg = tiny_config(family, head=head, vocab_size=VOCAB, **overrides)
  init = jax.eval_shape(lambda r: init_params(Transformer(cfg), r), jax.random.PRNGKey(0))
  base = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), init)
  base = jax.tree_util.tree_map_with_path(  # the init value of RMS / LayerNorm scales
      lambda p, x: x + (1.0 if "scale" in jax.tree_util.keystr(p) and not cfg.norm_plus_one else 0.0),
      base)
  return cfg, _random_like(init, 0, 0.12, 0.3, base)


def _nonzero_adapters(cfg, params, lora):
  """Adapters with the tree the layers create (abstractly), A and B both random."""
  model = Transformer(cfg, lora)
  create = lambda p: model.apply({"params": p}, jnp.zeros((1, 1), jnp.int32),
                                 rngs={"lora_init": jax.random.PRNGKey(2)}, mutable=["lora"])[1]
  abstract = unbox(jax.eval_shape(create, params)["lora"])
  return _random_like(abstract, 3, 0.05, 0.05)


ROUNDTRIP = {
    "llama": dict(rope_type="llama3", rope_factor=8.0, rope_original_max_positions=8),
    "gemma": dict(rope_type="linear", rope_factor=2.0),
    "gemma2": dict(sliding_window=4, layer_types=("full", "sliding"), query_scale=24 ** -0.5,
                   attn_softcap=2.0, final_softcap=3.0),
    "qwen2": {},
    # GPT-2 has no grouped-query attention, and its config.json holds no RoPE fields.
    "gpt2": dict(num_kv_heads=4, rope_theta=10000.0),
}


@pytest.mark.parametrize("family", list(ROUNDTRIP))
def test_save_with_lora_loads_in_transformers(family, tmp_path):
  cfg, params = _perturbed_tiny(family, **ROUNDTRIP[family])
  lora = LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
  adapters = _nonzero_adapters(cfg, params, lora)
  tokens, mask = _batch(2)
  want = _ours(cfg, params, tokens, mask, lora, adapters)  # unmerged adapters
  assert _max_diff_real(want, _ours(cfg, params, tokens, mask), mask) > 1e-2  # adapters matter

  save_hf_checkpoint(cfg, params, tmp_path, lora=(lora, adapters))
  model = _from_pretrained(tmp_path)
  assert _max_diff_real(_hf_out(model, tokens, mask), want, mask) <= TOL
  cfg2, _ = load_hf_checkpoint(tmp_path)
  assert cfg2 == cfg


def test_save_scalar_head_with_lora(tmp_path):
  cfg, params = _perturbed_tiny("qwen2", head="scalar")
  lora = LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
  adapters = _nonzero_adapters(cfg, params, lora)
  tokens, mask = _batch(3)
  want = _ours(cfg, params, tokens, mask, lora, adapters)[:, -1]
  save_hf_checkpoint(cfg, params, tmp_path, lora=(lora, adapters))
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [
      "Qwen2ForSequenceClassification"]
  model = _from_pretrained(tmp_path, "scalar")
  np.testing.assert_allclose(_hf_out(model, tokens, mask)[:, 0], want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- dtypes, formats


def test_bfloat16_load(hf_checkpoint, tmp_path):
  path, model = hf_checkpoint("qwen2")
  _, params32 = load_hf_checkpoint(path)
  cfg, params = load_hf_checkpoint(path, dtype="bfloat16")
  assert cfg.dtype == cfg.param_dtype == "bfloat16"
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(params32)):
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got, ref.astype(ml_dtypes.bfloat16))
  tokens, mask = _batch()
  want = _hf_out(model, tokens, mask)
  assert _max_diff_real(_ours(cfg, params, tokens, mask), want, mask) < 0.5  # bf16 compute

  # A checkpoint stored in bf16 loads with its exact values.
  model.to(torch.bfloat16).save_pretrained(tmp_path)
  model.to(torch.float32)
  _, from_bf16 = load_hf_checkpoint(tmp_path)
  torch_q = model.model.layers[0].self_attn.q_proj.weight.detach().to(torch.bfloat16).float()
  np.testing.assert_array_equal(from_bf16["layers_0"]["attn"]["q"]["kernel"].reshape(64, -1).T,
                                torch_q.numpy())


def _rewrite_config(path, **changes) -> None:
  config = json.loads((path / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      config.pop(key, None)
    else:
      config[key] = value
  (path / "config.json").write_text(json.dumps(config))


def _copy_checkpoint(src, dst):
  dst.mkdir(exist_ok=True)
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


@pytest.mark.parametrize("name", ["llama3", "llama_linear"])
def test_transformers4_rope_format(name, hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint(name)
  cfg, params = load_hf_checkpoint(path)
  rope = json.loads((path / "config.json").read_text())["rope_parameters"]
  old = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
  old["type"] = rope["rope_type"]  # the oldest spelling
  _copy_checkpoint(path, tmp_path)
  _rewrite_config(tmp_path, rope_parameters=None, rope_theta=rope["rope_theta"], rope_scaling=old)
  cfg_old, params_old = load_hf_checkpoint(tmp_path)
  assert cfg_old == cfg and cfg.rope_type == rope["rope_type"]
  jax.tree.map(np.testing.assert_array_equal, params_old, params)


def test_gemma2_layer_types_default_like_transformers(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("gemma2")
  _copy_checkpoint(path, tmp_path)
  _rewrite_config(tmp_path, layer_types=None)
  cfg, _ = load_hf_checkpoint(tmp_path)
  hf_types = transformers.Gemma2Config.from_pretrained(tmp_path).layer_types
  assert cfg.layer_types == tuple(t.split("_")[0] for t in hf_types)
  assert cfg.query_scale == pytest.approx(24 ** -0.5) and cfg.sliding_window == 4


def test_gpt2_original_layout(hf_checkpoint, tmp_path):
  """The OpenAI-converted files: no 'transformer.' prefix, causal-mask buffers stored."""
  path, model = hf_checkpoint("gpt2")
  tensors = {k.removeprefix("transformer."): v
             for k, v in load_file(str(path / "model.safetensors")).items()}
  for i in range(2):
    tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors[f"h.{i}.attn.masked_bias"] = np.asarray(-1e4, np.float32)
  _copy_checkpoint(path, tmp_path)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  cfg, params = load_hf_checkpoint(tmp_path)
  tokens, mask = _batch()
  assert _max_diff_real(_ours(cfg, params, tokens, mask), _hf_out(model, tokens, mask), mask) <= TOL


# ----------------------------------------------------------------------------- errors


def _edit_tensors(src, dst, edit) -> None:
  _copy_checkpoint(src, dst)
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_error_unsupported_architecture(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("llama3")
  _copy_checkpoint(path, tmp_path)
  _rewrite_config(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral")
  with pytest.raises(CheckpointError, match="MistralForCausalLM.*LlamaForCausalLM"):
    load_hf_checkpoint(tmp_path)


def test_error_missing_tensor(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("llama3")
  _edit_tensors(path, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(CheckpointError,
                     match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
    load_hf_checkpoint(tmp_path)


def test_error_unexpected_tensor(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("qwen2")
  _edit_tensors(path, tmp_path,
                lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, "f4")}))
  with pytest.raises(CheckpointError,
                     match=r"unexpected tensors.*model\.layers\.0\.self_attn\.o_proj\.bias"):
    load_hf_checkpoint(tmp_path)


def test_error_wrong_shape(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("gemma2")
  name = "model.layers.2.self_attn.k_proj.weight"
  _edit_tensors(path, tmp_path, lambda t: t.update({name: np.zeros((16, 64), np.float32)}))
  with pytest.raises(CheckpointError, match=rf"{name} has shape \(16, 64\), expected \(32, 64\)"):
    load_hf_checkpoint(tmp_path)


def test_error_num_labels(tmp_path):
  torch.manual_seed(0)
  model = transformers.LlamaForSequenceClassification(HF_CONFIGS["llama3"](num_labels=2))
  model.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="num_labels=2"):
    load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("changes, match", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"rope_parameters\['rope_type'\]='yarn'"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"rope_scaling\['rope_type'\]='dynamic'"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
])
def test_error_unsupported_llama_config(changes, match, hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("llama3")
  _copy_checkpoint(path, tmp_path)
  _rewrite_config(tmp_path, **changes)
  with pytest.raises(CheckpointError, match=match):
    load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize("name, changes, match", [
    ("qwen2", dict(use_sliding_window=True), "use_sliding_window"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ("gpt2", dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights"),
])
def test_error_unsupported_family_options(name, changes, match, hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint(name)
  _copy_checkpoint(path, tmp_path)
  _rewrite_config(tmp_path, **changes)
  with pytest.raises(CheckpointError, match=match):
    load_hf_checkpoint(tmp_path)


def test_tied_lm_head_must_equal_embedding(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint("gemma")
  _edit_tensors(path, tmp_path / "same",
                lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  load_hf_checkpoint(tmp_path / "same")  # a stored copy of the tied head is fine
  _edit_tensors(path, tmp_path / "differs",
                lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1.0}))
  with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
    load_hf_checkpoint(tmp_path / "differs")


def test_save_refuses_non_finite_and_inexpressible(tmp_path):
  cfg, params = _perturbed_tiny("llama")
  params["layers_1"]["mlp"]["down"]["kernel"][0, 0] = np.nan
  with pytest.raises(CheckpointError,
                     match=r"layers_1/mlp/down/kernel.*model\.layers\.1\.mlp\.down_proj"):
    save_hf_checkpoint(cfg, params, tmp_path / "nan")
  cfg, params = _perturbed_tiny("qwen2")
  cfg = cfg.replace(qkv_bias=False)  # Qwen2 always has q/k/v biases
  params = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), jax.eval_shape(
      lambda r: init_params(Transformer(cfg), r), jax.random.PRNGKey(0)))
  with pytest.raises(CheckpointError, match="qkv_bias=False"):
    save_hf_checkpoint(cfg, params, tmp_path / "qwen")
  with pytest.raises(CheckpointError, match="missing params.*layers_0/attn/q/bias"):
    save_hf_checkpoint(cfg.replace(qkv_bias=True), params, tmp_path / "qwen")
