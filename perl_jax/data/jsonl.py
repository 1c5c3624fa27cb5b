"""Reading the trainers' JSON-lines data and encoding it into fixed-shape arrays.

Design
------
* One UTF-8 JSON object per line; blank lines are skipped, keys outside the schema are ignored.
  Four schemas (``KINDS``)::

      prompts    {"prompt": str}                                   RL prompts
      sft        {"prompt": str, "response": str}                  demonstrations
      pairwise   {"prompt": str, "chosen": str, "rejected": str}   preferences (Bradley-Terry)
      pointwise  {"prompt": str, "response": str, "label": bool}   thumbs up / down (0/1 too)

* Bad data is a `DataError` naming ``path:line`` and the key, and nothing is dropped or cut
  silently: a skipped record or a truncated response changes what is learned without anyone
  noticing. `read_jsonl` returns `Record`s, dicts of the schema fields only that remember
  ``where`` they came from, so errors raised later while encoding still name the line.
* Encoding gives fixed shapes, so jitted steps compile once. A sequence row is laid out as::

      slot  0 .......... P-1 | P ................. P+R
            left-padded prompt | response + EOS, right-padded       (T = P + R + 1)

  Every response starts at slot P, so no per-row offsets are needed. The model takes positions
  from ``cumsum(mask) - 1``, so the left padding does not shift them.
* Prompts and responses are tokenized separately: the prompt with the tokenizer's special tokens
  (BOS), the response without, then EOS appended. That is exactly what the RL sampler produces
  (response tokens generated after the prompt's tokens), so SFT, reward models and the policy
  all see the same token boundaries.
* A prompt longer than P is an error or, with ``truncate="left"``, keeps its last P tokens (the
  text the response follows); the rows cut are returned so the caller can log them. A response
  longer than R is always an error: cutting it would put EOS mid-answer (teaching the model to
  stop early) or score a response different from the one labelled.
* `batches` yields shuffled index batches that depend only on (seed, epoch), in the order the
  trainers' input pipeline (`perl_jax.data.pipeline`) uses, and drops the last incomplete
  batch (one batch shape, no recompiles).
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from perl_jax.data.pipeline import epoch_order
from perl_jax.tokenizers import TokenizerError, encode_prompts

PathLike = str | os.PathLike

KINDS: dict[str, tuple[str, ...]] = {
    "prompts": ("prompt",),
    "sft": ("prompt", "response"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "pointwise": ("prompt", "response", "label"),
}
TRUNCATE_MODES = ("error", "left")
_SHOWN = 5  # offending records listed in one message; the count covers the rest


class DataError(ValueError):
  """Bad input data. The message names the file and line (or the record index) and the key."""


class Record(dict):
  """A record's schema fields plus ``where`` ("path:line"), used by error messages."""

  __slots__ = ("where",)

  def __init__(self, fields: Mapping[str, Any] = (), where: str | None = None):
    super().__init__(fields)
    self.where = where


