"""Data: JSON-lines validation errors, fixed-shape encodings against a plain Python reference,
truncation, batching, and the synthetic task (gold reward, label noise, prepare)."""

import json
import os
import re

import numpy as np
import pytest

from perl_jax.data import (DataError, batches, detect_preference_kind, encode_pairs,
                           encode_pointwise, encode_prompt_batch, encode_sft, read_jsonl, take,
                           write_jsonl)
from perl_jax.data import jsonl, synthetic
from perl_jax.tokenizers import load_tokenizer, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("synthetic_tok")
  synthetic.build_tokenizer(path)
  return path


@pytest.fixture
def tok(tok_dir):
  return load_tokenizer(tok_dir)  # fresh per test: some tests modify it


def write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


# --------------------------------------------------------------------------------------------
# Reading


GOOD = {"prompts": {"prompt": "describe the fox"},
        "sft": {"prompt": "describe the fox", "response": "fox sees red ."},
        "pairwise": {"prompt": "describe the fox", "chosen": "red red .", "rejected": "fox ."},
        "pointwise": {"prompt": "describe the fox", "response": "red .", "label": True}}


@pytest.mark.parametrize("kind", list(GOOD))
def test_read_valid_with_blank_lines_and_extra_keys(tmp_path, kind):
  path = write_lines(tmp_path / "d.jsonl", ["", json.dumps({**GOOD[kind], "id": 7}), "   ",
                                            json.dumps(GOOD[kind])])
  records = read_jsonl(path, kind)
  assert records == [GOOD[kind]] * 2  # extra keys dropped, blank lines skipped
  assert [r.where for r in records] == [f"{path}:2", f"{path}:4"]  # lines count blank lines


@pytest.mark.parametrize("line,key,message", [
    ('{"prompt": "a", ', None, "not valid JSON"),
    ('["a", "b"]', None, "must be a JSON object, got array"),
    ('"just a string"', None, "must be a JSON object, got string"),
    ('{"prompt": "a cat"}', "'response'", "missing key 'response'"),
    ('{"prompt": 5, "response": "x"}', "'prompt'", "must be a string, got number 5"),
    ('{"prompt": "a", "response": null}', "'response'", "must be a string, got null"),
    ('{"prompt": "", "response": "x"}', "'prompt'", "is empty"),
    ('{"prompt": "a", "response": " \\t\\n"}', "'response'", "is empty (whitespace only)"),
])
def test_sft_errors_name_file_line_and_key(tmp_path, line, key, message):
  path = write_lines(tmp_path / "sft.jsonl", [json.dumps(GOOD["sft"]), "", line])
  with pytest.raises(DataError) as e:
    read_jsonl(path, "sft")
  assert f"{path}:3:" in str(e.value) and message in str(e.value)
  if key:
    assert key in str(e.value)


@pytest.mark.parametrize("key", ["prompt", "chosen", "rejected"])
def test_pairwise_empty_fields(tmp_path, key):
  path = write_lines(tmp_path / "p.jsonl", [json.dumps({**GOOD["pairwise"], key: "  "})])
  with pytest.raises(DataError, match=re.escape(f"{path}:1: key '{key}' is empty")):
    read_jsonl(path, "pairwise")


@pytest.mark.parametrize("label", [2, -1, 1.0, 0.0, "yes", "1", None, [1]])
def test_bad_labels(tmp_path, label):
  path = write_lines(tmp_path / "pw.jsonl", [json.dumps({**GOOD["pointwise"], "label": label})])
  message = f"{path}:1: key 'label' must be true/false or 0/1"
  with pytest.raises(DataError, match=re.escape(message)):
    read_jsonl(path, "pointwise")


def test_labels_become_bools(tmp_path):
  path = write_lines(tmp_path / "pw.jsonl",
                     [json.dumps({**GOOD["pointwise"], "label": v}) for v in (True, False, 1, 0)])
  labels = [r["label"] for r in read_jsonl(path, "pointwise")]
  assert labels == [True, False, True, False] and all(type(v) is bool for v in labels)


