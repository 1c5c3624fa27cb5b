"""Published datasets (issue 5): small files in each upstream format, prepared with the TFDS
builders (array_record, no TensorFlow) and read back field by field; dropped records counted;
bad lines named by file, line and key; prompt formatting with a chat template."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from perl_jax import config
from perl_jax.data import published, tfds_builders
from perl_jax.data.formatting import PromptFormatter, check_template
from perl_jax.data.jsonl import DataError, Record
from perl_jax.tokenizers import TokenizerError, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  if gz:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def prepare(name: str, manual: Path, out: Path) -> dict:
  result = tfds_builders.prepare(name, str(manual), str(out))
  assert result["splits"]  # every split found was written
  return result


def by_source(records) -> dict:
  """{upstream "file:line": record} (the TFDS order is a hash order, not the file order)."""
  return {r.where.split(" (")[1].rstrip(")"): r for r in records}


# --- HH-RLHF ---------------------------------------------------------------------------------

HH_PROMPT = "\n\nHuman: Où est la gare ?\n\nAssistant: Tout droit.\n\nHuman: Merci! 🚂"
HH_ROWS = [
    # multi-turn, non-ASCII; chosen and rejected share everything but the last turn
    {"chosen": HH_PROMPT + "\n\nAssistant: De rien, bon voyage.",
     "rejected": HH_PROMPT + "\n\nAssistant: Hmm."},
    {"chosen": "\n\nHuman: hi\n\nAssistant: same answer", "rejected":
     "\n\nHuman: hi\n\nAssistant:  same answer "},  # identical after stripping: dropped
    {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
    {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: y"},
    # two human turns in a row are merged into one user message
    {"chosen": "\n\nHuman: one\n\nHuman: two\n\nAssistant: ok", "rejected":
     "\n\nHuman: one\n\nHuman: two\n\nAssistant: no"},
]


def test_hh_rlhf_prepared_and_read_field_by_field(tmp_path):
  manual = tmp_path / "hh"
  write_jsonl(manual / "helpful-base" / "train.jsonl.gz", HH_ROWS, gz=True)
  write_jsonl(manual / "harmless-base" / "train.jsonl.gz", HH_ROWS[:1], gz=True)
  write_jsonl(manual / "helpful-base" / "test.jsonl.gz", HH_ROWS[:1], gz=True)
  result = prepare("hh_rlhf", manual, tmp_path / "out")
  assert result["splits"] == {"train": 3, "test": 1}
  assert result["dropped"]["train"] == {"empty_response": 1, "identical": 1,
                                        "prompt_mismatch": 1}
  train = by_source(tfds_builders.load("hh_rlhf", "train", str(tmp_path / "out")))
  assert set(train) == {"helpful-base/train.jsonl.gz:1", "helpful-base/train.jsonl.gz:5",
                        "harmless-base/train.jsonl.gz:1"}
  r = train["helpful-base/train.jsonl.gz:1"]
  assert dict(r) == {
      "prompt": HH_PROMPT + "\n\nAssistant:",
      "context": [{"role": "user", "content": "Où est la gare ?"},
                  {"role": "assistant", "content": "Tout droit."},
                  {"role": "user", "content": "Merci! 🚂"}],
      "chosen": " De rien, bon voyage.", "rejected": " Hmm."}
  assert r.where.startswith("hh_rlhf/train[")
  assert r["prompt"] + r["chosen"] == HH_ROWS[0]["chosen"]  # plain text reads as the original
  merged = train["helpful-base/train.jsonl.gz:5"]
  assert merged["context"] == [{"role": "user", "content": "one\n\ntwo"}]
  assert (merged["chosen"], merged["rejected"]) == (" ok", " no")
  # Other kinds of the same split: SFT on the chosen response, PPO on the prompts.
  sft = by_source(tfds_builders.load("hh_rlhf", "train", str(tmp_path / "out"), kind="sft"))
  assert sft["helpful-base/train.jsonl.gz:1"]["response"] == " De rien, bon voyage."
  prompts = tfds_builders.load("hh_rlhf", "test", str(tmp_path / "out"), kind="prompts")
  assert [dict(p) for p in prompts.take([0])] == [
      {"prompt": HH_PROMPT + "\n\nAssistant:", "context": r["context"]}]
  assert tfds_builders.dropped("hh_rlhf", str(tmp_path / "out")) == result["dropped"]


@pytest.mark.parametrize("chosen,rejected,kept", [(" same", "same  ", False),
                                                   (" same", " Same", True)])
def test_hh_rlhf_identical_means_equal_after_stripping(tmp_path, chosen, rejected, kept):
  import collections

  pair = {"chosen": "\n\nHuman: q\n\nAssistant:" + chosen,
          "rejected": "\n\nHuman: q\n\nAssistant:" + rejected}
  counts = collections.Counter()
  got = list(published.hh_rlhf(str(write_jsonl(tmp_path / "t.jsonl", [pair])), counts))
  assert len(got) == int(kept)
  assert counts == ({} if kept else {"identical": 1})


# --- summarize-from-feedback ------------------------------------------------------------------


def comparison(split: str, choice: int, post: str = "I got a dog. It barks at ñight.") -> dict:
  return {"info": {"id": "t3_1", "post": post, "title": "Dog help", "subreddit": "dogs"},
          "summaries": [{"text": " Dog barks.", "policy": "sup", "note": None},
                        {"text": " My new dog barks at night.", "policy": "ref", "note": "ok"}],
          "choice": choice, "split": split, "worker": "w1", "batch": "batch3"}


def test_tldr_comparisons_splits_choice_and_cnndm_dropped(tmp_path):
  cnndm = comparison("valid1", 0)
  cnndm["info"] = {"id": "c1", "article": "News.", "title": "t", "site": "cnn"}
  write_jsonl(tmp_path / "m" / "comparisons" / "batch3.json",
              [comparison("train", 0), comparison("train", 1), comparison("valid2", 1)])
  write_jsonl(tmp_path / "m" / "comparisons" / "batch8_cnndm.json", [cnndm])
  result = prepare("tldr_comparisons", tmp_path / "m", tmp_path / "out")
  # valid1 held only a CNN/DM comparison: the validation split is empty and not written
  assert result["splits"] == {"train": 2, "test": 1}
  assert result["dropped"]["validation"] == {"not_tldr": 1}
  train = by_source(tfds_builders.load("tldr_comparisons", "train", str(tmp_path / "out")))
  prompt = "SUBREDDIT: r/dogs\nTITLE: Dog help\nPOST: I got a dog. It barks at ñight.\nTL;DR:"
  first, second = train["comparisons/batch3.json:1"], train["comparisons/batch3.json:2"]
  assert dict(first) == {"prompt": prompt, "context": [{"role": "user", "content": prompt}],
                         "chosen": " Dog barks.", "rejected": " My new dog barks at night."}
  assert (second["chosen"], second["rejected"]) == (" My new dog barks at night.", " Dog barks.")
  with pytest.raises(DataError, match="no split 'validation'"):
    tfds_builders.load("tldr_comparisons", "validation", str(tmp_path / "out"))


def test_tldr_sft_set(tmp_path):
  row = {"id": "t3_9", "subreddit": "AskReddit", "title": "Q?", "post": "Long post\nwith lines",
         "summary": " short summary "}
  for name in ("train", "valid", "test"):
    write_jsonl(tmp_path / "m" / f"{name}.jsonl", [row, {**row, "summary": "other"}])
  result = prepare("tldr_sft", tmp_path / "m", tmp_path / "out")
  assert result["splits"] == {"train": 2, "validation": 2, "test": 2}
  valid = by_source(tfds_builders.load("tldr_sft", "validation", str(tmp_path / "out")))
  assert dict(valid["valid.jsonl:1"]) == {
      "prompt": "SUBREDDIT: r/AskReddit\nTITLE: Q?\nPOST: Long post\nwith lines\nTL;DR:",
      "context": [{"role": "user", "content":
                   "SUBREDDIT: r/AskReddit\nTITLE: Q?\nPOST: Long post\nwith lines\nTL;DR:"}],
      "response": " short summary"}


# --- SHP and thumbs ----------------------------------------------------------------------------


def shp_row(a: str, b: str, label: int, score_a: int, score_b: int) -> dict:
  return {"post_id": "p", "domain": "askculinary_train", "upvote_ratio": 0.9,
          "history": "Why does bread go stale? ¿Por qué?", "c_root_id_A": "a", "c_root_id_B": "b",
          "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": score_a, "score_B": score_b,
          "human_ref_A": a, "human_ref_B": b, "labels": label, "seconds_difference": 1.0,
          "score_ratio": 2.0}


def test_shp_labels_ties_and_identical_replies(tmp_path):
  rows = [shp_row("Starch retrogradation.", "Magic.", 1, 10, 2),
          shp_row("Magic.", "Starch retrogradation.", 0, 1, 7),
          shp_row("A tie.", "Another tie.", 1, 5, 5),
          shp_row("Same.", "Same.", 1, 3, 1)]
  write_jsonl(tmp_path / "m" / "askculinary" / "train.json", rows)
  write_jsonl(tmp_path / "m" / "askculinary" / "validation.json", rows[:1])
  result = prepare("shp", tmp_path / "m", tmp_path / "out")
  assert result["splits"] == {"train": 2, "validation": 1}
  assert result["dropped"]["train"] == {"identical": 1, "tie": 1}
  train = by_source(tfds_builders.load("shp", "train", str(tmp_path / "out")))
  prompt = "\n\nHuman: Why does bread go stale? ¿Por qué?\n\nAssistant:"
  for source in ("askculinary/train.json:1", "askculinary/train.json:2"):  # label 1, label 0
    assert dict(train[source]) == {
        "prompt": prompt, "context": [{"role": "user", "content":
                                       "Why does bread go stale? ¿Por qué?"}],
        "chosen": " Starch retrogradation.", "rejected": " Magic."}


def test_thumbs_pointwise_format(tmp_path):
  rows = [{"conversation_id": "dlg-1",
           "context": [{"speaker": "USER", "text": "I'd like a latte."},
                       {"speaker": "ASSISTANT", "text": "Hot or iced?"},
                       {"speaker": "USER", "text": "Iced, with oat milk ☕"}],
           "response": "One iced oat latte coming up.", "rating": "thumbs_up"},
          {"context": [{"speaker": "USER", "text": "Two tickets for Dune."}],
           "response": "Sorry, which city?", "rating": "THUMBS_DOWN"},
          {"context": [{"speaker": "user", "text": "hi"}], "response": "hey", "rating": 0}]
  write_jsonl(tmp_path / "m" / "train.jsonl", rows)
  result = prepare("thumbs", tmp_path / "m", tmp_path / "out")
  assert result["splits"] == {"train": 3} and result["kind"] == "pointwise"
  train = by_source(tfds_builders.load("thumbs", "train", str(tmp_path / "out")))
  assert dict(train["train.jsonl:1"]) == {
      "prompt": ("\n\nHuman: I'd like a latte.\n\nAssistant: Hot or iced?\n\nHuman: Iced, with "
                 "oat milk ☕\n\nAssistant:"),
      "context": [{"role": "user", "content": "I'd like a latte."},
                  {"role": "assistant", "content": "Hot or iced?"},
                  {"role": "user", "content": "Iced, with oat milk ☕"}],
      "response": " One iced oat latte coming up.", "label": True}
  assert train["train.jsonl:2"]["label"] is False and train["train.jsonl:3"]["label"] is False


# --- Bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,file,row,message", [
    ("hh_rlhf", "train.jsonl", {"chosen": "\n\nHuman: a\n\nAssistant: b"},
     "train.jsonl:2: missing key 'rejected'"),
    ("hh_rlhf", "train.jsonl", {"chosen": "Human: a", "rejected": "Human: a"},
     "train.jsonl:2: key 'chosen': no '\\\\n\\\\nAssistant:' turn"),
    ("shp", "d/train.json", shp_row("a", "b", 2, 1, 0),
     "train.json:2: key 'labels' must be 0 or 1"),
    ("shp", "d/train.json", {**shp_row("a", "b", 1, 1, 0), "score_A": "10"},
     "train.json:2: key 'score_A' has the wrong type"),
    ("thumbs", "train.jsonl", {"context": [{"speaker": "USER", "text": "x"}], "response": "y",
                               "rating": 1.0}, "train.jsonl:2: key 'rating' must be"),
    ("thumbs", "train.jsonl", {"context": [{"speaker": "BOT", "text": "x"}], "response": "y",
                               "rating": True}, r"train.jsonl:2: context\[0\]: speaker must be"),
    ("tldr_sft", "train.jsonl", {"subreddit": "a", "title": "b", "summary": "c"},
     "train.jsonl:2: key 'info'|train.jsonl:2: missing key 'post'"),
])
def test_bad_lines_name_file_line_and_key(tmp_path, name, file, row, message):
  good = {"hh_rlhf": HH_ROWS[0], "shp": shp_row("a", "b", 1, 2, 1),
          "thumbs": {"context": [{"speaker": "USER", "text": "x"}], "response": "y",
                     "rating": "thumbs_up"},
          "tldr_sft": {"subreddit": "a", "title": "b", "post": "p", "summary": "c"}}[name]
  write_jsonl(tmp_path / "m" / file, [good, row])
  with pytest.raises(DataError, match=message):
    tfds_builders.prepare(name, str(tmp_path / "m"), str(tmp_path / "out"))
  assert not tfds_builders.builder_class(name)(data_dir=str(tmp_path / "out")).is_prepared()


def test_missing_files_unprepared_dataset_and_unknown_names(tmp_path):
  with pytest.raises(DataError, match=r"shp: no train files in .*SHP's <domain>/train.json"):
    tfds_builders.prepare("shp", str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(DataError, match="unknown dataset 'hh'; known: hh_rlhf"):
    tfds_builders.prepare("hh", str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(DataError, match="no prepared dataset 'shp' .* perl_jax.data.prepare "
                                      "--dataset=shp"):
    tfds_builders.load("shp", "train", str(tmp_path / "out"))
  write_jsonl(tmp_path / "m" / "train.jsonl", [{"context": [{"speaker": "USER", "text": "x"}],
                                                "response": "y", "rating": True}])
  prepare("thumbs", tmp_path / "m", tmp_path / "out")
  with pytest.raises(DataError, match="a sft trainer cannot use them"):
    tfds_builders.load("thumbs", "train", str(tmp_path / "out"), kind="sft")


def test_prepare_command_line(tmp_path):
  write_jsonl(tmp_path / "m" / "train.jsonl", [{"context": [{"speaker": "USER", "text": "x"}],
                                                "response": "y", "rating": "thumbs_up"}])
  cmd = [sys.executable, "-m", "perl_jax.data.prepare", "--dataset=thumbs",
         f"--manual_dir={tmp_path / 'm'}", f"--data_dir={tmp_path / 'out'}"]
  ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert json.loads(ok.stdout)["splits"] == {"train": 1}
  assert "tensorflow" not in ok.stderr.lower().replace("tensorflow_datasets", "").replace(
      "tensorflow-datasets", "")  # no "TensorFlow not found" warnings either
  bad = subprocess.run(cmd[:3] + ["--dataset=thumbs", f"--manual_dir={tmp_path / 'none'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.startswith("perl_jax.data.prepare: bad data: manual_dir")


# --- Config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,overrides,key,message", [
    ("sft", {"tfds": "hh"}, "data.tfds", "unknown dataset 'hh'"),
    ("sft", {"tfds": "thumbs"}, "data.tfds", "pointwise ratings"),
    ("sft", {"tfds": "tldr_sft", "train": "x.jsonl", "eval": "y.jsonl"}, "data.train",
     "already gives"),
    ("reward", {"tfds": "hh_rlhf"}, "policy.init", "needs a checkpoint"),
    ("ppo", {"tfds": "hh_rlhf"}, "policy.init", "needs your policy.init"),
    ("sft", {"tfds_dir": "/tmp"}, "data.tfds_dir", "data.tfds .* is not"),
    ("sft", {"prompt_format": "jinja"}, "data.prompt_format", "not one of"),
    ("sft", {"prompt_template": "Q: {question}"}, "data.prompt_template", "no other field"),
])
def test_config_keys_are_checked(tmp_path, task, overrides, key, message):
  c = getattr(config, f"{task}_config")()
  for k, v in overrides.items():
    setattr(c.data, k, v if k not in ("train", "eval") else str(tmp_path))
  with pytest.raises(config.ConfigError, match=f"config.{key}: .*{message}"):
    config.validate(c)


def test_reward_loss_must_match_the_dataset():
  c = config.reward_config()
  c.data.tfds, c.policy.init, c.reward_model.loss = "hh_rlhf", "/", "pointwise"
  with pytest.raises(config.ConfigError, match="config.reward_model.loss: 'pointwise', but"):
    config.validate(c)


# --- Prompt formatting -------------------------------------------------------------------------

CHAT = ("{{ bos_token }}{% for m in messages %}"
        "{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  texts = ["hello world", "Où est la gare", "tout droit", "<|user|> <|assistant|>"] * 5
  return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("bpe"))


def test_chat_template_formats_turns_and_drops_the_second_bos(bpe):
  bpe.chat_template = CHAT
  fmt = PromptFormatter(bpe, "auto")
  assert fmt.chat
  record = Record({"prompt": "\n\nHuman: a\n\nAssistant:", "chosen": " Yes. ",
                   "rejected": " No.", "context": [
                       {"role": "user", "content": "Où est la gare ?"},
                       {"role": "assistant", "content": "Tout droit."},
                       {"role": "user", "content": "Merci"}]}, "hh:1")
  out = fmt(record, "pairwise")
  # The template writes <bos>; the tokenizer adds one when encoding, so the text's is dropped.
  assert dict(out) == {"prompt": "<|user|>Où est la gare ?\n<|assistant|>Tout droit.\n"
                                 "<|user|>Merci\n<|assistant|>",
                       "chosen": "Yes.", "rejected": "No."}
  assert out.where == "hh:1"
  ids = bpe(out["prompt"])["input_ids"]
  assert ids[0] == bpe.bos_token_id and ids[1] != bpe.bos_token_id
  # JSONL records have no context: the prompt is one user message.
  assert fmt(Record({"prompt": "hello"}, "f:3"), "prompts")["prompt"] == (
      "<|user|>hello\n<|assistant|>")
  bad = Record({"prompt": "x", "response": "y", "context": [
      {"role": "assistant", "content": "a"}]}, "thumbs/train[4] (train.jsonl:9)")
  with pytest.raises(DataError, match=r"thumbs/train\[4\] \(train.jsonl:9\): the tokenizer's "
                                      "chat template failed.*roles must alternate"):
    fmt(bad, "sft")


def test_plain_format_and_auto_without_a_template(bpe):
  bpe.chat_template = None
  record = Record({"prompt": "What is 2+2?", "response": " 4", "label": True,
                   "context": [{"role": "user", "content": "What is 2+2?"}]}, "t:1")
  auto = PromptFormatter(bpe, "auto")
  assert not auto.chat and dict(auto(record, "pointwise")) == {
      "prompt": "What is 2+2?", "response": " 4", "label": True}  # unchanged, space kept
  plain = PromptFormatter(bpe, "plain", "Question: {prompt}\nAnswer:")
  assert plain(record, "sft")["prompt"] == "Question: What is 2+2?\nAnswer:"
  with pytest.raises(TokenizerError, match="prompt_format='chat': tokenizer .* has no chat"):
    PromptFormatter(bpe, "chat")
  # An empty prompt is an error before the template could hide it.
  with pytest.raises(DataError, match="t:2: key 'prompt' is empty"):
    plain(Record({"prompt": " ", "response": "r"}, "t:2"), "sft")
  for template in ("{prompt", "{}", "Q: {prompt} {x}"):
    with pytest.raises(ValueError):
      check_template(template)
