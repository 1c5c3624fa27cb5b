"""The embedded default task: a tiny synthetic language with a known gold reward (no downloads).

**The gold reward of a response is the fraction of its words that are colour names.** Words are
what the tokenizer's whitespace pre-tokenizer yields (runs of word characters, or runs of
punctuation), so ``"red fox ."`` has 3 words and reward 1/3, and an empty response scores 0.

Design
------
* The vocabulary is about 40 words (`VOCAB`): 8 colours, 10 animals/objects, 6 verbs and the
  function words of the prompt templates, plus ``<pad>=0 <bos>=1 <eos>=2 <unk>=3``. The
  tokenizer is word-level, so one word is one token and a 2-layer, 64-wide model learns the
  language in a few hundred steps.
* Prompts fill a few templates with nouns: ``"tell me about the fox and the bird"``.
* Responses follow one of five patterns (`RESPONSE_PATTERNS`, 4 to 8 words, e.g.
  ``N V N and the N .``). Each content slot (N noun, V verb) holds a colour with the
  response's *colour rate*, else a noun (mostly one named in the prompt, so the policy has to
  read the prompt) or a verb. A grammatical response therefore scores at most 0.75; more needs
  ungrammatical text, the kind of reward hacking the KL penalty is there to limit.
* SFT demonstrations use a colour rate of 0.25 (mean gold about 0.17), so the SFT policy starts
  well below the best achievable reward and RL has room to improve.
* Preference pairs draw each response's colour rate uniformly from [0, 0.8], so the two golds
  usually differ (pairs with equal gold are redrawn); the higher-gold response is "chosen",
  flipped with probability `label_noise` to imitate rater noise. Held-out pairs carry gold
  labels, so reward-model accuracy is measured against the truth.
* `prepare` writes everything to a directory with a manifest of its arguments and reuses the
  files when called again with the same arguments.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from perl_jax.data.jsonl import write_jsonl

PathLike = str | os.PathLike

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0, 1, 2, 3
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown")
NOUNS = ("fox", "bird", "cat", "dog", "fish", "ball", "tree", "house", "hat", "boat")
VERBS = ("sees", "likes", "has", "finds", "wants", "chases")
FUNCTION_WORDS = ("the", "a", "and", "of", "tell", "me", "about", "describe", "write", "story",
                  ".")
VOCAB = SPECIAL_TOKENS + COLOURS + NOUNS + VERBS + FUNCTION_WORDS  # in id order

PROMPT_TEMPLATES = ("tell me about the {0} and the {1}", "describe the {0}",
                    "write a story about the {0}", "write a story of the {0} and a {1}")
# N: a noun slot, V: a verb slot; either may hold a colour instead.
RESPONSE_PATTERNS = ("N V N .", "the N V N .", "N V N and N .", "N V N and the N .",
                     "N V N and N V N .")
MAX_RESPONSE_WORDS = max(len(p.split()) for p in RESPONSE_PATTERNS)
SFT_COLOUR_RATE = 0.25
PREFERENCE_MAX_RATE = 0.8
PROMPT_NOUN_RATE = 0.7  # chance a non-colour noun slot names a noun from the prompt

# Token counts that fit every record generated here: the longest template plus <bos>, the
# longest response (EOS is added by the encoders, outside max_response_len).
MAX_PROMPT_LEN = max(len(t.split()) for t in PROMPT_TEMPLATES) + 1
MAX_RESPONSE_LEN = MAX_RESPONSE_WORDS

DEFAULT_SIZES = {"prompts": 2048, "sft_train": 2048, "sft_eval": 256, "pref_train": 2048,
                 "pref_eval": 256}
_FILES = {"prompts": "prompts.jsonl", "sft_train": "sft_train.jsonl",
          "sft_eval": "sft_eval.jsonl", "pref_train": "pref_train.jsonl",
          "pref_eval": "pref_eval.jsonl"}
_MANIFEST = "manifest.json"
_FORMAT = 1  # bump when the generators change, so old directories are regenerated
_WORD = re.compile(r"\w+|[^\w\s]+")  # the `Whitespace` pre-tokenizer's split
_COLOUR_SET = frozenset(COLOURS)


def build_tokenizer(out_dir: PathLike) -> Any:
  """The word-level tokenizer of the language, saved to `out_dir` (`load_tokenizer` reads it).

  Encoding prepends ``<bos>``; words outside `VOCAB` become ``<unk>``; decoding joins words
  with single spaces, so a response decodes back to exactly its text.
  """
  return word_level_tokenizer(VOCAB, out_dir)


def word_level_tokenizer(vocab: Sequence[str], out_dir: PathLike) -> Any:
  """A word-level fast tokenizer over `vocab` (in id order, starting with `SPECIAL_TOKENS`)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  import transformers

  if tuple(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
    raise ValueError(f"the vocabulary must start with {SPECIAL_TOKENS}")
  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)},
                                              unk_token="<unk>"))
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
  # WordPiece without a "##" continuation in the vocabulary puts one space between words;
  # cleanup=False keeps " ." as it is, so decode inverts encode.
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
      unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out_dir))
  return fast


