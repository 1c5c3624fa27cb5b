"""Training data: JSON-lines readers and fixed-shape encoders (`jsonl`), and the embedded
synthetic default task with a known gold reward (`synthetic`)."""

from perl_jax.data.jsonl import (KINDS, DataError, Record, batches, check_record,
                                 detect_preference_kind, encode_pairs, encode_pointwise,
                                 encode_prompt_batch, encode_sft, num_examples, read_jsonl, take,
                                 write_jsonl)

__all__ = ["KINDS", "DataError", "Record", "batches", "check_record", "detect_preference_kind",
           "encode_pairs", "encode_pointwise", "encode_prompt_batch", "encode_sft",
           "num_examples", "read_jsonl", "take", "write_jsonl"]