def _json_type(value: Any) -> str:
  """The JSON name of a parsed value's type, for messages about files."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, (int, float)):
    return f"number {value!r}"
  return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


def _check_kind(kind: str) -> tuple[str, ...]:
  if kind not in KINDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {', '.join(KINDS)}")
  return KINDS[kind]


def check_record(record: Any, kind: str, where: str) -> Record:
  """Validates one parsed record against the `kind` schema; returns its fields as a `Record`.

  Labels become bools. `where` ("path:line" or "record i") prefixes every error message.
  """
  keys = _check_kind(kind)
  if not isinstance(record, Mapping):
    raise DataError(f"{where}: a record must be a JSON object, got {_json_type(record)}")
  fields = {}
  for key in keys:
    if key not in record:
      present = ", ".join(repr(k) for k in record) or "none"
      raise DataError(f"{where}: missing key {key!r} (a {kind} record needs "
                      f"{', '.join(map(repr, keys))}; keys present: {present})")
    value = record[key]
    if key == "label":
      # bool is an int subclass; floats such as 1.0 are refused so a score is never
      # mistaken for a label.
      if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        fields[key] = bool(value)
      else:
        raise DataError(f"{where}: key 'label' must be true/false or 0/1, got {_json_type(value)}")
    elif not isinstance(value, str):
      raise DataError(f"{where}: key {key!r} must be a string, got {_json_type(value)}")
    elif not value.strip():
      raise DataError(f"{where}: key {key!r} is empty" + (" (whitespace only)" if value else ""))
    else:
      fields[key] = value
  return Record(fields, where)


def json_lines(path: PathLike) -> Iterator[tuple[int, Any]]:
  """(1-based line number, parsed value) for every non-blank line of `path` (gzip if *.gz)."""
  path = Path(path)
  if not path.exists():
    raise DataError(f"{path}: no such file")
  if not path.is_file():
    raise DataError(f"{path}: not a file")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:  # bytes: a bad encoding is reported with its line number
    for line_no, raw in _numbered(f, path):
      try:
        text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # tolerate a leading BOM
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line_no}: not UTF-8 text ({e.reason} at byte {e.start})"
                        ) from None
      if not text.strip():
        continue
      try:
        value = json.loads(text)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not valid JSON: {e.msg} (column {e.colno})") from None
      yield line_no, value


def _numbered(f: Any, path: Path) -> Iterator[tuple[int, bytes]]:
  """(line number, raw line); a damaged gzip stream is a DataError naming the file and line."""
  line_no = 0
  try:
    for line_no, raw in enumerate(f, 1):
      yield line_no, raw
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"{path}:{line_no + 1}: cannot read the compressed file: {e}") from None


def read_jsonl(path: PathLike, kind: str) -> list[Record]:
  """Every record of a JSON-lines file, validated against the `kind` schema (see `KINDS`)."""
  _check_kind(kind)
  records = [check_record(value, kind, f"{path}:{line_no}") for line_no, value in json_lines(path)]
  if not records:
    raise DataError(f"{path}: no records (the file is empty or has only blank lines)")
  return records


def detect_preference_kind(path: PathLike) -> str:
  """"pairwise" or "pointwise", from the keys of the first record of `path`."""
  for line_no, value in json_lines(path):
    where = f"{path}:{line_no}"
    if not isinstance(value, dict):
      raise DataError(f"{where}: a record must be a JSON object, got {_json_type(value)}")
    pairwise = "chosen" in value or "rejected" in value
    pointwise = "label" in value
    if pairwise != pointwise:
      return "pairwise" if pairwise else "pointwise"
    present = ", ".join(repr(k) for k in value) or "none"
    raise DataError(f"{where}: cannot tell the preference format: pairwise records have keys "
                    f"'chosen' and 'rejected', pointwise records 'response' and 'label' "
                    f"(keys present: {present})")
  raise DataError(f"{path}: no records (the file is empty or has only blank lines)")


def write_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> None:
  """Writes one JSON object per line, atomically (a crash never leaves half a file)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Encoding


def _where(record: Any, i: int) -> str:
  return getattr(record, "where", None) or f"record {i}"


def _checked(records: Sequence[Any], kind: str) -> list[Record]:
  if isinstance(records, (str, Mapping)):
    raise TypeError("expected a sequence of records, not a single one")
  if len(records) == 0:
    raise DataError("no records to encode")
  return [check_record(r, kind, _where(r, i)) for i, r in enumerate(records)]


def _listing(wheres: Sequence[str], counts: Sequence[int]) -> str:
  shown = "; ".join(f"{w}: {n} tokens" for w, n in list(zip(wheres, counts))[:_SHOWN])
  return shown + (f"; and {len(wheres) - _SHOWN} more" if len(wheres) > _SHOWN else "")


def _encode_prompt_rows(tokenizer: Any, records: Sequence[Record], max_prompt_len: int,
                        truncate: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens_BxP, mask_BxP, truncated_B) for the records' prompts, LEFT-padded to P."""
  if truncate not in TRUNCATE_MODES:
    raise ValueError(f"truncate must be one of {TRUNCATE_MODES}, got {truncate!r}")
  if max_prompt_len < 1:
    raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
  # Pad to the longest prompt first (one tokenizer pass), then cut or widen to P: with left
  # padding, the last P columns hold each prompt's last P tokens.
  try:
    tokens_BxL, mask_BxL = encode_prompts(tokenizer, [r["prompt"] for r in records])
  except TokenizerError:
    raise
  except ValueError:
    # encode_prompts names no row: find the prompt that encodes to nothing (error path only).
    for r in records:
      if not tokenizer(r["prompt"])["input_ids"]:
        raise DataError(f"{r.where}: key 'prompt' encodes to no tokens") from None
    raise
  lengths_B = mask_BxL.sum(axis=1)
  truncated_B = lengths_B > max_prompt_len
  if truncated_B.any() and truncate == "error":
    bad = np.flatnonzero(truncated_B)
    raise DataError(f"{len(bad)} prompt(s) longer than max_prompt_len={max_prompt_len} tokens "
                    f"(key 'prompt'; {_listing([records[i].where for i in bad], lengths_B[bad])}); "
                    f"raise max_prompt_len or pass truncate='left' to keep each prompt's last "
                    f"{max_prompt_len} tokens")
  width = tokens_BxL.shape[1]
  if width >= max_prompt_len:
    return tokens_BxL[:, width - max_prompt_len:], mask_BxL[:, width - max_prompt_len:], truncated_B
  widen = ((0, 0), (max_prompt_len - width, 0))
  return (np.pad(tokens_BxL, widen, constant_values=tokenizer.pad_token_id),
          np.pad(mask_BxL, widen, constant_values=False), truncated_B)


