"""Per-phase layouts (`perl_jax/trainers/phases.py`, `layout_cost.py`) on 8 host CPU devices.

* A PPO iteration with generate on tensor=8, score on fsdp=8 and train on data=2 x fsdp=2 x
  tensor=2 gives the metrics, samples and saved policy of the run with one layout for all
  phases (tolerance as tests/test_sharded_trainers.py), and each phase receives its weights on
  its own mesh.
* Frozen weights are placed once per layout; only the trainable trees move every iteration.
* Bad `phase_mesh` entries fail naming the key; the cost model's choice rule on made-up numbers.
"""

from __future__ import annotations

import json

import jax
import pytest

from perl_jax import config
from perl_jax.trainers import layout as layout_lib, layout_cost, phases
from tests.test_sharded_trainers import (MIXED, _assert_close_runs, _ppo_config, assets,  # noqa
                                         run_ppo)

GEN, SCORE, TRAIN = "data=1,fsdp=1,tensor=8", "data=1,fsdp=8,tensor=1", "data=2,fsdp=2,tensor=2"


def test_phase_layouts_match_one_layout_and_move_only_adapters(assets, ppo_mixed_run):
  # Default config: one layout (config.mesh) for all, so every placement is a no-op. This run
  # (2 iterations) is the session's, which test_sharded_trainers.py compares with one device.
  one = ppo_mixed_run
  assert one.realloc.moves == []
  assert {m for _, ms in one.seen for m in ms} == {(2, 2, 2)}
  run = run_ppo(assets, "phases_split", MIXED, phase_mesh__generate=GEN, phase_mesh__score=SCORE,
                phase_mesh__train=TRAIN)
  split, seen, realloc = run.workdir, run.seen, run.realloc
  # Each phase read its weights on its own mesh (evaluation, 2 iterations, final evaluation).
  assert seen == [("generate", {(1, 1, 8)}), ("score", {(1, 8, 1)})] * 4
  # Same numbers as one layout for all phases.
  _assert_close_runs(one.workdir, split, ("policy/trainable.safetensors",))
  # Per placement of both phases: generate (policy frozen, adapters), score (policy frozen,
  # adapters, reference, reward, value frozen, value trainable): 8 calls, 4 times.
  calls = realloc.calls
  assert len(calls) == 8 * 4
  first, later = calls[:8], calls[8:]
  # The first time, the frozen trees are placed on each phase's mesh. One base checkpoint
  # serves all four models here, so for scoring the reference (the policy's base) and the value
  # model's base were already placed (0 moves); the reward's adapters and head were not.
  assert [(k, m) for k, m, _ in first] == [
      ("frozen", {(1, 1, 8)}), ("trainable", {(1, 1, 8)})] + [
      (k, {(1, 8, 1)}) for k in ("frozen", "trainable", "frozen", "frozen", "frozen",
                                 "trainable")]
  assert [n > 0 for _, _, n in first] == [True, True, True, True, False, True, False, True]
  # Later: frozen trees never move again; the trainable trees (adapters, heads) move each time.
  assert all(n == 0 for k, _, n in later if k == "frozen")
  assert all(n > 0 for k, _, n in later if k == "trainable")
  assert sum(k == "frozen" for k, _ in realloc.moves) == sum(n for k, _, n in first
                                                            if k == "frozen")
  metrics = [json.loads(l) for l in open(split / "metrics.jsonl")]
  assert all(m["perf/realloc_s"] > 0 for m in metrics if "perf/realloc_s" in m)



