"""Tokenizers: train/save/load round trip, left padding, and clear errors."""

import numpy as np
import pytest

from perl_jax.models import tiny_config
from perl_jax.tokenizers import (check_vocab, encode_prompts, eos_ids, load_tokenizer,
                                 train_bpe_tokenizer)

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog",
         "héllo wörld, 123 + 456 = 579"] * 4


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok")
  train_bpe_tokenizer(TEXTS, 300, path)
  return path


def test_round_trip_save_load(tok_dir):
  trained = train_bpe_tokenizer(TEXTS, 300, tok_dir / "again")
  loaded = load_tokenizer(tok_dir)
  assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
  assert len(loaded) == len(trained) <= 300
  for text in TEXTS[:4] + ["unseen bytes: 日本 ∑"]:
    ids = loaded(text)["input_ids"]
    assert ids == trained(text)["input_ids"] and ids[0] == 1  # <bos> prepended
    assert loaded.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless
  assert len(loaded("the cat sat")["input_ids"]) < len("the cat sat")  # merges were learned
  assert eos_ids(loaded, tiny_config("llama", eos_token_id=(2, 5))) == (2, 5)


def test_left_padding_and_mask(tok_dir):
  tok = load_tokenizer(tok_dir)
  texts = ["a cat", "the dog sat on the log"]
  tokens, mask = encode_prompts(tok, texts)
  assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == mask.shape
  for row, m, text in zip(tokens, mask, texts):
    ids = tok(text)["input_ids"]
    n = len(ids)
    assert list(row[-n:]) == ids and m[-n:].all() and not m[:-n].any()
    assert (row[:-n] == tok.pad_token_id).all()
  assert mask[1].all()  # the longest prompt is not padded

  fixed, fixed_mask = encode_prompts(tok, texts, max_len=20)
  assert fixed.shape == (2, 20)
  np.testing.assert_array_equal(fixed[:, -tokens.shape[1]:], tokens)
  assert not fixed_mask[:, :20 - tokens.shape[1]].any()

  with pytest.raises(ValueError, match="max_len=3"):
    encode_prompts(tok, texts, max_len=3)
  cut, cut_mask = encode_prompts(tok, texts, max_len=3, truncate=True)
  assert list(cut[1]) == tok(texts[1])["input_ids"][-3:] and cut_mask.all()


def test_pad_must_exist_and_differ_from_eos(tok_dir):
  tok = load_tokenizer(tok_dir)
  with pytest.raises(ValueError, match="equals the EOS id"):
    encode_prompts(tok, ["a cat"], pad_id=tok.eos_token_id)
  tok.pad_token = None
  with pytest.raises(ValueError, match="no pad token"):
    encode_prompts(tok, ["a cat"])
  tokens, _ = encode_prompts(tok, ["a", "a cat sat"], pad_id=7)  # an explicit pad id works
  assert tokens[0, 0] == 7


def test_check_vocab_names_both_sizes(tok_dir):
  tok = load_tokenizer(tok_dir)
  check_vocab(tok, tiny_config("llama", vocab_size=len(tok)))
  check_vocab(tok, tiny_config("llama", vocab_size=len(tok) + 64))  # padded tables are fine
  with pytest.raises(ValueError, match=rf"{len(tok)} tokens.*vocab_size is 128"):
    check_vocab(tok, tiny_config("llama"))


def test_errors_name_the_path(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    load_tokenizer(missing)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no tokenizer in .*empty"):
    load_tokenizer(tmp_path / "empty")
  with pytest.raises(ValueError, match="at least"):
    train_bpe_tokenizer(TEXTS, 100, tmp_path / "small")
