"""Shared test utilities: compile-free random params and tiny Hugging Face checkpoints.

`random_params` fills the shapes of `init_params` with NumPy draws: jitting a model's `init`
costs seconds of XLA compilation per family on CPU, more than the tests that use it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import lora


def one_device(c):
  """`c` on a 1 x 1 x 1 mesh over devices[:1]: trainer tests run as on a one-device machine
  (conftest.py gives every test 8 host devices; tests/test_sharded_trainers.py covers layouts)."""
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def random_params(model, seed: int = 0, std: float = 0.02, head_scale: float = 1.0) -> dict:
  """Random params with the structure of `init_params(model, ...)`, built without compiling.

  Norm scales are their identity value plus noise. `head_scale` multiplies the output
  projection (the embedding when tied), giving sharper next-token distributions.
  """
  abstract = lora.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                       jnp.zeros((1, 2), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  plus_one = model.cfg.norm_plus_one

  def fill(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    x = rng.normal(0.0, std, leaf.shape)
    if names[-1] == "scale":
      x = (0.0 if plus_one else 1.0) + 10 * x
    elif names[0] in ("lm_head",) or (names[0] == "embed" and model.cfg.tie_embeddings):
      x = x * head_scale
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def random_adapters(model, params: dict, seed: int = 0, std: float = 0.1) -> dict:
  """Non-zero adapters (both A and B random) with the structure `lora.init_adapters` makes."""
  abstract = lora.adapter_shapes(model, params, jax.ShapeDtypeStruct((2,), jnp.uint32))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype), abstract)


def tiny_hf_model(kind: str, out_dir: Path, vocab_size: int = 128, seed: int = 0):
  """Saves a tiny random transformers model ('llama', 'gemma2' or 'gpt2') in float32.

  Weights are drawn wider than the HF init (norm weights and biases moved off their init values)
  so next-token distributions are peaked and greedy argmax is not decided by rounding.
  Returns the torch model (eval mode).
  """
  import torch
  import transformers

  ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if kind == "llama":
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=20000.0, tie_word_embeddings=False, **ids)
    cls = transformers.LlamaForCausalLM
  elif kind == "gemma2":
    config = transformers.Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, rope_theta=20000.0, **ids)
    cls = transformers.Gemma2ForCausalLM
  elif kind == "gpt2":
    config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4,
                                     n_inner=96, n_positions=64, **ids)
    cls = transformers.GPT2LMHeadModel
  else:
    raise ValueError(f"unknown tiny HF model kind {kind!r}")
  torch.manual_seed(seed)
  model = cls(config).float().eval()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in model.named_parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.15 * torch.randn(p.shape, generator=g))
    if config.tie_word_embeddings:
      # Large tied embeddings make every token predict itself; shrink them and sharpen the
      # output through the final norm instead, so greedy continuations vary.
      model.get_input_embeddings().weight.mul_(0.2)
      if kind == "gemma2":  # Gemma scales by (1 + w)
        model.model.norm.weight.copy_(8 * (1 + model.model.norm.weight) - 1)
      else:
        model.transformer.ln_f.weight.mul_(8)
  model.generation_config.pad_token_id = 0
  model.save_pretrained(out_dir)
  return model


# A 1-layer model whose sizes split over every mesh of 8 devices the tests use: embed 32 over
# fsdp <= 8; 4 heads and vocab 40 over tensor <= 4; 2 KV heads over tensor = 2.
TINY_MODEL = dict(num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64)
TINY_VOCAB = 40  # the synthetic tokenizer's 39 tokens, padded to split over tensor


def tiny_config():
  """The ModelConfig of `TINY_MODEL` (float32)."""
  from perl_jax import config
  from perl_jax.trainers import common

  c = config.ppo_config()
  c.model.update(TINY_MODEL)
  return common.scratch_config(c, TINY_VOCAB, dict(pad_token_id=0, bos_token_id=1,
                                                   eos_token_id=2), "float32")


def tiny_lora_assets(root: Path, prompts: int = 8) -> dict:
  """A tiny random base (HF dir + synthetic tokenizer), a LoRA policy and a LoRA reward model
  on it with random (non-zero) adapters, and small synthetic data files (`prompts` prompts),
  under `root`. Built without compiling anything: adapters from NumPy, not `init_adapters`."""
  from perl_jax.data import synthetic
  from perl_jax.models import Transformer, save_hf_checkpoint
  from perl_jax.trainers import common

  data = synthetic.prepare(root / "data", seed=0, sizes=dict(
      prompts=prompts, sft_train=16, sft_eval=8, pref_train=16, pref_eval=8))
  synthetic.build_tokenizer(root / "base")
  cfg = tiny_config()
  params = random_params(Transformer(cfg), seed=0, std=0.3)
  save_hf_checkpoint(cfg, params, root / "base")
  lcfg = lora.LoraConfig(rank=8, alpha=16.0, targets=("attn/(q|v)/kernel$", "mlp/down/kernel$"))
  for name, head, seed in (("policy", "lm", 1), ("reward", "scalar", 2)):
    module = Transformer(cfg.replace(head=head), lora=lcfg)
    full = dict(params)
    if head == "scalar":  # the base with a random scalar head in place of the LM head
      del full["lm_head"]
      full["score"] = random_params(module, seed=seed, std=0.3)["score"]
    trainable = {"lora": random_adapters(module, full, seed=seed)}
    if head == "scalar":
      trainable["params"] = {"score": full["score"]}
    common.save_model(root / name, common.Model(module, {"params": {}}, trainable,
                                                str(root / "base"), str(root / "base")))
  return dict(root=root, base=str(root / "base"), policy=str(root / "policy"),
              reward=str(root / "reward"), **data)


def ppo_prereqs(wd: Path) -> dict:
  """A random tiny policy (HF dir + word-level tokenizer), an untrained-but-nonzero LoRA reward
  model built on it, and the synthetic task's prompts, under `wd`."""
  from perl_jax import config
  from perl_jax.data import synthetic
  from perl_jax.models import Transformer, init_params, save_hf_checkpoint
  from perl_jax.tokenizers import load_tokenizer
  from perl_jax.trainers import common

  data = synthetic.prepare(wd / "data", seed=0, sizes=dict(prompts=64))
  synthetic.build_tokenizer(wd / "policy")
  c = config.ppo_config()
  cfg = common.scratch_config(c, len(load_tokenizer(wd / "policy")),
                              dict(pad_token_id=0, bos_token_id=1, eos_token_id=2), "float32")
  save_hf_checkpoint(cfg, init_params(Transformer(cfg), jax.random.PRNGKey(0)), wd / "policy")
  reward = common.load_model(str(wd / "policy"), head="scalar",
                             lora=common.lora_from_config(c.lora), cache=common.BaseCache(),
                             rng=jax.random.PRNGKey(1))
  reward.trainable = jax.tree.map(lambda x: x + 0.05, reward.trainable)  # a non-trivial reward
  common.save_model(wd / "reward", reward)
  return dict(policy=str(wd / "policy"), reward=str(wd / "reward"), prompts=data["prompts"],
              sft=data["sft_train"], wd=wd)


@contextlib.contextmanager
def persistent_compilation_cache(path: Path):
  """JAX's persistent compilation cache in `path` while the block runs, every program cached;
  the previous settings (no cache, as tests normally run) after it. See tests/conftest.py."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  settings = {"jax_compilation_cache_dir": str(path),
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  cc.reset_cache()  # JAX creates its cache object at the first compile that uses one
  try:
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    cc.reset_cache()