@pytest.mark.parametrize("key,value,message", [
    ("layouts", "fast", "config.layouts: 'fast'"),
    ("phase_mesh.generate", "data=2,tensor=2", "config.phase_mesh.generate: 'data=2,tensor=2'"
     " uses 4 devices"),
    ("phase_mesh.score", "fsdp=8,pipeline=1", "config.phase_mesh.score: entry 'pipeline=1'"),
    # 8 responses in 2 minibatches: microbatches of 4 rows do not split 8 ways.
    ("phase_mesh.train", "data=8", "config.phase_mesh.train: 'data=8': config.ppo.num_mini"),
    ("phase_mesh.score", "data=2,fsdp=4", None),  # fine: 8 rows over 8 (checks the test)
])
def test_config_errors_name_the_key(assets, key, value, message):
  c = _ppo_config(assets, MIXED, ppo__num_minibatches=2)  # microbatches of 4 responses
  node, leaf = (c.phase_mesh, key.split(".")[1]) if "." in key else (c, key)
  node[leaf] = value
  if message is None:
    assert phases.check_config(c, 8)["score"] == dict(data=2, fsdp=4, tensor=1)
    return
  with pytest.raises(config.ConfigError, match=message):
    phases.check_config(c, 8)


def test_host_memory_kind_decision():
  class Mem:
    def __init__(self, kind):
      self.kind = kind

  class Dev:
    def __init__(self, platform, kinds):
      self.platform, self.kinds = platform, kinds

    def addressable_memories(self):
      return [Mem(k) for k in self.kinds]

    def default_memory(self):
      return Mem(self.kinds[0])

  assert phases.host_memory_kind(Dev("gpu", ["device", "pinned_host"])) == "pinned_host"
  assert phases.host_memory_kind(Dev("gpu", ["device"])) is None
  assert phases.host_memory_kind(Dev("cpu", ["device", "pinned_host"])) is None
  assert phases.host_memory_kind(jax.devices()[0]) is None  # CPU: offload is a no-op


def test_candidates():
  # 8 devices; batches of 8, 8, 2 rows split over data x fsdp <= 2; 4 heads over tensor <= 4.
  got = layout_cost.candidates(8, (8, 8, 2), 4, first=(1, 2, 4), cap=10)
  assert got == [(1, 2, 4), (2, 1, 4)]
  got = layout_cost.candidates(8, (8, 8, 8), 8, cap=10)
  assert got[:4] == [(1, 1, 8), (1, 8, 1), (8, 1, 1), (1, 2, 4)]
  assert len(got) == 10 and len(layout_cost.candidates(8, (8,), 8, cap=3)) == 3


def test_choose_rule_on_made_up_numbers():
  A, B, C = (1, 1, 8), (1, 8, 1), (2, 2, 2)
  seconds = {"generate": {A: 1.0, B: 3.0, C: 2.0}, "score": {A: 2.0, B: 1.0, C: 1.5},
             "train": {A: 3.0, B: 2.5, C: 1.0}}
  cheap = {(C, A): 0.1, (C, B): 0.1}
  # Per phase the fastest; 1 + 1 + 1 + 0.2 of moves beats the best single layout (C: 4.5).
  assert layout_cost.choose(seconds, cheap) == {"generate": A, "score": B, "train": C}
  # Moves dearer than what the split saves: C for all.
  dear = {(C, A): 1.0, (C, B): 1.0}
  assert layout_cost.choose(seconds, dear) == dict.fromkeys(("generate", "score", "train"), C)
  # Within 5%: fewer bytes accessed wins the tie.
  tied = {p: {A: 1.0, B: 1.04} for p in ("generate", "score", "train")}
  cost = {p: {A: (1.0, 9.0), B: (1.0, 5.0)} for p in ("generate", "score", "train")}
  assert layout_cost.choose(tied, {}, cost) == dict.fromkeys(("generate", "score", "train"), B)
  # A pruned candidate (missing from a phase) cannot be the single layout.
  pruned = {**seconds, "score": {A: 2.0, B: 1.0}}
  assert layout_cost.choose(pruned, dear)["train"] == C


def test_auto_measures_and_chooses(assets, compilation_cache):  # probes: PPO runs' programs
  c = _ppo_config(assets, MIXED, layouts="auto")
  c.phase_mesh.auto_candidates, c.phase_mesh.auto_runs = 2, 1
  main = layout_lib.Layout.from_config(c)
  chosen = layout_cost.choose_layouts(c, main)
  cands = {(2, 2, 2), (1, 8, 1)}  # config.mesh first, then the first single-axis layout
  for p in ("generate", "score", "train"):
    assert tuple(getattr(chosen, p).mesh.shape.values()) in cands