def _encode_responses(tokenizer: Any, records: Sequence[Record], key: str,
                      max_response_len: int) -> list[list[int]]:
  """Token ids of each record's `key` text (no special tokens) with EOS appended."""
  eos = tokenizer.eos_token_id
  if eos is None:
    raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no EOS "
                         "token: responses must end with one")
  if max_response_len < 1:
    raise ValueError(f"max_response_len must be >= 1, got {max_response_len}")
  encoded = [list(ids) for ids in
             tokenizer([r[key] for r in records], add_special_tokens=False)["input_ids"]]
  for r, ids in zip(records, encoded):
    if not ids:
      raise DataError(f"{r.where}: key {key!r} encodes to no tokens")
    if eos in ids:  # the model would learn to stop there, and the sampler would stop there
      raise DataError(f"{r.where}: key {key!r} contains the EOS token ({tokenizer.eos_token!r}) "
                      f"inside its text")
  bad = [i for i, ids in enumerate(encoded) if len(ids) > max_response_len]
  if bad:
    listing = _listing([records[i].where for i in bad], [len(encoded[i]) for i in bad])
    raise DataError(f"{len(bad)} response(s) longer than max_response_len={max_response_len} "
                    f"tokens (key {key!r}; {listing}); "
                    "responses are never truncated: raise max_response_len or remove them")
  return [ids + [eos] for ids in encoded]


