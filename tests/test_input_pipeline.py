"""Input pipeline (issue 5, section 3): seeded order, process shards that are disjoint and cover
each batch, resume at a position equal to the uninterrupted run, prefetching; and the trainers
reading a prepared TFDS dataset end to end (check_inputs, SFT with resume, reward)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from perl_jax import config, train
from perl_jax.data import tfds_builders
from perl_jax.data.jsonl import DataError
from perl_jax.data.pipeline import Batches, epoch_order
from tests.helpers import one_device
from tests.test_datasets import HH_ROWS, write_jsonl


def ident(records: list) -> dict:
  return {"x": np.asarray(records)}


def make(n=23, batch=6, seed=0, prefetch=0, index=0, count=1, encode=ident) -> Batches:
  return Batches(list(range(n)), encode, batch, seed, process_index=index, process_count=count,
                 prefetch=prefetch)


def positions(stream, k: int) -> list:
  return [next(stream) for _ in range(k)]


def test_order_depends_only_on_seed_and_epoch():
  a, b, c = (positions(make(seed=s).iterate(), 9) for s in (0, 0, 1))
  assert [x.arrays["x"].tolist() for x in a] == [x.arrays["x"].tolist() for x in b]
  assert [x.arrays["x"].tolist() for x in a] != [x.arrays["x"].tolist() for x in c]
  # 23 records, batches of 6: 3 per epoch (5 dropped), each epoch a new permutation
  assert [x.epoch for x in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
  for e in range(3):
    seen = np.concatenate([x.arrays["x"] for x in a if x.epoch == e])
    np.testing.assert_array_equal(seen, epoch_order(23, 0, e)[:18])
    assert len(set(seen.tolist())) == 18  # no record twice within an epoch


def test_two_processes_get_disjoint_shards_that_make_up_each_batch():
  whole = positions(make(batch=6).iterate(), 8)
  shards = [positions(make(batch=6, index=i, count=2).iterate(), 8) for i in (0, 1)]
  for p in range(8):
    a, b = shards[0][p].arrays["x"], shards[1][p].arrays["x"]
    assert len(a) == len(b) == 3 and not set(a.tolist()) & set(b.tolist())
    np.testing.assert_array_equal(np.concatenate([a, b]), whole[p].arrays["x"])
  # Over an epoch the two shards are disjoint and cover every record the epoch uses.
  epoch0 = [np.concatenate([s[p].arrays["x"] for p in range(3)]) for s in shards]
  assert not set(epoch0[0].tolist()) & set(epoch0[1].tolist())
  assert sorted(np.concatenate(epoch0).tolist()) == sorted(epoch_order(23, 0, 0)[:18].tolist())
  with pytest.raises(ValueError, match="does not split over 4 processes"):
    make(batch=6, count=4)
  with pytest.raises(ValueError, match="process_index 2 is not in"):
    make(index=2, count=2)


@pytest.mark.parametrize("start", [2, 3, 7])  # mid-epoch, an epoch boundary, a later epoch
@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_at_a_position_gives_the_remaining_batches_of_the_uninterrupted_run(start,
                                                                                   prefetch):
  calls = []

  def counting(records):
    calls.append(list(records))
    return ident(records)

  straight = positions(make(prefetch=prefetch).iterate(), 10)
  resumed = positions(make(prefetch=prefetch, encode=counting).iterate(start=start), 10 - start)
  for a, b in zip(straight[start:], resumed):
    assert (a.position, a.epoch) == (b.position, b.epoch)
    np.testing.assert_array_equal(a.arrays["x"], b.arrays["x"])
  # Nothing before the position was read or encoded again (prefetch reads at most 2 ahead).
  assert len(calls) <= 10 - start + prefetch
  assert calls[0] == straight[start].arrays["x"].tolist()


def test_prefetch_raises_encoding_errors_at_their_batch_and_stops_when_closed():
  def failing(records):
    if 13 in records:
      raise DataError("record 13: bad")
    return ident(records)

  order = epoch_order(23, 0, 0)
  bad_position = int(np.flatnonzero(order == 13)[0]) // 6 if 13 in order[:18] else None
  assert bad_position is not None  # seed 0 puts record 13 into one of epoch 0's batches
  stream = make(prefetch=2, encode=failing).iterate()
  got = []
  with pytest.raises(DataError, match="record 13: bad"):
    for batch in stream:
      got.append(batch.position)
  assert got == list(range(bad_position))
  # A consumer that stops early lets the worker thread end.
  stream = make(prefetch=2).iterate()
  next(stream)
  stream.close()
  deadline = time.monotonic() + 5
  while any(t.name == "input-pipeline" for t in threading.enumerate()):
    assert time.monotonic() < deadline, "the prefetch thread did not stop"
    time.sleep(0.05)


def test_lazy_tfds_source_is_read_by_index(tmp_path):
  write_jsonl(tmp_path / "m" / "train.jsonl", [
      {"context": [{"speaker": "USER", "text": f"turn {i}"}], "response": f"reply {i}",
       "rating": i % 2 == 0} for i in range(10)])
  tfds_builders.prepare("thumbs", str(tmp_path / "m"), str(tmp_path / "out"))
  records = tfds_builders.load("thumbs", "train", str(tmp_path / "out"))
  reads = []
  take = records.take
  records.take = lambda idx: reads.append(list(idx)) or take(idx)
  batches = Batches(records, lambda recs: {"n": np.asarray([int(r["response"].split()[-1])
                                                             for r in recs])}, 4, seed=5,
                    process_index=0, process_count=1, prefetch=0)
  batch = batches.batch(1)
  assert reads == [batch.indices.tolist()]  # one batched read of exactly this batch's records
  expected = [int(records[int(i)]["response"].split()[-1]) for i in batch.indices]
  assert batch.arrays["n"].tolist() == expected


# --- Trainers on a prepared dataset ------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds_runs")
  rows = [{"id": f"t3_{i}", "subreddit": "pets", "title": f"my cat {i}",
           "post": f"the cat sat on mat {i} and is sad é", "summary": f"sad cat {i}"}
          for i in range(24)]
  write_jsonl(root / "tldr" / "train.jsonl", rows)
  write_jsonl(root / "tldr" / "valid.jsonl", rows[:6])
  write_jsonl(root / "hh" / "train.jsonl", [HH_ROWS[0], HH_ROWS[4]] * 5)
  write_jsonl(root / "hh" / "test.jsonl", [HH_ROWS[0], HH_ROWS[4]])
  tfds_builders.prepare("tldr_sft", str(root / "tldr"), str(root / "tfds"))
  tfds_builders.prepare("hh_rlhf", str(root / "hh"), str(root / "tfds"))
  return root


def sft_config(root, steps: int):
  c = one_device(config.sft_config())
  c.data.tfds, c.data.tfds_dir = "tldr_sft", str(root / "tfds")
  c.data.max_prompt_len, c.data.max_response_len, c.data.batch_size = 48, 12, 4
  c.total_iterations, c.log_every, c.eval_every, c.progress = steps, 1, 100, False
  c.checkpoint.every_steps, c.checkpoint.every_minutes = 0, 0.0
  c.model.num_layers = 1
  return c


def metrics(workdir) -> list:
  return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
          for line in open(workdir / "metrics.jsonl")]


def test_sft_reward_and_ppo_inputs_from_prepared_datasets(prepared, tmp_path):
  # (Resuming a trainer at the checkpoint's data position equals the uninterrupted run:
  # test_checkpoint.py's SFT resume test, which goes through the same pipeline.)
  sft = train.run(sft_config(prepared, 3), str(tmp_path / "sft"))
  meta = json.loads(next((tmp_path / "sft" / "checkpoints" / "3").glob("meta/metadata")
                         ).read_text())
  assert meta["data_position"] == 3
  lines = metrics(tmp_path / "sft")
  assert lines[0]["params/prompts_truncated"] == 0 and lines[-1]["step"] == 3
  samples = json.loads(open(tmp_path / "sft" / "samples.jsonl").readline())["samples"]
  assert samples[0]["prompt"].startswith("SUBREDDIT: r/pets\nTITLE: my cat")  # plain layout

  c = one_device(config.reward_config())
  c.policy.init = sft["hf_dir"]
  c.data.tfds, c.data.tfds_dir = "hh_rlhf", str(prepared / "tfds")
  c.data.max_prompt_len, c.data.max_response_len, c.data.batch_size = 96, 24, 4
  c.total_iterations, c.eval_every, c.progress = 2, 2, False
  c.reward_model.normalize = False
  out = train.run(c, str(tmp_path / "reward"))
  assert out["kind"] == "pairwise" and 0.0 <= out["accuracy"] <= 1.0

  # PPO takes the prompts of the train split; check_inputs reads and encodes all of them.
  p = one_device(config.ppo_config())
  p.policy.init, p.reward.init = sft["hf_dir"], out["model_dir"]
  p.data.tfds, p.data.tfds_dir, p.data.max_prompt_len = "hh_rlhf", str(prepared / "tfds"), 96
  p.ppo.batch_size = 4
  config.validate(p)
  assert train.check_inputs(p, str(tmp_path / "ppo")) == {"data.prompts": 0}
  p.data.max_prompt_len, p.data.truncate = 8, "left"
  assert train.check_inputs(p, str(tmp_path / "ppo")) == {"data.prompts": 10}


def test_missing_dataset_or_split_is_bad_input_naming_the_key(prepared, tmp_path, capsys):
  c = sft_config(prepared, 1)
  c.data.tfds = "shp"  # not prepared there
  assert train.cli(c, str(tmp_path / "a")) == train.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert "bad data: config.data.tfds=shp (split 'train', config.data.tfds_train_split): no " \
         "prepared dataset 'shp'" in err
  c = sft_config(prepared, 1)
  c.data.tfds_eval_split = "test"
  assert train.cli(c, str(tmp_path / "b")) == train.EXIT_BAD_INPUT
  assert "config.data.tfds_eval_split): dataset 'tldr_sft' has no split 'test'" in \
      capsys.readouterr().err
  c = sft_config(prepared, 1)
  c.data.prompt_format = "chat"  # the tokenizer fitted to the data has no chat template
  assert train.cli(c, str(tmp_path / "c")) == train.EXIT_BAD_INPUT
  assert "bad tokenizer: config.data.prompt_format='chat'" in capsys.readouterr().err