def words(text: str) -> list[str]:
  """The words of `text` as the tokenizer splits them."""
  return _WORD.findall(text)


def gold_reward(texts: Sequence[str]) -> np.ndarray:
  """float32 [B] in [0, 1]: the fraction of each text's words that are colour names (0 if none)."""
  if isinstance(texts, str):
    raise TypeError("gold_reward takes a sequence of strings, not one string")
  out = np.zeros(len(texts), np.float32)
  for i, text in enumerate(texts):
    ws = words(text)
    if ws:
      out[i] = sum(w in _COLOUR_SET for w in ws) / len(ws)
  return out


def _prompt(rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
  template = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))]
  nouns = tuple(NOUNS[i] for i in rng.choice(len(NOUNS), 2, replace=False))
  n_used = template.count("{")
  return template.format(*nouns), nouns[:n_used]


def _response(rng: np.random.Generator, colour_rate: float, prompt_nouns: Sequence[str]) -> str:
  out = []
  for slot in RESPONSE_PATTERNS[rng.integers(len(RESPONSE_PATTERNS))].split():
    if slot not in ("N", "V"):
      out.append(slot)
    elif rng.random() < colour_rate:
      out.append(COLOURS[rng.integers(len(COLOURS))])
    elif slot == "V":
      out.append(VERBS[rng.integers(len(VERBS))])
    elif rng.random() < PROMPT_NOUN_RATE:
      out.append(prompt_nouns[rng.integers(len(prompt_nouns))])
    else:
      out.append(NOUNS[rng.integers(len(NOUNS))])
  return " ".join(out)


def _check_n(n: int) -> None:
  if n < 1:
    raise ValueError(f"the number of records must be >= 1, got {n}")


def make_prompts(n: int, seed: int) -> list[str]:
  """`n` prompts such as "tell me about the fox and the bird"."""
  _check_n(n)
  rng = np.random.default_rng((seed, 0))
  return [_prompt(rng)[0] for _ in range(n)]


def make_sft_records(n: int, seed: int) -> list[dict[str, str]]:
  """`n` imperfect demonstrations {"prompt", "response"}; content words are colours w.p. 0.25."""
  _check_n(n)
  rng = np.random.default_rng((seed, 1))
  records = []
  for _ in range(n):
    prompt, nouns = _prompt(rng)
    records.append({"prompt": prompt, "response": _response(rng, SFT_COLOUR_RATE, nouns)})
  return records


