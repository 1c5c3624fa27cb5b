"""perl_jax.export: perl_jax model directories exported as merged HF checkpoints and as peft
adapters, loaded back by transformers (+ peft) in PyTorch and compared with perl_jax's own
`model.apply` on left-padded random token batches (float32, tolerance 1e-4 on real positions).

Adapters are random in both A and B, so an export that dropped or mis-laid them fails (each test
checks first that the adapters change the logits by > 1e-2).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft  # the `test` extra pins 0.21.2
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from helpers import one_device, random_adapters, tiny_hf_model
from perl_jax import export as export_lib
from perl_jax.lora import ALL_TARGETS, ATTENTION_TARGETS, LoraConfig
from perl_jax.models import Transformer
from perl_jax.tokenizers import load_tokenizer, train_bpe_tokenizer
from perl_jax.trainers import common, reward

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 3
PAD_LENGTHS = (0, 3, 6)  # left padding per row
T = 10
TOL = 1e-4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
  """(family -> tiny HF causal-LM directory, built on first use; the shared tokenizer dir)."""
  root = tmp_path_factory.mktemp("bases")
  tokenizer_dir = root / "tokenizer"
  vocab = len(train_bpe_tokenizer(TEXTS, 300, tokenizer_dir))
  cache: dict[str, Path] = {}

  def get(family: str) -> Path:
    if family not in cache:
      cache[family] = root / family
      tiny_hf_model(family, cache[family], vocab_size=vocab, seed=1)
    return cache[family]

  return get, tokenizer_dir, vocab


def _batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.arange(T)[None, :] >= np.asarray(PAD_LENGTHS)[:, None]
  tokens = rng.integers(3, vocab, (len(PAD_LENGTHS), T))  # never the pad id 0 on real positions
  return np.where(mask, tokens, 0), mask.astype(np.int64)


def _lora_model(base: Path, tokenizer_dir: Path, lcfg: LoraConfig, head: str = "lm",
                gain: float = 1.0, bias: float = 0.0) -> common.Model:
  """A perl_jax LoRA model on `base` with random A and B (and a random score head)."""
  cfg, params = common.BaseCache().get(str(base))
  heads = {}
  if head == "scalar":
    cfg, params = cfg.replace(head="scalar"), {k: v for k, v in params.items() if k != "lm_head"}
    kernel = np.random.default_rng(5).normal(0.0, 0.3, (cfg.embed_dim, 1))
    heads = {"score": {"kernel": jnp.asarray(kernel, jnp.float32)}}
  module = Transformer(cfg, lora=lcfg)
  adapters = random_adapters(module, {**params, **heads}, seed=3)
  trainable = {"lora": adapters, **({"params": heads} if heads else {})}
  return common.Model(module, {"params": params}, trainable, str(base), str(tokenizer_dir),
                      gain, bias)


@functools.cache
def _jit_apply(module):
  return jax.jit(module.apply)


def _ours(model_dir: Path, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """perl_jax logits of the saved model directory, loaded as a trainer loads it."""
  head = common.peek(str(model_dir))[0].head
  model = common.load_model(str(model_dir), head=head, lora=None, cache=common.BaseCache(),
                            rng=jax.random.PRNGKey(0))
  out = _jit_apply(model.module)(model.variables(), jnp.asarray(tokens),
                                 mask_BxT=jnp.asarray(mask, bool))
  return np.asarray(out, np.float32)


def _torch(path, head: str = "lm") -> torch.nn.Module:
  if head == "scalar":
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, attn_implementation="eager", dtype=torch.float32).eval()
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


def _theirs(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  ids, m = torch.tensor(tokens), torch.tensor(mask)
  positions = torch.clamp(m.cumsum(-1) - 1, min=0)  # perl_jax's positions for left padding
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=m, position_ids=positions).logits.float().numpy()


def _max_diff_real(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  return float(np.abs(a - b)[mask.astype(bool)].max())


# --- Causal LMs -----------------------------------------------------------------------------

GPT2_PARTIAL = (r"layers_0/attn/(q|v)/kernel$", r"mlp/down/kernel$")
CASES = {
    "llama": (ALL_TARGETS, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                            "v_proj"]),
    "gemma2": (ATTENTION_TARGETS, ["k_proj", "o_proj", "q_proj", "v_proj"]),
    # q and v of layer 0 share GPT-2's fused c_attn (one rank-2r adapter); "c_proj" alone would
    # also select the attention output projections, so full module paths are listed.
    "gpt2": (GPT2_PARTIAL, ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                            "transformer.h.1.mlp.c_proj"]),
}


@pytest.mark.parametrize("family", list(CASES))
def test_causal_lm_merged_and_peft_match_perl_jax(family, bases, tmp_path):
  get, tokenizer_dir, vocab = bases
  base = get(family)
  targets, target_modules = CASES[family]
  lcfg = LoraConfig(rank=4, alpha=8.0, targets=targets)
  common.save_model(tmp_path / "wd" / "policy", _lora_model(base, tokenizer_dir, lcfg))
  tokens, mask = _batch(vocab)
  want = _ours(tmp_path / "wd" / "policy", tokens, mask)
  base_model = _torch(base)
  assert _max_diff_real(_theirs(base_model, tokens, mask), want, mask) > 1e-2  # adapters matter

  # merged: a plain transformers checkpoint with the tokenizer.
  record = export_lib.export(tmp_path / "wd", tmp_path / "merged")  # finds wd/policy
  assert record["source"] == str((tmp_path / "wd" / "policy").resolve())
  assert "tokenizer.json" in record["tokenizer_files"]
  assert _max_diff_real(_theirs(_torch(tmp_path / "merged"), tokens, mask), want, mask) <= TOL
  assert len(load_tokenizer(tmp_path / "merged")) == vocab

  # peft: adapters on the base checkpoint.
  export_lib.export(tmp_path / "wd", tmp_path / "peft", "peft")
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["target_modules"] == target_modules
  assert (config["task_type"], config["r"], config["lora_alpha"]) == ("CAUSAL_LM", 4, 8)
  assert config["base_model_name_or_path"] == str(base.resolve())
  tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
  if family == "llama":
    name = "base_model.model.model.layers.1.mlp.down_proj"
    assert tensors[f"{name}.lora_A.weight"].shape == (4, 96)  # [r, in]
    assert tensors[f"{name}.lora_B.weight"].shape == (64, 4)  # [out, r]
  if family == "gpt2":
    assert config["fan_in_fan_out"] and list(config["rank_pattern"].values()) == [8]
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 8)
  theirs = peft.PeftModel.from_pretrained(_torch(config["base_model_name_or_path"]),
                                          tmp_path / "peft").eval()
  assert _max_diff_real(_theirs(theirs, tokens, mask), want, mask) <= TOL


# --- Reward models --------------------------------------------------------------------------


def test_reward_model_merged_and_peft_scores(bases, tmp_path):
  get, tokenizer_dir, vocab = bases
  base = get("llama")
  lcfg = LoraConfig(rank=4, alpha=16.0, targets=ATTENTION_TARGETS)
  gain, bias = 1.7, -0.4
  model = _lora_model(base, tokenizer_dir, lcfg, head="scalar", gain=gain, bias=bias)
  common.save_model(tmp_path / "wd" / "model", model)
  tokens, mask = _batch(vocab, seed=1)
  scores = reward.score_fn(model.module)
  want = np.asarray(scores(model.variables(), tokens, mask.astype(bool), gain, bias))
  frozen_only = common.variables(model.frozen, {"params": model.trainable["params"]})
  assert np.abs(np.asarray(scores(frozen_only, tokens, mask.astype(bool), gain, bias))
                - want).max() > 1e-2  # adapters matter

  # merged: *ForSequenceClassification with the gain in its weight, the bias in its config.
  record = export_lib.export(tmp_path / "wd", tmp_path / "merged")
  assert record["reward"]["gain"] == gain and record["reward"]["bias"] == bias
  merged = _torch(tmp_path / "merged", "scalar")
  assert type(merged).__name__ == "LlamaForSequenceClassification"
  assert merged.config.reward_bias == bias
  got = _theirs(merged, tokens, mask)[:, 0] + merged.config.reward_bias
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

  # peft: SEQ_CLS adapters plus the head (modules_to_save) on the causal-LM base.
  record = export_lib.export(tmp_path / "wd", tmp_path / "peft", "peft")
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
  theirs = peft.PeftModel.from_pretrained(_torch(base, "scalar"), tmp_path / "peft").eval()
  got = _theirs(theirs, tokens, mask)[:, 0] + record["reward"]["bias"]
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


# --- Full fine-tuning, errors, the command line ---------------------------------------------


def test_full_fine_tune_exports_merged_only(bases, tmp_path):
  get, tokenizer_dir, _ = bases
  base = get("llama")
  cfg, params = common.BaseCache().get(str(base))
  full = common.Model(Transformer(cfg), {"params": {}}, {"params": params}, None,
                      str(tokenizer_dir))
  common.save_model(tmp_path / "full", full)
  with pytest.raises(ValueError, match="full fine-tune.*--format=merged"):
    export_lib.export(tmp_path / "full", tmp_path / "peft", "peft")
  export_lib.export(tmp_path / "full", tmp_path / "bf16", dtype="bfloat16")
  tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
  assert {str(x.dtype) for x in tensors.values()} == {"bfloat16"}
  # An already merged HF checkpoint (SFT's hf/) has no adapters either.
  with pytest.raises(ValueError, match="merged Hugging Face checkpoint"):
    export_lib.export(base, tmp_path / "peft", "peft")


def test_errors_name_the_directory(bases, tmp_path):
  empty = tmp_path / "empty"
  (empty / "sft").mkdir(parents=True)
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"nothing to export in '{empty}'") + ".*policy/, model/"):
    export_lib.export(empty, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export_lib.export(tmp_path / "missing", tmp_path / "out")
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "file").write_text("x")
  with pytest.raises(ValueError, match="not an empty directory"):
    export_lib.export(bases[0]("llama"), tmp_path / "taken")

  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "perl_jax.export", f"--workdir={empty}",
                         f"--out={tmp_path / 'out'}", "--format=peft"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and f"error: nothing to export in '{empty}'" in proc.stderr


def test_lora_sft_run_exports_as_peft(tmp_path):
  """A real LoRA SFT run: its saved adapters, through peft, give SFT's own merged hf/ logits."""
  from perl_jax import config
  from perl_jax.data import synthetic
  from perl_jax.trainers import sft

  base = tmp_path / "base"
  vocab = len(synthetic.build_tokenizer(base))
  tiny_hf_model("llama", base, vocab_size=vocab, seed=2)
  c = one_device(config.sft_config())
  c.policy.init, c.lora.rank, c.lora.alpha = str(base), 4, 8.0
  c.total_iterations, c.log_every, c.eval_every, c.progress = 3, 3, 3, False
  c.data.batch_size, c.optimizer.lr = 8, 0.05  # large steps: the adapters move off B = 0
  sft.train(c, str(tmp_path / "sft"))
  export_lib.export(tmp_path / "sft", tmp_path / "peft", "peft")  # finds sft/model
  tokens, mask = _batch(vocab, seed=2)
  want = _theirs(_torch(tmp_path / "sft" / "hf"), tokens, mask)
  base_model = _torch(base)
  assert _max_diff_real(_theirs(base_model, tokens, mask), want, mask) > 1e-2
  theirs = peft.PeftModel.from_pretrained(base_model, tmp_path / "peft").eval()
  assert _max_diff_real(_theirs(theirs, tokens, mask), want, mask) <= TOL