def test_file_level_errors(tmp_path):
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
    read_jsonl(tmp_path / "nope.jsonl", "sft")
  with pytest.raises(DataError, match="not a file"):
    read_jsonl(tmp_path, "sft")
  for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: no records")):
      read_jsonl(tmp_path / name, "sft")
  (tmp_path / "bytes.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bytes.jsonl'}:2: not UTF-8")):
    read_jsonl(tmp_path / "bytes.jsonl", "prompts")
  with pytest.raises(ValueError, match="unknown record kind 'dpo'"):
    read_jsonl(tmp_path / "empty.jsonl", "dpo")


def test_detect_preference_kind(tmp_path):
  pair = write_lines(tmp_path / "pair.jsonl", ["", json.dumps(GOOD["pairwise"])])
  point = write_lines(tmp_path / "point.jsonl", [json.dumps(GOOD["pointwise"])])
  assert detect_preference_kind(pair) == "pairwise"
  assert detect_preference_kind(point) == "pointwise"
  both = write_lines(tmp_path / "both.jsonl", [json.dumps({**GOOD["pairwise"], "label": 1})])
  neither = write_lines(tmp_path / "neither.jsonl", ["", "", json.dumps(GOOD["sft"])])
  with pytest.raises(DataError, match=re.escape(f"{both}:1: cannot tell")):
    detect_preference_kind(both)
  with pytest.raises(DataError, match=re.escape(f"{neither}:3: cannot tell")):
    detect_preference_kind(neither)
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(DataError, match="no records"):
    detect_preference_kind(tmp_path / "empty.jsonl")
  with pytest.raises(DataError, match="no such file"):
    detect_preference_kind(tmp_path / "missing.jsonl")


def test_write_read_round_trip(tmp_path):
  records = synthetic.make_pointwise_records(20, seed=3) + [
      {"prompt": "héllo \"quoted\"\nnewline", "response": "日本", "label": False}]
  write_jsonl(tmp_path / "out.jsonl", records)
  assert read_jsonl(tmp_path / "out.jsonl", "pointwise") == records
  assert not (tmp_path / "out.jsonl.tmp").exists()


# --------------------------------------------------------------------------------------------
# Encoding


def reference_rows(tok, prompt, response, prompt_len, response_len):
  """Plain-Python [left-padded prompt | response + EOS | pad] row, mask and loss mask."""
  p = tok(prompt)["input_ids"][-prompt_len:]
  r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  pad_left, pad_right = prompt_len - len(p), response_len + 1 - len(r)
  tokens = [tok.pad_token_id] * pad_left + p + r + [tok.pad_token_id] * pad_right
  mask = [False] * pad_left + [True] * (len(p) + len(r)) + [False] * pad_right
  loss = [False] * prompt_len + [True] * len(r) + [False] * pad_right
  return tokens, mask, loss


def response_text(tok, tokens_T, loss_mask_T):
  ids = tokens_T[loss_mask_T]
  assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
  return tok.decode(ids[:-1].tolist())


def test_encode_sft_layout_and_round_trip(tok):
  records = synthetic.make_sft_records(64, seed=0)
  P, R = synthetic.MAX_PROMPT_LEN, synthetic.MAX_RESPONSE_LEN
  out = encode_sft(tok, records, P, R)
  assert out["tokens_BxT"].shape == (64, P + R + 1) and out["tokens_BxT"].dtype == np.int32
  assert out["mask_BxT"].dtype == bool and out["loss_mask_BxT"].dtype == bool
  assert not out["prompt_truncated_B"].any()
  for i, r in enumerate(records):
    tokens, mask, loss = reference_rows(tok, r["prompt"], r["response"], P, R)
    assert out["tokens_BxT"][i].tolist() == tokens
    assert out["mask_BxT"][i].tolist() == mask
    assert out["loss_mask_BxT"][i].tolist() == loss
    assert response_text(tok, out["tokens_BxT"][i], out["loss_mask_BxT"][i]) == r["response"]
    assert tok.decode(out["tokens_BxT"][i, :P], skip_special_tokens=True) == r["prompt"]
  assert (out["mask_BxT"][:, P - 1]).all()  # every prompt ends right before the response


