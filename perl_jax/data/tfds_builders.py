"""tensorflow-datasets builders for published RLHF datasets, and reading them back without TF.

Design
------
* One `GeneratorBasedBuilder` per dataset (`DATASETS`). Each reads files the user downloaded
  (TFDS's ``manual_dir``; nothing is downloaded here) with the parsers of
  `perl_jax.data.published`, and writes ``array_record`` files: random access by index, and
  neither preparing nor reading needs TensorFlow (TFDS encodes ``Text`` features with NumPy and
  its own protobuf copy; checked with TFDS 4.9.10, array_record 0.8.6, no TensorFlow
  installed).
* Every example has the trainers' fields for its ``kind`` (``sft``: prompt, response;
  ``pairwise``: prompt, chosen, rejected; ``pointwise``: prompt, response, label) plus
  ``context`` (the conversation as user/assistant turns, for chat templates) and ``source``
  (``"<file>:<line>"`` of the upstream file, also the TFDS key, so errors can name it).
* Records the parsers drop (ties, identical pairs, ...) are counted per split and reason,
  logged, and stored in the dataset's metadata (``dataset_info.json``), where `dropped` reads
  them back.
* `load` opens one split as `TfdsRecords`, a lazy random-access sequence of `Record`s (TFDS
  split slicing such as ``"train[:1000]"`` works), which is what the input pipeline
  (`perl_jax.data.pipeline`) indexes.

    python -m perl_jax.data.prepare --dataset=hh_rlhf --manual_dir=DIR --data_dir=OUT
"""

from __future__ import annotations

import collections
import glob
import inspect
import itertools
import os
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from perl_jax.data import published
from perl_jax.data.jsonl import DataError, Record

