"""The generate CLI: a tiny HF Llama + BPE tokenizer on disk, run in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import tiny_hf_model
from perl_jax.generate import generate
from perl_jax.models import Transformer, load_hf_checkpoint
from perl_jax.sampling import SamplingConfig, sample
from perl_jax.tokenizers import encode_prompts, load_tokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama")
  tokenizer = train_bpe_tokenizer(TEXTS, 300, path)
  tiny_hf_model("llama", path, vocab_size=len(tokenizer))
  return path


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "perl_jax.generate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_json_matches_in_process_sample(model_dir):
  prompts = ["the cat", "a dog sat on"]
  proc = _cli(f"--model={model_dir}", f"--prompt={prompts[0]}", f"--prompt={prompts[1]}",
              "--max_new_tokens=6", "--temperature=0.8", "--top_k=40", "--top_p=0.95",
              "--num_samples=2", "--seed=3", "--json")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)

  cfg, params = load_hf_checkpoint(model_dir)
  tokenizer = load_tokenizer(model_dir)
  tokens, mask = encode_prompts(tokenizer, prompts)
  scfg = SamplingConfig(max_new_tokens=6, temperature=0.8, top_k=40, top_p=0.95, num_samples=2)
  out = sample(Transformer(cfg), {"params": params}, tokens, mask, jax.random.PRNGKey(3), scfg,
               eos_ids=(tokenizer.eos_token_id,), pad_id=tokenizer.pad_token_id)
  samples = result["samples"]
  assert [(s["prompt_index"], s["sample_index"]) for s in samples] == [(0, 0), (0, 1), (1, 0),
                                                                       (1, 1)]
  for row, s in enumerate(samples):
    keep = np.asarray(out.mask[row])
    assert s["prompt"] == prompts[row // 2]
    assert s["prompt_token_ids"] == tokenizer(s["prompt"])["input_ids"]
    assert s["token_ids"] == np.asarray(out.tokens[row])[keep].tolist()
    np.testing.assert_allclose(s["logprobs"], np.asarray(out.logprobs[row])[keep], atol=1e-5)
    assert s["text"] == tokenizer.decode(s["token_ids"], skip_special_tokens=True)
    assert s["ended"] == bool(out.ended[row])
  assert samples[0]["token_ids"] != samples[1]["token_ids"]  # two samples of one prompt


def test_cli_greedy_text_is_reproducible(model_dir):
  proc = _cli(f"--model={model_dir}", "--prompt=the dog", "--max_new_tokens=8", "--temperature=0")
  assert proc.returncode == 0, proc.stderr
  scfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
  again = generate(model_dir, ["the dog"], scfg, seed=123)  # the seed does not matter
  assert proc.stdout == again["samples"][0]["text"] + "\n"
  assert again == generate(model_dir, ["the dog"], scfg, seed=0)


def test_missing_model_dir_is_a_clear_error(tmp_path):
  missing = tmp_path / "no_such_model"
  with pytest.raises(FileNotFoundError, match="no_such_model"):
    generate(missing, ["hi"], SamplingConfig(max_new_tokens=2))
  proc = _cli(f"--model={missing}", "--prompt=hi")
  assert proc.returncode == 1
  assert f"error: model directory '{missing}' does not exist" in proc.stderr
  assert "Traceback" not in proc.stderr
