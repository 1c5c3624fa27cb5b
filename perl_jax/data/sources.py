"""What the trainers and `perl_jax.train.check_inputs` share about a run's records.

* `tfds_split`: ``data.tfds`` / ``data.tfds_dir`` and the split keys -> a lazy sequence of
  records of the kind a trainer reads (errors name the config key);
* `formatter`: ``data.prompt_format`` / ``data.prompt_template`` for a tokenizer;
* `encode_all`: one pass over every record (chunked for large lazy sources), to report bad
  records and count the prompts ``data.truncate="left"`` cuts before training starts.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from perl_jax.data.formatting import PromptFormatter
from perl_jax.data.jsonl import DataError, Record

CHUNK = 4096  # records encoded at once when checking a lazy (TFDS) source


def split_name(c: Any, role: str) -> str:
  """The TFDS split a run reads for `role` ("train" or "eval")."""
  from perl_jax.data import published

  if role == "train":
    return c.data.tfds_train_split
  return c.data.tfds_eval_split or published.DATASETS[c.data.tfds][1]


def tfds_split(c: Any, role: str, kind: str) -> Sequence[Record]:
  """The `role` split of ``config.data.tfds`` as records of `kind` (read lazily)."""
  from perl_jax.data import tfds_builders

  split = split_name(c, role)
  try:
    return tfds_builders.load(c.data.tfds, split, c.data.tfds_dir, kind)
  except DataError as e:
    key = "data.tfds_train_split" if role == "train" else "data.tfds_eval_split"
    raise DataError(f"config.data.tfds={c.data.tfds} (split {split!r}, config.{key}): {e}"
                    ) from None


def name(c: Any, role: str, path: str = "") -> str:
  """How messages name the records of `role`: the JSONL path, or ``dataset/split``."""
  return f"{c.data.tfds}/{split_name(c, role)}" if c.data.tfds else path


def formatter(c: Any, tokenizer: Any) -> PromptFormatter:
  return PromptFormatter(tokenizer, c.data.prompt_format, c.data.prompt_template)


def materialize(records: Sequence[Record]) -> list[Record]:
  """Every record of `records` as a list (one batched read for a TFDS split)."""
  take = getattr(records, "take", None)
  return list(take(range(len(records)))) if take else list(records)


def encode_all(records: Sequence[Record], encode: Callable[[list], Mapping[str, np.ndarray]],
               chunk: int = CHUNK) -> int:
  """Runs `encode` over every record (a list in one call; a lazy source in chunks, so memory
  stays bounded); returns the number of prompts cut (sum of ``prompt_truncated_B``)."""
  take = getattr(records, "take", None)
  if take is None:
    return int(np.sum(encode(list(records))["prompt_truncated_B"]))
  n_cut = 0
  for start in range(0, len(records), chunk):
    part = take(range(start, min(start + chunk, len(records))))
    n_cut += int(np.sum(encode(part)["prompt_truncated_B"]))
  return n_cut


def prompt_cuts(tokenizer: Any, fmt: PromptFormatter, records: Sequence[Record], kind: str,
                max_prompt_len: int, truncate: str) -> int:
  """Prompts of `records` longer than `max_prompt_len` after formatting: an error naming them
  with ``truncate="error"``, else their number (prompts only are tokenized)."""
  from perl_jax.data import jsonl

  def encode(part: list) -> dict:
    _, _, n_cut = jsonl.encode_prompt_batch(tokenizer, fmt.records(part, kind), max_prompt_len,
                                            truncate)
    return {"prompt_truncated_B": np.asarray(n_cut)}

  return encode_all(records, encode)