def test_encode_sft_byte_level_bpe_round_trip(tmp_path):
  """Any tokenizer works: text outside the word vocabulary round-trips through a byte BPE."""
  records = [{"prompt": "Wie geht's?", "response": " Gut, danke! 日本 ∑"},
             {"prompt": "x", "response": "a\nb"}]
  bpe = train_bpe_tokenizer([r["prompt"] + r["response"] for r in records] * 4, 280, tmp_path)
  out = encode_sft(bpe, records, 16, 48)
  for i, r in enumerate(records):
    assert out["tokens_BxT"][i].tolist() == reference_rows(bpe, r["prompt"], r["response"], 16,
                                                           48)[0]
    assert response_text(bpe, out["tokens_BxT"][i], out["loss_mask_BxT"][i]) == r["response"]


def test_encode_pairs_and_pointwise(tok):
  P, R = synthetic.MAX_PROMPT_LEN, synthetic.MAX_RESPONSE_LEN
  pairs = synthetic.make_preference_records(16, seed=1)
  out = encode_pairs(tok, pairs, P, R)
  assert set(out) == {"chosen_tokens_BxT", "chosen_mask_BxT", "rejected_tokens_BxT",
                      "rejected_mask_BxT", "prompt_truncated_B"}
  for i, r in enumerate(pairs):
    for key in ("chosen", "rejected"):
      tokens, mask, loss = reference_rows(tok, r["prompt"], r[key], P, R)
      assert out[f"{key}_tokens_BxT"][i].tolist() == tokens
      assert out[f"{key}_mask_BxT"][i].tolist() == mask
      assert response_text(tok, out[f"{key}_tokens_BxT"][i], np.array(loss)) == r[key]
  np.testing.assert_array_equal(out["chosen_tokens_BxT"][:, :P], out["rejected_tokens_BxT"][:, :P])

  points = synthetic.make_pointwise_records(16, seed=1)
  out = encode_pointwise(tok, points, P, R)
  assert out["labels_B"].dtype == np.float32
  assert out["labels_B"].tolist() == [float(r["label"]) for r in points]
  for i, r in enumerate(points):
    tokens, mask, _ = reference_rows(tok, r["prompt"], r["response"], P, R)
    assert out["tokens_BxT"][i].tolist() == tokens and out["mask_BxT"][i].tolist() == mask


def test_encode_prompt_batch(tok):
  prompts = synthetic.make_prompts(8, seed=0)
  tokens, mask, n_cut = encode_prompt_batch(tok, prompts, 12)
  assert tokens.shape == mask.shape == (8, 12) and n_cut == 0
  for i, p in enumerate(prompts):
    ids = tok(p)["input_ids"]
    assert tokens[i].tolist() == [tok.pad_token_id] * (12 - len(ids)) + ids
    assert mask[i].tolist() == [False] * (12 - len(ids)) + [True] * len(ids)
  records = [{"prompt": p, "other": 1} for p in prompts]  # records work as well as strings
  np.testing.assert_array_equal(encode_prompt_batch(tok, records, 12)[0], tokens)
  with pytest.raises(DataError, match="prompt 1: key 'prompt' is empty"):
    encode_prompt_batch(tok, ["describe the fox", " "], 12)
  with pytest.raises(TypeError):
    encode_prompt_batch(tok, "describe the fox", 12)


