"""Tokenizers: load from local directories, check against a model, encode prompts, train a tiny BPE.

Design
------
* Tokenizers are always read from a local directory (``local_files_only``): training jobs must
  not reach the network, and a missing directory is reported with its path instead of as a
  Hub lookup failure.
* Prompts are LEFT-padded, the layout the sampler needs (every row's last real token sits in
  the last slot). The pad id must exist and differ from every EOS id: when pad equals EOS, the
  EOS at the end of a response is indistinguishable from padding and is easily masked out of
  the loss, which teaches models never to stop.
* `train_bpe_tokenizer` trains a byte-level BPE with the `tokenizers` library (every byte is
  in the alphabet, so any text encodes) with fixed special ids ``<pad>=0 <bos>=1 <eos>=2``,
  matching `perl_jax.models.tiny_config`, and prepends ``<bos>`` when encoding. It is saved
  with ``save_pretrained`` so `load_tokenizer` (AutoTokenizer) reads it back; tests, demos and
  synthetic tasks use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PathLike = str | os.PathLike
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2
_BYTE_ALPHABET = 256
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(ValueError):
  """A tokenizer that cannot be used: unreadable, no pad token, or not fitting the model."""


class TokenizerNotFoundError(TokenizerError, FileNotFoundError):
  """No tokenizer where one was expected (also a FileNotFoundError, as it always was)."""


def load_tokenizer(path: PathLike) -> Any:
  """A transformers tokenizer from a local directory (never downloads)."""
  import transformers

  path = Path(path)
  if not path.is_dir():
    raise TokenizerNotFoundError(f"tokenizer directory {str(path)!r} does not exist")
  if not any((path / name).exists() for name in _TOKENIZER_FILES):
    raise TokenizerNotFoundError(f"no tokenizer in {str(path)!r}: none of "
                                 f"{', '.join(_TOKENIZER_FILES)}")
  try:
    if (path / "tokenizer.json").exists():
      # Same tokenizer as AutoTokenizer gives for a fast tokenizer, without AutoTokenizer's
      # import of torch (~270 MB of resident memory in every trainer process).
      return transformers.PreTrainedTokenizerFast.from_pretrained(str(path),
                                                                  local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  except (OSError, ValueError) as e:
    raise TokenizerError(f"could not load a tokenizer from {str(path)!r}: {e}") from e


def eos_ids(tokenizer: Any, model_cfg: Any = None) -> tuple[int, ...]:
  """Every id that ends a response: the tokenizer's EOS plus the model config's EOS ids."""
  ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
  if model_cfg is not None:
    ids += [int(i) for i in model_cfg.eos_token_ids]
  return tuple(dict.fromkeys(ids))  # ordered, unique


def check_vocab(tokenizer: Any, model_cfg: Any, model_name: str | None = None) -> None:
  """Raises `TokenizerError` if some token id of `tokenizer` is out of range for the model's
  embedding table (`model_name`, a path, names the model in the message).

  A model's table may be larger than the tokenizer (padded vocabularies), never smaller.
  """
  n = len(tokenizer)  # base vocabulary plus added tokens
  if n > model_cfg.vocab_size:
    source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    model = f"model {model_name}" if model_name else "the model"
    raise TokenizerError(f"tokenizer {source} has {n} tokens (ids up to {n - 1}) but {model}'s "
                         f"vocab_size is {model_cfg.vocab_size}: they do not belong together")


def _pad_id(tokenizer: Any, pad_id: int | None) -> int:
  pad = tokenizer.pad_token_id if pad_id is None else pad_id
  source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
  if pad is None:
    raise TokenizerError(f"tokenizer {source} has no pad token; add one (e.g. "
                         "tokenizer.add_special_tokens({'pad_token': '<pad>'})) or pass pad_id")
  if pad in eos_ids(tokenizer):
    raise TokenizerError(f"tokenizer {source}: the pad id {pad} equals the EOS id: padding with "
                         "EOS hides the real EOS and teaches models never to stop; use a "
                         "distinct pad token")
  return int(pad)


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_len: int | None = None, *,
                   truncate: bool = False,
                   pad_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Encodes `texts` LEFT-padded to one length: (tokens_BxP int32, mask_BxP bool).

  P is `max_len` when given (a fixed shape avoids recompiles), else the longest prompt. A
  prompt longer than `max_len` is an error unless `truncate`, which keeps its LAST `max_len`
  tokens (the text the model continues from). Special tokens (e.g. BOS) are added as the
  tokenizer is configured to. `pad_id` overrides the tokenizer's pad token.
  """
  if isinstance(texts, str):
    raise TypeError("encode_prompts takes a sequence of strings, not one string")
  pad = _pad_id(tokenizer, pad_id)
  encoded = [list(ids) for ids in tokenizer(list(texts))["input_ids"]]
  if not encoded:
    raise ValueError("encode_prompts got no texts")
  longest = max(len(ids) for ids in encoded)
  length = longest if max_len is None else max_len
  if longest > length:
    if not truncate:
      raise ValueError(f"a prompt has {longest} tokens, more than max_len={length} "
                       "(pass truncate=True to keep the last max_len tokens)")
    encoded = [ids[len(ids) - length:] if len(ids) > length else ids for ids in encoded]
  if any(len(ids) == 0 for ids in encoded):
    raise ValueError("a prompt encodes to no tokens; the sampler needs at least one per row")
  tokens_BxP = np.full((len(encoded), length), pad, np.int32)
  mask_BxP = np.zeros((len(encoded), length), bool)
  for i, ids in enumerate(encoded):
    if ids:
      tokens_BxP[i, length - len(ids):] = ids
      mask_BxP[i, length - len(ids):] = True
  return tokens_BxP, mask_BxP


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: PathLike) -> Any:
  """Trains a byte-level BPE on `texts`, saves it to `out_dir` and returns it (fast tokenizer).

  Special tokens: ``<pad>=0 <bos>=1 <eos>=2``; encoding prepends ``<bos>``. `vocab_size` counts
  the 256 byte tokens and the 3 special tokens, so it must be at least 259.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  import transformers

  minimum = _BYTE_ALPHABET + len(SPECIAL_TOKENS)
  if vocab_size < minimum:
    raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs "
                     f"{_BYTE_ALPHABET} byte tokens + {len(SPECIAL_TOKENS)} special tokens = "
                     f"{minimum} at least")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(texts), trainer=trainer)
  ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
  if [ids[t] for t in SPECIAL_TOKENS] != [0, 1, 2]:
    raise RuntimeError(f"special tokens got ids {ids}, expected <pad>=0 <bos>=1 <eos>=2")
  tok.post_processor = processors.TemplateProcessing(
      single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<bos>", eos_token="<eos>",
                                              padding_side="left")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out_dir))
  return fast
