"""Per-phase layouts (`perl_jax/trainers/phases.py`, `layout_cost.py`) on 8 host CPU devices.

* A PPO iteration with generate on tensor=8, score on fsdp=8 and train on data=2 x fsdp=2 x
  tensor=2 gives the metrics, samples and saved policy of the run with one layout for all
  phases (tolerance as tests/test_sharded_trainers.py), and each phase receives its weights on
  its own mesh.
* Frozen weights are placed once per layout; only the trainable trees move every iteration.
* Bad `phase_mesh` entries fail naming the key; the cost model's choice rule on made-up numbers.
"""

from __future__ import annotations

import jax
import pytest

from perl_jax import config
from perl_jax.trainers import phases, ppo
from tests.test_sharded_trainers import (MIXED, _assert_close_runs, _ppo_config, assets)  # noqa

GEN, SCORE, TRAIN = "data=1,fsdp=1,tensor=8", "data=1,fsdp=8,tensor=1", "data=2,fsdp=2,tensor=2"


def _run(assets, name, monkeypatch, iterations=1, **keys):
  """Runs PPO, recording every Reallocator and the mesh shapes of the weights each phase got."""
  seen, reallocs = [], []
  rollout, score = ppo.rollout, ppo.make_score_fn

  def spy_rollout(module, variables, *a, **k):
    seen.append(("generate", _meshes(variables)))
    return rollout(module, variables, *a, **k)

  def spy_score_fn(*a, **k):
    fn = score(*a, **k)

    def wrapped(policy_vars, ref_vars, reward_vars, affine, value_vars, *rest):
      seen.append(("score", _meshes((policy_vars, ref_vars, reward_vars, value_vars))))
      return fn(policy_vars, ref_vars, reward_vars, affine, value_vars, *rest)

    return wrapped

  class Spy(phases.Reallocator):
    def __init__(self):
      super().__init__()
      reallocs.append(self)

  monkeypatch.setattr(ppo, "rollout", spy_rollout)
  monkeypatch.setattr(ppo, "make_score_fn", spy_score_fn)
  monkeypatch.setattr(phases, "Reallocator", Spy)
  workdir = assets["root"] / name
  ppo.train(_ppo_config(assets, MIXED, total_iterations=iterations, eval_every=100, **keys),
            str(workdir))
  monkeypatch.undo()
  return workdir, seen, reallocs[0]


def _meshes(tree) -> set:
  return {tuple(x.sharding.mesh.shape.values()) for x in jax.tree.leaves(tree)}


def test_phase_layouts_match_one_layout_and_move_only_adapters(assets, monkeypatch):
  one, _, _ = _run(assets, "phases_uniform", monkeypatch, iterations=2)
  split, seen, realloc = _run(assets, "phases_split", monkeypatch, iterations=2,
                              phase_mesh__generate=GEN, phase_mesh__score=SCORE,
                              phase_mesh__train=TRAIN)
  # Each phase read its weights on its own mesh (evaluation, 2 iterations, final evaluation).
  assert seen == [("generate", {(1, 1, 8)}), ("score", {(1, 8, 1)})] * 4
  # Same numbers as one layout for all phases.
  _assert_close_runs(one, split, ("policy/trainable.safetensors",))