def test_prompt_truncation_both_ways(tmp_path, tok):
  long_prompt = "tell me about the fox and the bird"  # 9 tokens with <bos>
  path = write_lines(tmp_path / "sft.jsonl", [
      json.dumps({"prompt": "describe the fox", "response": "red ."}),
      json.dumps({"prompt": long_prompt, "response": "blue fox ."})])
  records = read_jsonl(path, "sft")
  with pytest.raises(DataError) as e:
    encode_sft(tok, records, 5, 8)
  assert ("1 prompt(s) longer than max_prompt_len=5" in str(e.value)
          and f"{path}:2: 9 tokens" in str(e.value) and "'prompt'" in str(e.value))
  out = encode_sft(tok, records, 5, 8, truncate="left")
  assert out["prompt_truncated_B"].tolist() == [False, True]
  assert out["tokens_BxT"][1, :5].tolist() == tok(long_prompt)["input_ids"][-5:]
  assert out["mask_BxT"][1, :5].all() and response_text(
      tok, out["tokens_BxT"][1], out["loss_mask_BxT"][1]) == "blue fox ."
  assert out["tokens_BxT"][0].tolist() == reference_rows(tok, "describe the fox", "red .", 5, 8)[0]

  with pytest.raises(DataError, match=r"prompt 1: 9 tokens"):
    encode_prompt_batch(tok, ["describe the fox", long_prompt], 5)
  tokens, mask, n_cut = encode_prompt_batch(tok, ["describe the fox", long_prompt], 5,
                                            truncate="left")
  assert n_cut == 1 and tokens[1].tolist() == tok(long_prompt)["input_ids"][-5:] and mask[1].all()
  with pytest.raises(ValueError, match="truncate must be one of"):
    encode_prompt_batch(tok, ["describe the fox"], 5, truncate="right")


def test_long_response_is_always_an_error(tmp_path, tok):
  path = write_lines(tmp_path / "pairs.jsonl", [
      json.dumps({"prompt": "describe the fox", "chosen": "red red red red red .",
                  "rejected": "fox ."})])
  records = read_jsonl(path, "pairwise")
  for truncate in ("error", "left"):
    with pytest.raises(DataError) as e:
      encode_pairs(tok, records, 8, 4, truncate=truncate)
    assert ("max_response_len=4" in str(e.value) and f"{path}:1: 6 tokens" in str(e.value)
            and "'chosen'" in str(e.value) and "never truncated" in str(e.value))
  with pytest.raises(DataError, match=r"record 0: 6 tokens"):  # plain dicts: the index
    encode_sft(tok, [{"prompt": "a", "response": "red red red red red ."}], 8, 4)
  encode_pairs(tok, records, 8, 6)  # exactly max_response_len tokens fits (EOS has its own slot)


def test_encoder_input_errors(tmp_path, tok):
  with pytest.raises(DataError, match="record 1: missing key 'response'"):
    encode_sft(tok, [GOOD["sft"], {"prompt": "a"}], 8, 8)
  path = write_lines(tmp_path / "sft.jsonl", [json.dumps(GOOD["sft"])])
  with pytest.raises(DataError, match=re.escape(f"{path}:1: missing key 'chosen'")):
    encode_pairs(tok, read_jsonl(path, "sft"), 8, 8)  # records keep their origin
  with pytest.raises(DataError, match="record 0: key 'label'"):
    encode_pointwise(tok, [{**GOOD["pointwise"], "label": 0.5}], 8, 8)
  with pytest.raises(DataError, match="record 0: key 'response' contains the EOS token"):
    encode_sft(tok, [{"prompt": "a", "response": "red <eos> blue"}], 8, 8)
  with pytest.raises(DataError, match="no records"):
    encode_sft(tok, [], 8, 8)
  tok.pad_token = tok.eos_token
  with pytest.raises(ValueError, match="equals the EOS id"):
    encode_sft(tok, [GOOD["sft"]], 8, 8)


# --------------------------------------------------------------------------------------------
# Batching