VERSION = "1.0.0"
_TEXT = ("prompt", "chosen", "rejected", "response", "source")
# (dataset kind, kind a trainer reads) pairs besides equal kinds: SFT on the chosen responses of
# preference pairs, and RL prompts from any dataset.
_CONVERSIONS = {("pairwise", "sft"), ("sft", "prompts"), ("pairwise", "prompts"),
                ("pointwise", "prompts")}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: features of `kind`, files per split, dropped-record counts in metadata."""

  VERSION = tfds.core.Version(VERSION)
  kind: str  # "sft" | "pairwise" | "pointwise"
  eval_split: str  # the split trainers evaluate on unless data.tfds_eval_split says otherwise
  files: dict[str, tuple[str, ...]]  # split -> globs under manual_dir; the first split is required
  description: str
  homepage: str

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup goes through the `importlib_resources` backport for classes defined in
    # a package; that is not a dependency of tensorflow-datasets (nor installed), so point at
    # this file directly. Only used to look for a (non-existent) checksums file.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    fields: dict[str, Any] = {"prompt": text, "source": text,
                              "context": tfds.features.Sequence({"role": text, "content": text})}
    fields.update({"sft": {"response": text}, "pairwise": {"chosen": text, "rejected": text},
                   "pointwise": {"response": text, "label": np.bool_}}[self.kind])
    return tfds.core.DatasetInfo(builder=self, description=self.description,
                                 homepage=self.homepage,
                                 features=tfds.features.FeaturesDict(fields),
                                 metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    found = split_files(type(self), str(dl_manager.manual_dir))
    self._dropped: dict[str, dict[str, int]] = {}
    splits = {}
    for split, paths in found.items():
      # TFDS refuses to write an empty split; a split can be empty when its files hold other
      # splits only (summarize-from-feedback) or every record was dropped. Look ahead.
      examples = self._generate_examples(split, paths, str(dl_manager.manual_dir))
      first = next(examples, None)
      if first is not None:
        splits[split] = itertools.chain([first], examples)
      elif split == next(iter(found)):
        raise DataError(f"{self.name}: no usable {split} records in {paths[0]}"
                        f"{' and others' if len(paths) > 1 else ''} (dropped: "
                        f"{self._dropped.get(split) or 'none'})")
      else:
        logging.warning("%s: no %s records in the files found; split not written", self.name,
                        split)
    return splits

  def _generate_examples(self, split: str, paths: Sequence[str], root: str) -> Iterator:
    counts: collections.Counter = collections.Counter()
    for path in paths:
      yield from self._parse(path, split, counts, root)
    self._dropped[split] = dict(sorted(counts.items()))
    if counts:
      logging.warning("%s/%s: dropped %d records: %s", self.name, split, sum(counts.values()),
                      ", ".join(f"{n} {why}" for why, n in sorted(counts.items())))
    self.info.metadata["dropped"] = dict(self._dropped)  # written with dataset_info.json

  def _parse(self, path: str, split: str, counts: collections.Counter, root: str) -> Iterator:
    raise NotImplementedError


class HhRlhf(_Builder):
  name = "hh_rlhf"
  kind, eval_split = published.DATASETS[name]
  # The release has one directory per subset (helpful-base, harmless-base, ...), each with
  # train/test.jsonl.gz; all subsets found are used (red-team-attempts has other files).
  files = {"train": ("**/train.jsonl.gz", "**/train.jsonl"),
           "test": ("**/test.jsonl.gz", "**/test.jsonl")}
  description = "Anthropic HH-RLHF: helpful/harmless dialogue preferences."
  homepage = "https://github.com/anthropics/hh-rlhf"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the train.jsonl.gz / test.jsonl.gz files of "
                                  "github.com/anthropics/hh-rlhf (any subset directories) in "
                                  "manual_dir.")

  def _parse(self, path, split, counts, root):
    return published.hh_rlhf(path, counts, root)


class TldrComparisons(_Builder):
  name = "tldr_comparisons"
  kind, eval_split = published.DATASETS[name]
  files = {"train": ("**/batch*.json",), "validation": ("**/batch*.json",),
           "test": ("**/batch*.json",)}
  upstream_split = {"train": "train", "validation": "valid1", "test": "valid2"}
  description = ("OpenAI summarize-from-feedback: human comparisons of TL;DR summaries "
                 "(validation = upstream valid1, test = valid2; CNN/DM batches dropped).")
  homepage = "https://github.com/openai/summarize-from-feedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put the comparisons/batch*.json files of "
                                  "openai/summarize-from-feedback in manual_dir.")

  def _parse(self, path, split, counts, root):
    return published.tldr_comparisons(path, self.upstream_split[split], counts, root)


class TldrSft(_Builder):
  name = "tldr_sft"
  kind, eval_split = published.DATASETS[name]
  files = {"train": ("**/train.jsonl",), "validation": ("**/valid.jsonl",),
           "test": ("**/test.jsonl",)}
  description = "The filtered TL;DR set (tldr_3_filtered) of summarize-from-feedback, for SFT."
  homepage = "https://github.com/openai/summarize-from-feedback"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put tldr_3_filtered's train.jsonl, valid.jsonl and "
                                  "test.jsonl in manual_dir.")

  def _parse(self, path, split, counts, root):
    return published.tldr_sft(path, counts, root)


class Shp(_Builder):
  name = "shp"
  kind, eval_split = published.DATASETS[name]
  files = {s: (f"**/{s}.json", f"**/{s}.jsonl") for s in ("train", "validation", "test")}
  description = "Stanford Human Preferences (SHP): Reddit comment preferences, all domains found."
  homepage = "https://huggingface.co/datasets/stanfordnlp/SHP"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put SHP's <domain>/train.json, validation.json and test.json "
                                  "files (any number of domains) in manual_dir.")

  def _parse(self, path, split, counts, root):
    return published.shp(path, counts, root)


class Thumbs(_Builder):
  name = "thumbs"
  kind, eval_split = published.DATASETS[name]
  files = {s: (f"**/{s}.jsonl",) for s in ("train", "validation", "test")}
  description = ("Pointwise thumbs-up/down ratings of assistant turns in the style of PERL's "
                 "Taskmaster Coffee and Ticketing sets (format: perl_jax.data.published.thumbs).")
  homepage = "https://github.com/google-research-datasets/Taskmaster"
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put train.jsonl (and validation.jsonl, test.jsonl) in the "
                                  "format of perl_jax.data.published.thumbs in manual_dir.")

  def _parse(self, path, split, counts, root):
    return published.thumbs(path, counts, root)


DATASETS: dict[str, type[_Builder]] = {b.name: b for b in (HhRlhf, TldrComparisons, TldrSft,
                                                              Shp, Thumbs)}
assert list(DATASETS) == list(published.DATASETS)


def builder_class(name: str) -> type[_Builder]:
  if name not in DATASETS:
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
  return DATASETS[name]


def split_files(cls: type[_Builder], manual_dir: str) -> dict[str, list[str]]:
  """split -> the upstream files for it under `manual_dir`; the first split is required."""
  if not os.path.isdir(manual_dir):
    raise DataError(f"manual_dir {manual_dir!r} is not a directory. "
                    f"{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  found = {}
  for split, patterns in cls.files.items():
    paths = sorted({p for pattern in patterns
                    for p in glob.glob(os.path.join(manual_dir, pattern), recursive=True)})
    if paths:
      found[split] = paths
  first = next(iter(cls.files))
  if first not in found:
    raise DataError(f"{cls.name}: no {first} files in {manual_dir!r} (looked for "
                    f"{', '.join(cls.files[first])}). {cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return found


def prepare(name: str, manual_dir: str, data_dir: str, overwrite: bool = False) -> dict:
  """Parses the files in `manual_dir` and writes dataset `name` under `data_dir`; returns
  ``{"path", "splits": {split: examples}, "dropped": {split: {reason: count}}}``.

  A dataset already prepared there is reused unless `overwrite`.
  """
  cls = builder_class(name)
  split_files(cls, manual_dir)  # clear errors before TFDS starts
  builder = cls(data_dir=data_dir or None, file_format="array_record")
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=mode))
  return summary(name, data_dir)


def _prepared(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  cls = builder_class(name)
  builder = cls(data_dir=data_dir or None, file_format="array_record")
  if not builder.is_prepared():
    raise DataError(f"no prepared dataset {name!r} in {builder.data_path}: run python -m "
                    f"perl_jax.data.prepare --dataset={name} --manual_dir=DIR "
                    f"--data_dir={data_dir or '<tfds default>'} first")
  return builder


def summary(name: str, data_dir: str) -> dict:
  builder = _prepared(name, data_dir)
  return {"path": str(builder.data_path), "kind": builder.kind,
          "splits": {s: info.num_examples for s, info in builder.info.splits.items()},
          "dropped": dropped(name, data_dir)}


def dropped(name: str, data_dir: str) -> dict[str, dict[str, int]]:
  """{split: {reason: count}} of the records the parsers dropped when `name` was prepared."""
  return dict(_prepared(name, data_dir).info.metadata.get("dropped", {}))


class TfdsRecords(Sequence):
  """One split of a prepared dataset as a lazy sequence of `Record`s (read on access).

  ``kind`` may differ from the dataset's: ``"prompts"`` keeps only the prompt (any dataset),
  ``"sft"`` from a pairwise dataset takes the chosen response as the demonstration.
  """

  def __init__(self, name: str, split: str, data_dir: str = "", kind: str | None = None):
    builder = _prepared(name, data_dir)
    self.name, self.split, self.dataset_kind = name, split, builder.kind
    self.kind = kind or builder.kind
    if self.kind != self.dataset_kind and (self.dataset_kind, self.kind) not in _CONVERSIONS:
      raise DataError(f"dataset {name!r} holds {self.dataset_kind} records; a {self.kind} "
                      "trainer cannot use them")
    try:
      self._source = builder.as_data_source(split=split)
    except (KeyError, ValueError) as e:
      raise DataError(f"dataset {name!r} has no split {split!r} (splits: "
                      f"{', '.join(builder.info.splits)}): {e}") from None
    self._getitems = getattr(self._source, "__getitems__", None)

  def __len__(self) -> int:
    return len(self._source)

  def _record(self, i: int, raw: dict) -> Record:
    text = {k: v.decode("utf-8") for k, v in raw.items() if k in _TEXT}
    context = [{"role": r.decode("utf-8"), "content": c.decode("utf-8")}
               for r, c in zip(raw["context"]["role"], raw["context"]["content"])]
    fields: dict[str, Any] = {"prompt": text["prompt"], "context": context}
    if self.kind == "sft":
      fields["response"] = text["response"] if self.dataset_kind == "sft" else text["chosen"]
    elif self.kind == "pairwise":
      fields.update(chosen=text["chosen"], rejected=text["rejected"])
    elif self.kind == "pointwise":
      fields.update(response=text["response"], label=bool(raw["label"]))
    return Record(fields, f"{self.name}/{self.split}[{i}] ({text['source']})")

  def __getitem__(self, i: int) -> Record:  # type: ignore[override]
    if isinstance(i, slice):
      return self.take(range(*i.indices(len(self))))
    i = int(i) + (len(self) if i < 0 else 0)
    if not 0 <= i < len(self):
      raise IndexError(f"{self.name}/{self.split}: index {i} out of range")
    return self._record(i, self._source[i])

  def take(self, indices: Sequence[int]) -> list[Record]:
    """The records at `indices` (one batched read)."""
    indices = [int(i) for i in indices]
    raws = self._getitems(indices) if self._getitems else [self._source[i] for i in indices]
    return [self._record(i, raw) for i, raw in zip(indices, raws)]


def load(name: str, split: str, data_dir: str = "", kind: str | None = None) -> TfdsRecords:
  """Split `split` of the prepared dataset `name` in `data_dir` ("" = TFDS's default)."""
  return TfdsRecords(name, split, data_dir, kind)