def _join(prompt_tokens_BxP: np.ndarray, prompt_mask_BxP: np.ndarray,
          responses: Sequence[Sequence[int]], max_response_len: int,
          pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """[prompt | response + EOS | pad] rows: (tokens_BxT, mask_BxT, loss_mask_BxT)."""
  batch, prompt_len = prompt_tokens_BxP.shape
  length = prompt_len + max_response_len + 1
  tokens_BxT = np.full((batch, length), pad, np.int32)
  loss_mask_BxT = np.zeros((batch, length), bool)
  tokens_BxT[:, :prompt_len] = prompt_tokens_BxP
  for i, ids in enumerate(responses):
    tokens_BxT[i, prompt_len:prompt_len + len(ids)] = ids
    loss_mask_BxT[i, prompt_len:prompt_len + len(ids)] = True
  mask_BxT = loss_mask_BxT.copy()
  mask_BxT[:, :prompt_len] = prompt_mask_BxP
  return tokens_BxT, mask_BxT, loss_mask_BxT


def encode_prompt_batch(tokenizer: Any, prompts: Sequence[str | Mapping[str, Any]],
                        max_prompt_len: int,
                        truncate: str = "error") -> tuple[np.ndarray, np.ndarray, int]:
  """Prompts (strings or records with a "prompt") LEFT-padded: (tokens_BxP, mask_BxP, n_cut).

  A prompt longer than `max_prompt_len` tokens is an error naming it, or with
  ``truncate="left"`` keeps its last tokens; `n_cut` counts the prompts cut, for logging.
  """
  if isinstance(prompts, (str, Mapping)):
    raise TypeError("encode_prompt_batch takes a sequence of prompts, not a single one")
  records = _checked([p if isinstance(p, Mapping) else Record({"prompt": p}, f"prompt {i}")
                      for i, p in enumerate(prompts)], "prompts")
  tokens_BxP, mask_BxP, truncated_B = _encode_prompt_rows(tokenizer, records, max_prompt_len,
                                                          truncate)
  return tokens_BxP, mask_BxP, int(truncated_B.sum())


def encode_sft(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_prompt_len: int,
               max_response_len: int, truncate: str = "error") -> dict[str, np.ndarray]:
  """Demonstrations as [left-padded prompt | response + EOS | pad] rows, T = P + R + 1.

  Returns ``tokens_BxT`` int32, ``mask_BxT`` (real tokens), ``loss_mask_BxT`` (response tokens
  and their EOS only) and ``prompt_truncated_B`` (rows whose prompt ``truncate="left"`` cut).
  """
  records = _checked(records, "sft")
  prompt_tokens_BxP, prompt_mask_BxP, truncated_B = _encode_prompt_rows(
      tokenizer, records, max_prompt_len, truncate)
  responses = _encode_responses(tokenizer, records, "response", max_response_len)
  tokens_BxT, mask_BxT, loss_mask_BxT = _join(prompt_tokens_BxP, prompt_mask_BxP, responses,
                                              max_response_len, tokenizer.pad_token_id)
  return {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT, "loss_mask_BxT": loss_mask_BxT,
          "prompt_truncated_B": truncated_B}


def encode_pairs(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_prompt_len: int,
                 max_response_len: int, truncate: str = "error") -> dict[str, np.ndarray]:
  """Pairwise preferences as two row sets with the `encode_sft` layout (shared prompt rows).

  Returns ``chosen_tokens_BxT``, ``chosen_mask_BxT``, ``rejected_tokens_BxT``,
  ``rejected_mask_BxT`` and ``prompt_truncated_B``.
  """
  records = _checked(records, "pairwise")
  prompt_tokens_BxP, prompt_mask_BxP, truncated_B = _encode_prompt_rows(
      tokenizer, records, max_prompt_len, truncate)
  out = {}
  for key in ("chosen", "rejected"):
    responses = _encode_responses(tokenizer, records, key, max_response_len)
    tokens_BxT, mask_BxT, _ = _join(prompt_tokens_BxP, prompt_mask_BxP, responses,
                                    max_response_len, tokenizer.pad_token_id)
    out[f"{key}_tokens_BxT"], out[f"{key}_mask_BxT"] = tokens_BxT, mask_BxT
  out["prompt_truncated_B"] = truncated_B
  return out


def encode_pointwise(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_prompt_len: int,
                     max_response_len: int, truncate: str = "error") -> dict[str, np.ndarray]:
  """Thumbs-up/down records with the `encode_sft` layout.

  Returns ``tokens_BxT``, ``mask_BxT``, ``labels_B`` float32 (1 = thumbs up) and
  ``prompt_truncated_B``.
  """
  records = _checked(records, "pointwise")
  prompt_tokens_BxP, prompt_mask_BxP, truncated_B = _encode_prompt_rows(
      tokenizer, records, max_prompt_len, truncate)
  responses = _encode_responses(tokenizer, records, "response", max_response_len)
  tokens_BxT, mask_BxT, _ = _join(prompt_tokens_BxP, prompt_mask_BxP, responses,
                                  max_response_len, tokenizer.pad_token_id)
  labels_B = np.array([r["label"] for r in records], np.float32)
  return {"tokens_BxT": tokens_BxT, "mask_BxT": mask_BxT, "labels_B": labels_B,
          "prompt_truncated_B": truncated_B}


# ---------------------------------------------------------------------------------------------
# Batching


def num_examples(arrays: Mapping[str, np.ndarray]) -> int:
  """The common leading size of `arrays`; an error names any array that disagrees."""
  if not arrays:
    raise ValueError("no arrays to batch")
  sizes = {}
  for key, value in arrays.items():
    shape = np.shape(value)
    if not shape:
      raise ValueError(f"array {key!r} is a scalar; every array needs a leading example axis")
    sizes[key] = shape[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(f"arrays disagree on the number of examples: {sizes}")
  return next(iter(sizes.values()))


def batches(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int,
            epoch: int) -> Iterator[np.ndarray]:
  """Shuffled index batches (int64 [batch_size]) over the leading axis of `arrays`.

  The order depends only on (seed, epoch) (`pipeline.epoch_order`, the trainers' order too).
  The last incomplete batch is dropped (one shape for jitted steps); a new epoch reshuffles,
  so every example is still seen. Use `take` to gather a batch.
  """
  n = num_examples(arrays)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if n < batch_size:
    raise ValueError(f"{n} examples are fewer than batch_size={batch_size}: every batch would "
                     "be incomplete and dropped")
  order = epoch_order(n, seed, epoch)
  return iter(order[:n // batch_size * batch_size].reshape(-1, batch_size))


def take(arrays: Mapping[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
  """The rows `indices` of every array."""
  return {key: np.asarray(value)[indices] for key, value in arrays.items()}
