"""Input-pipeline speed: examples/s of read + format + tokenize + batch; prints, asserts nothing.

Usage::

  python -m perl_jax.benchmarks.input_pipeline               # 4096 HH-like records
  python -m perl_jax.benchmarks.input_pipeline --records=8192 --batch=64

What is measured
----------------
Synthetic text shaped like HH-RLHF (`make_records`): multi-turn dialogues of 1-4 exchanges
with prompts of ~150-350 words and responses of ~30-120 words, drawn from a Zipf-distributed
5,000-word lexicon, so a byte-level BPE (``--vocab`` tokens, fitted to the text) gives
realistic token counts. Each row times `perl_jax.data.pipeline.Batches.batch` over every batch
of one epoch (no prefetch thread: the figure is the work one pipeline thread does, which is
what must keep up with the accelerator) and reports examples/s, prompt + response tokens/s and
process CPU seconds per 1,000 examples:

* ``pairwise``: `encode_pairs` (prompt + chosen + rejected) at P=512, R=256 (the reward
  trainer);
* ``sft``: `encode_sft` (the SFT trainer);
* ``prompts``: prompts only (PPO);
* ``pairwise, chat``: ``pairwise`` with a chat template applied to the turns first;
* ``pairwise, TFDS``: ``pairwise`` reading the records from a prepared array_record dataset
  (`perl_jax.data.tfds_builders`) instead of a list.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from perl_jax.benchmarks import print_table

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_lexicon(n: int, rng: np.random.Generator) -> list[str]:
  letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
  p = 1.0 / np.arange(1, 27)
  p /= p.sum()
  return ["".join(rng.choice(letters, size=int(rng.integers(2, 10)), p=p)) for _ in range(n)]


def make_records(n: int, seed: int = 0) -> list[dict[str, Any]]:
  """`n` HH-like dialogues as published HH lines: {"chosen", "rejected"}."""
  rng = np.random.default_rng(seed)
  lexicon = make_lexicon(5000, rng)
  weights = 1.0 / np.arange(1, len(lexicon) + 1)
  weights /= weights.sum()

  def text(lo: int, hi: int) -> str:
    words = rng.choice(len(lexicon), size=int(rng.integers(lo, hi)), p=weights)
    out = " ".join(lexicon[w] for w in words)
    return out[0].upper() + out[1:] + "."

  rows = []
  for _ in range(n):
    turns = int(rng.integers(1, 5))
    dialogue = "".join(f"\n\nHuman: {text(20, 60)}\n\nAssistant: {text(20, 60)}"
                       for _ in range(turns - 1)) + f"\n\nHuman: {text(20, 80)}"
    rows.append({"chosen": dialogue + "\n\nAssistant: " + text(30, 120),
                 "rejected": dialogue + "\n\nAssistant: " + text(30, 120)})
  return rows


def parsed(rows: list[dict], tmp: str) -> list:
  """The rows through the HH parser, as `Record`s (what the TFDS builder stores)."""
  import collections

  from perl_jax.data import published
  from perl_jax.data.jsonl import Record

  path = os.path.join(tmp, "train.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return [Record({k: v for k, v in ex.items() if k != "source"}, src)
          for src, ex in published.hh_rlhf(path, collections.Counter())]


def measure(batches: Any, n_batches: int) -> tuple[float, float, int]:
  """(wall s, process CPU s, tokens) to build `n_batches` batches."""
  tokens = 0
  wall, cpu = time.perf_counter(), time.process_time()
  for p in range(n_batches):
    arrays = batches.batch(p).arrays
    tokens += int(sum(v.sum() for k, v in arrays.items() if k.endswith("mask_BxT")
                      or k == "mask_BxP"))
  return time.perf_counter() - wall, time.process_time() - cpu, tokens


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--records", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--max_prompt_len", type=int, default=512)
  ap.add_argument("--max_response_len", type=int, default=256)
  args = ap.parse_args()

  from perl_jax.data import jsonl, tfds_builders
  from perl_jax.data.formatting import PromptFormatter
  from perl_jax.data.pipeline import Batches
  from perl_jax.tokenizers import train_bpe_tokenizer

  P, R = args.max_prompt_len, args.max_response_len
  with tempfile.TemporaryDirectory() as tmp:
    rows = make_records(args.records)
    records = parsed(rows, tmp)
    texts = [r[k] for r in records[:1000] for k in ("prompt", "chosen")]
    tokenizer = train_bpe_tokenizer(texts, args.vocab, os.path.join(tmp, "tok"))
    os.makedirs(os.path.join(tmp, "manual"))
    os.replace(os.path.join(tmp, "train.jsonl"), os.path.join(tmp, "manual", "train.jsonl"))
    tfds_builders.prepare("hh_rlhf", os.path.join(tmp, "manual"), os.path.join(tmp, "tfds"))
    tfds_records = tfds_builders.load("hh_rlhf", "train", os.path.join(tmp, "tfds"))

    plain = PromptFormatter(tokenizer, "plain")
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = PromptFormatter(tokenizer, "chat")
    lengths = np.array([len(ids) for ids in tokenizer([r["prompt"] for r in records[:512]])[
        "input_ids"]])
    print(f"{len(records)} records, BPE vocab {len(tokenizer)}, prompt tokens: median "
          f"{int(np.median(lengths))}, max {lengths.max()} (P={P}, R={R}, truncate=left)")

    def pairs(fmt):
      return lambda recs: jsonl.encode_pairs(tokenizer, fmt.records(recs, "pairwise"), P, R,
                                             "left")

    cases = {
        "pairwise": (records, pairs(plain)),
        "sft": (records, lambda recs: jsonl.encode_sft(
            tokenizer, plain.records([{**r, "response": r["chosen"]} for r in recs], "sft"),
            P, R, "left")),
        "prompts": (records, lambda recs: dict(zip(("tokens_BxP", "mask_BxP"),
                                                   jsonl.encode_prompt_batch(
                                                       tokenizer, plain.records(recs, "prompts"),
                                                       P, "left")[:2]))),
        "pairwise, chat": (records, pairs(chat)),
        "pairwise, TFDS": (tfds_records, pairs(plain)),
    }
    rows_out = []
    for name, (source, encode) in cases.items():
      batches = Batches(source, encode, args.batch, seed=0, process_index=0, process_count=1,
                        prefetch=0)
      batches.batch(0)  # warm-up (tokenizer caches)
      n = len(batches)
      wall, cpu, tokens = measure(batches, n)
      examples = n * args.batch
      rows_out.append([name, examples, f"{examples / wall:,.0f}", f"{tokens / wall:,.0f}",
                       f"{1000 * cpu / examples:.2f}"])
    print_table(f"tokenise + batch, batch {args.batch}, one thread (TOKENIZERS_PARALLELISM="
                f"{os.environ.get('TOKENIZERS_PARALLELISM', 'unset')})",
                ["case", "examples", "examples/s", "tokens/s", "CPU s / 1k ex"], rows_out)


if __name__ == "__main__":
  main()