def test_batches_deterministic_and_drop_last():
  arrays = {"x_B": np.arange(103), "y_BxT": np.zeros((103, 4))}
  first = [b.tolist() for b in batches(arrays, 10, seed=1, epoch=0)]
  assert first == [b.tolist() for b in batches(arrays, 10, seed=1, epoch=0)]
  assert first != [b.tolist() for b in batches(arrays, 10, seed=1, epoch=1)]
  assert first != [b.tolist() for b in batches(arrays, 10, seed=2, epoch=0)]
  flat = sum(first, [])
  assert len(first) == 10 and all(len(b) == 10 for b in first)
  assert len(set(flat)) == 100 and set(flat) <= set(range(103))  # no repeats, last 3 dropped
  batch = take(arrays, np.array(first[0]))
  assert batch["x_B"].tolist() == first[0] and batch["y_BxT"].shape == (10, 4)
  with pytest.raises(ValueError, match="disagree"):
    batches({"a": np.zeros(4), "b": np.zeros(5)}, 2, 0, 0)
  with pytest.raises(ValueError, match="fewer than batch_size=8"):
    batches({"a": np.zeros(4)}, 8, 0, 0)
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    batches({"a": np.zeros(4)}, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Synthetic task


def test_synthetic_tokenizer(tok):
  assert [tok.convert_ids_to_tokens(i) for i in range(4)] == list(synthetic.SPECIAL_TOKENS)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert len(tok) == len(synthetic.VOCAB) <= 48
  ids = tok("describe the fox")["input_ids"]
  assert ids[0] == 1 and len(ids) == 4  # <bos> + one token per word
  assert tok.decode(ids, skip_special_tokens=True) == "describe the fox"
  assert tok("zebra red.")["input_ids"] == [1, 3, tok.convert_tokens_to_ids("red"),
                                            tok.convert_tokens_to_ids(".")]
  texts = ([r["prompt"] + " " + r["response"] for r in synthetic.make_sft_records(200, 0)]
           + [r["chosen"] for r in synthetic.make_preference_records(200, 0)])
  for ids in tok(texts, add_special_tokens=False)["input_ids"]:
    assert tok.unk_token_id not in ids  # the generators only use the vocabulary


def test_gold_reward_against_reference():
  rng = np.random.default_rng(0)
  pool = list(synthetic.COLOURS + synthetic.NOUNS + synthetic.VERBS) + ["the", ".", "Red", "zebra"]
  texts = [" ".join(rng.choice(pool, rng.integers(1, 12))) for _ in range(500)]
  expected = [sum(w in synthetic.COLOURS for w in t.split()) / len(t.split()) for t in texts]
  got = synthetic.gold_reward(texts)
  assert got.dtype == np.float32 and got.shape == (500,)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  hand = synthetic.gold_reward(["red fox .", "", "   ", "red blue", "red.", "Red fox"])
  np.testing.assert_allclose(hand, [1 / 3, 0, 0, 1, 1 / 2, 0], rtol=1e-6)
  with pytest.raises(TypeError):
    synthetic.gold_reward("red fox")


def test_synthetic_records():
  prompts = synthetic.make_prompts(100, seed=0)
  assert prompts == synthetic.make_prompts(100, seed=0) != synthetic.make_prompts(100, seed=1)
  assert any(p.startswith("tell me about the ") for p in prompts)
  sft = synthetic.make_sft_records(2000, seed=0)
  lengths = {len(r["response"].split()) for r in sft}
  assert min(lengths) >= 4 and max(lengths) <= 8
  content = [w for r in sft for w, slot in zip(r["response"].split(), _slots(r["response"]))
             if slot]
  colour_rate = np.mean([w in synthetic.COLOURS for w in content])
  assert abs(colour_rate - synthetic.SFT_COLOUR_RATE) < 0.03
  assert synthetic.gold_reward([r["response"] for r in sft]).mean() < 0.25  # room to improve
  points = synthetic.make_pointwise_records(500, seed=0)
  labels = [r["label"] for r in points]
  assert labels == list(synthetic.gold_reward([r["response"] for r in points]) > 0.5)
  assert 0.1 < np.mean(labels) < 0.9


def _slots(response):
  """Which words of a response sit in content slots (its pattern has the same word count and
  function words in the same places)."""
  ws = response.split()
  for pattern in synthetic.RESPONSE_PATTERNS:
    p = pattern.split()
    if len(p) == len(ws) and all(a in ("N", "V") or a == b for a, b in zip(p, ws)):
      return [a in ("N", "V") for a in p]
  raise AssertionError(f"{response!r} matches no pattern")


def test_preference_label_noise_rate():
  n, noise = 2000, 0.1
  pairs = synthetic.make_preference_records(n, seed=0, label_noise=noise)
  chosen = synthetic.gold_reward([r["chosen"] for r in pairs])
  rejected = synthetic.gold_reward([r["rejected"] for r in pairs])
  assert (chosen != rejected).all()  # ties are redrawn
  flipped = np.mean(chosen < rejected)
  assert abs(flipped - noise) < 5 * np.sqrt(noise * (1 - noise) / n)  # ~0.034: 5 sigma
  clean = synthetic.make_preference_records(500, seed=0, label_noise=0.0)
  assert (synthetic.gold_reward([r["chosen"] for r in clean])
          > synthetic.gold_reward([r["rejected"] for r in clean])).all()


def test_prepare_is_idempotent(tmp_path):
  sizes = {"prompts": 30, "sft_train": 40, "sft_eval": 10, "pref_train": 50, "pref_eval": 20}
  paths = synthetic.prepare(tmp_path / "d", seed=0, sizes=sizes)
  assert set(paths) == {"tokenizer", "prompts", "sft_train", "sft_eval", "pref_train",
                        "pref_eval"}
  kinds = {"prompts": "prompts", "sft_train": "sft", "sft_eval": "sft", "pref_train": "pairwise",
           "pref_eval": "pairwise"}
  for key, kind in kinds.items():
    assert len(read_jsonl(paths[key], kind)) == sizes[key]
  assert detect_preference_kind(paths["pref_train"]) == "pairwise"
  tok = load_tokenizer(paths["tokenizer"])
  encode_sft(tok, read_jsonl(paths["sft_train"], "sft"), synthetic.MAX_PROMPT_LEN,
             synthetic.MAX_RESPONSE_LEN)  # the advertised lengths fit every record
  pref_eval = read_jsonl(paths["pref_eval"], "pairwise")
  assert (synthetic.gold_reward([r["chosen"] for r in pref_eval])
          > synthetic.gold_reward([r["rejected"] for r in pref_eval])).all()  # gold labels
  assert read_jsonl(paths["sft_train"], "sft")[:10] != read_jsonl(paths["sft_eval"], "sft")[:10]

  files = [os.path.join(root, f) for root, _, fs in os.walk(tmp_path / "d") for f in fs]
  stamps = {f: os.stat(f).st_mtime_ns for f in files}
  assert synthetic.prepare(tmp_path / "d", seed=0, sizes=sizes) == paths
  assert {f: os.stat(f).st_mtime_ns for f in files} == stamps  # nothing rewritten

  before = (tmp_path / "d" / "sft_train.jsonl").read_text()
  synthetic.prepare(tmp_path / "d", seed=1, sizes=sizes)  # other arguments: regenerated
  assert (tmp_path / "d" / "sft_train.jsonl").read_text() != before
  assert json.loads((tmp_path / "d" / "manifest.json").read_text())["seed"] == 1
  with pytest.raises(ValueError, match="unknown sizes"):
    synthetic.prepare(tmp_path / "d", sizes={"rl": 3})


def test_pipeline_walks_epochs_in_the_order_of_batches():
  from perl_jax.data.pipeline import Batches

  arrays = {"x": np.arange(10)}
  stream = Batches(list(range(10)), lambda recs: {"x": np.asarray(recs)}, 4, seed=3,
                   process_index=0, process_count=1, prefetch=0).iterate()
  got = [next(stream) for _ in range(5)]
  assert [b.epoch for b in got] == [0, 0, 1, 1, 2]  # 10 examples -> 2 full batches per epoch
  assert [b.position for b in got] == [0, 1, 2, 3, 4]
  for e in (0, 1):
    expected = list(jsonl.batches(arrays, 4, 3, e))
    np.testing.assert_array_equal(np.concatenate([b.arrays["x"] for b in got if b.epoch == e]),
                                  np.concatenate(expected))