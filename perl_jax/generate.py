"""Command-line text generation from a local Hugging Face checkpoint directory.

    python -m perl_jax.generate --model=DIR --prompt="Once upon a time" --max_new_tokens=32 \\
        [--temperature=0] [--top_k=0] [--top_p=1] [--num_samples=1] [--seed=0] [--json]

DIR holds ``config.json``, the safetensors weights and the tokenizer files. The checkpoint is
loaded with `perl_jax.models.load_hf_checkpoint`, prompts are left-padded with
`perl_jax.tokenizers.encode_prompts`, and responses come from `perl_jax.sampling.sample`, the
same compiled sampler RL training uses, so what this prints is what a policy would roll out.
``--prompt`` may be repeated for a batch. Plain output is the decoded responses; ``--json``
prints one JSON object with the token ids, per-token log-probs (under the sampling
distribution; for greedy, log_softmax of the raw logits) and text of every sample.

The work is done by `generate`, which tests call in-process; `main` only parses flags.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from absl import app, flags, logging

if TYPE_CHECKING:  # jax is imported when generating, so `--help` stays fast
  from perl_jax.sampling import SamplingConfig

_MODEL = flags.DEFINE_string("model", None, "Hugging Face checkpoint directory with a tokenizer.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 is off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 is off.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Responses per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop a response at its EOS token.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "Parameter and compute dtype.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object with ids, log-probs and text.")


def _pad_id(tokenizer: Any, cfg: Any, eos: tuple[int, ...]) -> int:
  """The tokenizer's pad id, else the model's, else the smallest non-EOS id: any non-EOS id
  will do here, since pad only fills masked slots (left of short prompts, after an EOS)."""
  for candidate in (tokenizer.pad_token_id, cfg.pad_token_id):
    if candidate is not None and candidate not in eos:
      return int(candidate)
  return next(i for i in range(len(eos) + 1) if i not in eos)


def generate(model_dir: str | os.PathLike, prompts: Sequence[str], cfg: SamplingConfig,
             seed: int = 0,
             dtype: str = "float32") -> dict[str, Any]:
  """Samples `cfg.num_samples` responses per prompt; returns a JSON-ready dict.

  ``{'model': str, 'samples': [{'prompt_index', 'sample_index', 'prompt', 'prompt_token_ids',
  'token_ids', 'logprobs', 'text', 'ended'}, ...]}`` in prompt-major order; token_ids and
  logprobs cover the response tokens only (EOS included, padding excluded).
  """
  import jax
  import numpy as np

  from perl_jax.models import Transformer, load_hf_checkpoint
  from perl_jax.sampling import sample
  from perl_jax.tokenizers import check_vocab, encode_prompts, eos_ids, load_tokenizer

  model_dir = Path(model_dir)
  if not model_dir.is_dir():
    raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
  if not prompts:
    raise ValueError("give at least one prompt")
  model_cfg, params = load_hf_checkpoint(model_dir, dtype=dtype)  # computes in dtype too
  tokenizer = load_tokenizer(model_dir)
  check_vocab(tokenizer, model_cfg)
  eos = eos_ids(tokenizer, model_cfg)
  pad = _pad_id(tokenizer, model_cfg, eos)
  tokens_BxP, mask_BxP = encode_prompts(tokenizer, prompts, pad_id=pad)

  out = sample(Transformer(model_cfg), {"params": params}, tokens_BxP, mask_BxP,
               jax.random.PRNGKey(seed), cfg, eos_ids=eos, pad_id=pad)
  out = jax.tree.map(np.asarray, out)
  samples = []
  for row in range(out.tokens.shape[0]):
    i, j = divmod(row, cfg.num_samples)
    keep = out.mask[row]
    ids = out.tokens[row][keep].tolist()
    samples.append(dict(prompt_index=i, sample_index=j, prompt=prompts[i],
                        prompt_token_ids=out.prompt_tokens[row][out.prompt_mask[row]].tolist(),
                        token_ids=ids, logprobs=out.logprobs[row][keep].tolist(),
                        text=tokenizer.decode(ids, skip_special_tokens=True),
                        ended=bool(out.ended[row])))
  return {"model": str(model_dir), "samples": samples}


def format_text(result: dict[str, Any]) -> str:
  """The responses as plain text; with several, each under a header line."""
  samples = result["samples"]
  if len(samples) == 1:
    return samples[0]["text"]
  return "\n".join(f"=== prompt {s['prompt_index']} sample {s['sample_index']} ===\n{s['text']}"
                   for s in samples)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # keep jax's backend-probing INFO lines off stderr
  from perl_jax.sampling import SamplingConfig

  try:
    cfg = SamplingConfig(max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                         top_k=_TOP_K.value, top_p=_TOP_P.value, num_samples=_NUM_SAMPLES.value,
                         stop_at_eos=_STOP_AT_EOS.value)
    result = generate(_MODEL.value, _PROMPT.value, cfg, seed=_SEED.value, dtype=_DTYPE.value)
  except (FileNotFoundError, ValueError) as e:  # bad inputs: a message, not a traceback
    sys.exit(f"error: {e}")
  print(json.dumps(result) if _JSON.value else format_text(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["model", "prompt"])
  app.run(main)