def make_preference_records(n: int, seed: int, label_noise: float = 0.1) -> list[dict[str, str]]:
  """`n` pairs {"prompt", "chosen", "rejected"}: chosen has the higher gold reward, except that
  the labels are swapped with probability `label_noise`. Pairs with equal gold are redrawn."""
  _check_n(n)
  if not 0.0 <= label_noise <= 0.5:
    raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
  rng = np.random.default_rng((seed, 2))
  records = []
  for _ in range(n):
    prompt, nouns = _prompt(rng)
    while True:
      a, b = (_response(rng, rng.uniform(0.0, PREFERENCE_MAX_RATE), nouns) for _ in range(2))
      gold_a, gold_b = gold_reward([a, b])
      if gold_a != gold_b:
        break
    chosen, rejected = (a, b) if gold_a > gold_b else (b, a)
    if rng.random() < label_noise:
      chosen, rejected = rejected, chosen
    records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
  return records


def make_pointwise_records(n: int, seed: int) -> list[dict[str, Any]]:
  """`n` thumbs-up/down records {"prompt", "response", "label"} with label = gold > 0.5.

  Colour rates are uniform in [0, 1], so both labels occur.
  """
  _check_n(n)
  rng = np.random.default_rng((seed, 3))
  records = []
  for _ in range(n):
    prompt, nouns = _prompt(rng)
    response = _response(rng, rng.uniform(0.0, 1.0), nouns)
    records.append({"prompt": prompt, "response": response,
                    "label": bool(gold_reward([response])[0] > 0.5)})
  return records


def prepare(data_dir: PathLike, seed: int = 0, sizes: Mapping[str, int] | None = None,
            label_noise: float = 0.1) -> dict[str, str]:
  """Writes the task to `data_dir` and returns the paths, keyed "tokenizer", "prompts",
  "sft_train", "sft_eval", "pref_train" (labels with `label_noise`) and "pref_eval" (gold labels).

  `sizes` overrides entries of `DEFAULT_SIZES`. A second call with the same arguments finds
  the manifest and reuses the files; other arguments regenerate them.
  """
  unknown = set(sizes or {}) - set(DEFAULT_SIZES)
  if unknown:
    raise ValueError(f"unknown sizes {sorted(unknown)}; expected keys {sorted(DEFAULT_SIZES)}")
  sizes = {**DEFAULT_SIZES, **(sizes or {})}
  data_dir = Path(data_dir)
  paths = {"tokenizer": str(data_dir / "tokenizer")}
  paths.update({k: str(data_dir / name) for k, name in _FILES.items()})
  manifest = {"format": _FORMAT, "seed": seed, "sizes": sizes, "label_noise": label_noise}
  manifest_path = data_dir / _MANIFEST
  try:
    if (json.loads(manifest_path.read_text()) == manifest
        and all(Path(p).exists() for p in paths.values())):
      return paths
  except (OSError, ValueError):
    pass  # missing or unreadable manifest: regenerate
  data_dir.mkdir(parents=True, exist_ok=True)
  manifest_path.unlink(missing_ok=True)  # written last: its presence marks a complete directory
  build_tokenizer(paths["tokenizer"])
  # Distinct seeds per split, so eval records are not a replay of training records.
  split_seed = {k: [seed, i] for i, k in enumerate(_FILES)}
  write_jsonl(paths["prompts"], ({"prompt": p} for p in
                                 make_prompts(sizes["prompts"], _seed(split_seed["prompts"]))))
  for split in ("sft_train", "sft_eval"):
    write_jsonl(paths[split], make_sft_records(sizes[split], _seed(split_seed[split])))
  write_jsonl(paths["pref_train"], make_preference_records(
      sizes["pref_train"], _seed(split_seed["pref_train"]), label_noise))
  write_jsonl(paths["pref_eval"], make_preference_records(
      sizes["pref_eval"], _seed(split_seed["pref_eval"]), 0.0))
  tmp = manifest_path.with_name(_MANIFEST + ".tmp")
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, manifest_path)
  return paths


def _seed(entropy: Sequence[int]) -> int:
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
