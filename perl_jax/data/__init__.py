"""Training data: JSON-lines readers and fixed-shape encoders (`jsonl`), the embedded synthetic
default task with a known gold reward (`synthetic`), published RLHF datasets in their released
formats (`published` parsers, `tfds_builders`, ``python -m perl_jax.data.prepare``), prompt
formatting with chat templates (`formatting`) and the input pipeline (`pipeline`).

`tfds_builders` imports tensorflow_datasets, so it is not imported here."""

from perl_jax.data.jsonl import (KINDS, DataError, Record, batches, check_record,
                                 detect_preference_kind, encode_pairs, encode_pointwise,
                                 encode_prompt_batch, encode_sft, num_examples, read_jsonl, take,
                                 write_jsonl)

__all__ = ["KINDS", "DataError", "Record", "batches", "check_record", "detect_preference_kind",
           "encode_pairs", "encode_pointwise", "encode_prompt_batch", "encode_sft",
           "num_examples", "read_jsonl", "take", "write_jsonl"]
