"""A one-minute tour of the model core that downloads nothing.

    python -m perl_jax.demo [--workdir=DIR] [--steps=300]

1. writes a small synthetic language ("the red cat sees a small dog .") and trains a byte-level
   BPE tokenizer on it;
2. trains a tiny Llama on it with plain next-token loss (a few seconds on a CPU);
3. saves it as a Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer),
   the format `transformers` and every perl_jax tool read;
4. reloads that directory and samples from it with the compiled KV-cache sampler, exactly as
   ``python -m perl_jax.generate --model=DIR`` does.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

_WORDS = dict(det=["the", "a"], adj=["red", "small", "happy", "old", "green"],
              noun=["cat", "dog", "bird", "fox", "child"],
              verb=["sees", "chases", "likes", "follows"])


def synthetic_corpus(n: int, seed: int) -> list[str]:
  """Sentences 'det adj noun verb det adj noun .' drawn uniformly."""
  import numpy as np

  rng = np.random.default_rng(seed)
  pick = lambda k: _WORDS[k][rng.integers(len(_WORDS[k]))]
  return [" ".join([pick("det"), pick("adj"), pick("noun"), pick("verb"), pick("det"),
                    pick("adj"), pick("noun"), "."]) for _ in range(n)]


def train_tiny_lm(tokenizer, corpus: Sequence[str], steps: int, seed: int):
  """Full-parameter next-token training of a tiny Llama; returns (config, params)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from perl_jax.models import Transformer, init_params, tiny_config

  cfg = tiny_config("llama", vocab_size=len(tokenizer), num_layers=2, embed_dim=64,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
  model = Transformer(cfg)
  ids = [x + [tokenizer.eos_token_id] for x in tokenizer(list(corpus))["input_ids"]]
  length = max(map(len, ids))
  tokens = np.full((len(ids), length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(ids), length), bool)
  for i, x in enumerate(ids):  # right-padded: training sequences start at position 0
    tokens[i, :len(x)], mask[i, :len(x)] = x, True

  def loss_fn(params, tokens_BxT, mask_BxT):
    logits = model.apply({"params": params}, tokens_BxT, mask_BxT=mask_BxT)[:, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_BxT[:, 1:, None], -1)[..., 0]
    target_mask = mask_BxT[:, 1:]
    return (nll * target_mask).sum() / target_mask.sum()

  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, tokens_BxT, mask_BxT):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BxT, mask_BxT)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params = init_params(model, jax.random.PRNGKey(seed))
  opt_state = opt.init(params)
  rng = np.random.default_rng(seed)
  for i in range(steps):
    rows = rng.integers(len(ids), size=32)
    params, opt_state, loss = step(params, opt_state, tokens[rows], mask[rows])
    if i % 100 == 0 or i == steps - 1:
      print(f"  step {i:4d}  loss {float(loss):.3f}")
  return cfg, params


def main(argv: Sequence[str] | None = None) -> None:
  # argparse, not absl flags: perl_jax.generate (imported below) defines absl flags of its own.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=None, help="where to write the model (default: temp)")
  parser.add_argument("--steps", type=int, default=300, help="training steps")
  parser.add_argument("--seed", type=int, default=0, help="random seed")
  args = parser.parse_args(argv)
  from perl_jax.generate import generate
  from perl_jax.models import save_hf_checkpoint
  from perl_jax.sampling import SamplingConfig
  from perl_jax.tokenizers import train_bpe_tokenizer

  workdir = Path(args.workdir or tempfile.mkdtemp(prefix="perl_jax_demo_"))
  model_dir = workdir / "model"
  corpus = synthetic_corpus(2000, args.seed)
  print(f"1. synthetic corpus, e.g. {corpus[0]!r}; training a BPE tokenizer")
  tokenizer = train_bpe_tokenizer(corpus, vocab_size=320, out_dir=model_dir)
  print(f"2. training a tiny Llama for {args.steps} steps")
  t0 = time.time()
  cfg, params = train_tiny_lm(tokenizer, corpus, args.steps, args.seed)
  print(f"   {time.time() - t0:.1f} s, {cfg.num_params():,} parameters")
  save_hf_checkpoint(cfg, params, model_dir)
  print(f"3. saved a Hugging Face checkpoint to {model_dir}: {sorted(os.listdir(model_dir))}")
  prompts = ["the red cat", "a small dog chases"]
  print("4. sampling from the reloaded checkpoint")
  for name, scfg in [("greedy", SamplingConfig(max_new_tokens=16, temperature=0.0)),
                     ("temperature 1, top-p 0.9, 2 samples per prompt",
                      SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9,
                                     num_samples=2))]:
    t0 = time.time()
    result = generate(model_dir, prompts, scfg, seed=args.seed)
    print(f"--- {name} ({time.time() - t0:.1f} s incl. load and compile)")
    for s in result["samples"]:
      print(f"   {s['prompt']!r} -> {s['text']!r}")
  print(f"Try: python -m perl_jax.generate --model={model_dir} --prompt='the old fox' "
        "--max_new_tokens=12 --temperature=0")


if __name__ == "__main__":
  main()
