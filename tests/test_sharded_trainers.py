"""Sharded trainers on the 8 host CPU devices of conftest.py: every layout gives the numbers of
one device.

* PPO (GAE, with a value model) runs end to end (`ppo.train`, two iterations: evaluation,
  rollout, scoring, advantages, update, checkpoint, save) on a 1 x 1 x 1 mesh over
  ``devices[:1]`` and on FSDP (fsdp=8), tensor-parallel (fsdp=2, tensor=4) and mixed
  (data=2, fsdp=2, tensor=2) meshes; GRPO (critic-free) on the mixed one. Metrics, samples,
  the saved policy and the updated states (captured from the last update step) must match.
  The mixed run is the session's `ppo_mixed_run` (tests/conftest.py), which
  tests/test_phase_layouts.py reads too (one layout for all phases); compiling dominates a run,
  the second iteration costs ~0.1 s. PPO runs use the session's compilation cache
  (tests/conftest.py): a program another run compiled for the same mesh (per-phase layouts,
  `layouts=auto` probes) is loaded, not compiled again; the key covers HLO, devices and compile
  options, so what runs is what a compile would give.
* SFT and reward: one step each, built exactly as their trainers build it, sharded against
  one device; and `loop.run` (their shared loop) resumed from a checkpoint into the sharded
  layout ends bit for bit where an uninterrupted run does.

Tolerance (float32): rtol 1e-4, atol 1e-5 for metrics, saved and updated params and Adam's
moments; sampled tokens exactly. Collectives reorder the sums of matmuls, norms and losses, so
results differ by rounding. Adam's eps is 1e-4 here instead of the default 1e-6: the first
Adam step is lr * g / (|g| + eps), whose slope at g = 0 is lr / eps, so with eps = 1e-6 the
~1e-8 rounding of a gradient entry that happens to be near 0 moves that entry's step by up to
~7% of lr (measured: 1 or 2 of 256 adapter entries off by up to 1.3e-4, all others within
1e-6; Adam's moments agree to 1e-7). Every test also checks shard shapes (params, adapters,
Adam's moments, batches): a run that ignored the mesh would match one device trivially.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

from perl_jax import checkpoint, config
from perl_jax.data.pipeline import Batches
from perl_jax.models import Transformer
from perl_jax.trainers import common, layout as layout_lib, phases, ppo, reward, sft
from tests.helpers import TINY_VOCAB, persistent_compilation_cache, random_params, tiny_config

ONE = dict(data=1, fsdp=1, tensor=1)  # 1 device: devices[:1]
FSDP = dict(data=1, fsdp=8, tensor=1)
TENSOR = dict(data=1, fsdp=2, tensor=4)
MIXED = dict(data=2, fsdp=2, tensor=2)
RTOL, ATOL = 1e-4, 1e-5
ADAM_EPS = 1e-4  # see the module docstring
VOCAB = TINY_VOCAB  # tests/helpers.py: the tiny model's sizes split over these meshes


def test_conftest_provides_8_host_devices():
  assert jax.device_count() == 8  # every test below needs them: fail, never skip


@pytest.fixture(scope="module")
def assets(sharded_assets):
  """The session's `tests.helpers.tiny_lora_assets` (tests/conftest.py), with its compilation
  cache directory."""
  return sharded_assets


def _set(c, mesh: dict, **keys):
  c.progress = False
  c.mesh.update(mesh)
  for name, value in keys.items():
    node = c
    *parents, leaf = name.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _metrics(workdir: Path) -> list[dict]:
  return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
          for line in open(workdir / "metrics.jsonl")]


def _assert_close_runs(a: Path, b: Path, files: tuple[str, ...]):
  """Same metrics lines and keys (values to the tolerance), same samples, same saved tensors."""
  ma, mb = _metrics(a), _metrics(b)
  assert [sorted(m) for m in ma] == [sorted(m) for m in mb]
  for x, y in zip(ma, mb):
    for k in x:
      np.testing.assert_allclose(x[k], y[k], rtol=RTOL, atol=ATOL, err_msg=f"{a.name}: {k}")
  if (a / "samples.jsonl").exists():
    texts = lambda d: [[s["response"] for s in json.loads(l)["samples"]]
                       for l in open(d / "samples.jsonl")]
    assert texts(a) == texts(b)
  for name in files:
    x, y = load_file(str(a / name)), load_file(str(b / name))
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_allclose(x[k], y[k], rtol=RTOL, atol=ATOL, err_msg=f"{name}: {k}")


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL), a, b)


def _shard(x: jax.Array) -> tuple[int, ...]:
  return x.addressable_shards[0].data.shape


def _assert_placed(tree, mesh: dict, n_devices: int = 8):
  """Every leaf lives on the mesh's devices; returns {path: shard shape}."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    assert len(x.sharding.device_set) == n_devices, (path, x.sharding)
    out["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)] = _shard(x)
  return out


def _record(monkeypatch, module, name: str, calls: list):
  """Wraps the step factory `module.name` so each step call's (args, outputs) are recorded."""
  factory = getattr(module, name)

  def wrapped_factory(*args, **kwargs):
    step = factory(*args, **kwargs)

    def recorded(*a, **k):
      out = step(*a, **k)
      calls.append((a, out))
      return out

    return recorded

  monkeypatch.setattr(module, name, wrapped_factory)


# --- PPO ------------------------------------------------------------------------------------


def _ppo_config(assets, mesh: dict, **keys):
  c = config.ppo_config()
  # 8 prompts = the batch = the evaluation rows: rollout and evaluation share compiled programs.
  # Two iterations (evaluations at 0 and at the end): the second rolls out, scores and updates
  # with the weights the first one updated.
  return _set(c, mesh, **{**dict(
      policy__init=assets["policy"], reward__init=assets["reward"],
      data__prompts=assets["prompts"], total_iterations=2, ppo__batch_size=8,
      ppo__num_minibatches=1, rollout__max_new_tokens=6, optimizer__eps=ADAM_EPS), **keys})


@dataclasses.dataclass
class PpoRun:
  """What `run_ppo` saw of one `ppo.train`."""

  workdir: Path
  frozen: dict  # the last update step's frozen trees ...
  batch: dict  # ... and rollout arrays
  policy: Any  # the states that step returned (ppo.TrainState; value: None without a critic)
  value: Any
  seen: list  # (phase, {mesh shape of the weights it read}) per rollout and scoring call
  realloc: Any  # the run's `phases.Reallocator`; .calls: (kind, {mesh shape}, leaves moved)


def run_ppo(assets, name: str, mesh: dict, **keys) -> PpoRun:
  """Runs PPO in `assets["root"] / name` (compilation cache on), recording the update steps,
  the meshes of the weights rollout and scoring read, and every placement of the
  `phases.Reallocator`."""
  updates, seen, reallocs = [], [], []
  meshes = lambda tree: {tuple(x.sharding.mesh.shape.values()) for x in jax.tree.leaves(tree)}
  rollout, score = ppo.rollout, ppo.make_score_fn

  def spy_rollout(module, variables, *a, **k):
    seen.append(("generate", meshes(variables)))
    return rollout(module, variables, *a, **k)

  def spy_score_fn(*a, **k):
    fn = score(*a, **k)

    def wrapped(policy_vars, ref_vars, reward_vars, affine, value_vars, *rest):
      seen.append(("score", meshes((policy_vars, ref_vars, reward_vars, value_vars))))
      return fn(policy_vars, ref_vars, reward_vars, affine, value_vars, *rest)

    return wrapped

  class Spy(phases.Reallocator):
    """Logs (kind, meshes, leaves moved) per call."""

    def __init__(self):
      super().__init__()
      self.calls = []
      reallocs.append(self)

    def frozen(self, module, tree, layout):
      n = len(self.moves)
      out = super().frozen(module, tree, layout)
      self.calls.append(("frozen", meshes(out), len(self.moves) - n))
      return out

    def trainable(self, module, tree, layout):
      n = len(self.moves)
      out = super().trainable(module, tree, layout)
      self.calls.append(("trainable", meshes(out), len(self.moves) - n))
      return out

  workdir = assets["root"] / name
  c = _ppo_config(assets, mesh, **keys)
  with pytest.MonkeyPatch.context() as mp, persistent_compilation_cache(assets["cache"]):
    _record(mp, ppo, "make_update_fn", updates)
    mp.setattr(ppo, "rollout", spy_rollout)
    mp.setattr(ppo, "make_score_fn", spy_score_fn)
    mp.setattr(phases, "Reallocator", Spy)
    ppo.train(c, str(workdir))
  assert len(updates) == c.total_iterations  # one epoch per iteration: one update each
  args, (pol, val, _) = updates[-1]  # earlier steps' outputs were donated to the next one
  return PpoRun(workdir, args[2], args[3], pol, val, seen, reallocs[0])


@pytest.fixture(scope="module")
def ppo_one_device(assets):
  return run_ppo(assets, "ppo_one", ONE)


@pytest.mark.parametrize("mesh", [FSDP, TENSOR, MIXED], ids=["fsdp8", "fsdp2_tensor4",
                                                             "data2_fsdp2_tensor2"])
def test_ppo_iteration_matches_one_device(assets, ppo_one_device, request, mesh):
  one = ppo_one_device
  one_dir, one_pol, one_val = one.workdir, one.policy, one.value
  if mesh == MIXED:  # the session's run, which tests/test_phase_layouts.py reads as well
    run = request.getfixturevalue("ppo_mixed_run")
  else:
    run = run_ppo(assets, "ppo_" + "_".join(f"{k}{v}" for k, v in mesh.items()), mesh)
  workdir, frozen, pol, val, batch = run.workdir, run.frozen, run.policy, run.value, run.batch
  fsdp, tensor = mesh["fsdp"], mesh["tensor"]
  rows = {shape[0] for shape in _assert_placed(batch, mesh).values()}
  assert rows == {8 // (mesh["data"] * fsdp)}  # 8 responses split over data x fsdp
  # Really split: the frozen base, the adapters and Adam's moments, on all 8 devices.
  base = _assert_placed(frozen["policy"], mesh)
  assert base["params/layers_0/attn/q/kernel"] == (32 // fsdp, 4 // tensor, 8)
  assert base["params/layers_0/mlp/down/kernel"] == (64 // tensor, 32 // fsdp)
  assert base["params/lm_head/kernel"] == (32 // fsdp, VOCAB // tensor)
  kv_heads = 2 // tensor if 2 % tensor == 0 else 2  # 2 KV heads do not split 4 ways: replicated
  assert base["params/layers_0/attn/k/kernel"] == (32 // fsdp, kv_heads, 8)
  adapters = _assert_placed(pol.trainable, mesh)
  assert adapters["lora/layers_0/attn/q/a"] == (32 // fsdp, 8)
  assert adapters["lora/layers_0/attn/q/b"] == (8, 4 // tensor, 8)
  moments = _assert_placed(pol.opt_state, mesh)
  assert sorted(set(moments.values()) - {()}) == sorted(set(adapters.values())), moments
  assert _assert_placed(val.trainable, mesh)["params/score/kernel"] == (32 // fsdp, 1)
  # Same numbers.
  _assert_close_runs(workdir, one_dir, (f"policy/{common.TRAINABLE_FILE}",))
  _close((pol, val), (one_pol, one_val))
  moved = jax.tree.map(lambda x: float(np.abs(np.asarray(x)).max()), one_pol.trainable)
  assert max(jax.tree.leaves(moved["lora"])) > 0  # the update did something to compare


def test_grpo_iteration_matches_one_device(assets):
  """Critic-free (no value model), 2 samples per prompt, 2 minibatches."""
  keys = dict(ppo__estimator="grpo", rollout__num_samples=2, ppo__num_minibatches=2)
  one = run_ppo(assets, "grpo_one", ONE, **keys)
  one_dir, one_pol, no_value = one.workdir, one.policy, one.value
  run = run_ppo(assets, "grpo_mixed", MIXED, **keys)
  workdir, frozen, pol = run.workdir, run.frozen, run.policy
  assert no_value is None
  assert _assert_placed(frozen["policy"], MIXED)["params/lm_head/kernel"] == (16, VOCAB // 2)
  assert _assert_placed(pol.trainable, MIXED)["lora/layers_0/mlp/down/b"] == (8, 16)
  _assert_close_runs(workdir, one_dir, (f"policy/{common.TRAINABLE_FILE}",))
  _close(pol, one_pol)


# --- SFT and reward: one step, and a sharded resume ------------------------------------------


def _step_setup(assets, mesh: dict, task: str):
  """What `sft.train` / `reward.train` build before their loop: the layout, the model placed
  by its `BaseCache`, optimizer state created in place, the jitted step, and the first batch
  (8 rows) split over data x fsdp."""
  from perl_jax.data import jsonl
  from perl_jax.tokenizers import load_tokenizer

  c = _set({"sft": config.sft_config, "reward": config.reward_config}[task](), mesh,
           optimizer__eps=ADAM_EPS)
  lay = layout_lib.Layout.from_config(c)
  with lay.activate():
    init, head = (assets["policy"], "lm") if task == "sft" else (assets["reward"], "scalar")
    model = common.load_model(init, head=head, lora=None, cache=common.BaseCache("float32", lay),
                              rng=jax.random.PRNGKey(0))
    optimizer = common.make_optimizer(c.optimizer)
    trainable = jax.tree.map(jnp.copy, model.trainable)
    opt_state = lay.init_opt_state(optimizer, trainable)
    tokenizer = load_tokenizer(assets["base"])
    if task == "sft":
      data = jsonl.encode_sft(tokenizer, jsonl.read_jsonl(assets["sft_train"], "sft"), 16, 16)
      data = {k: data[k] for k in sft.SFT_KEYS}
      step = sft.make_train_step(model.module, optimizer)
    else:
      data = jsonl.encode_pairs(tokenizer, jsonl.read_jsonl(assets["pref_train"], "pairwise"),
                                16, 16)
      data = {k: data[k] for k in reward.PAIR_KEYS}
      step = reward.make_train_step(model.module, optimizer, "pairwise", center_coef=0.01)
  return c, lay, model, trainable, opt_state, step, data


def _one_step(assets, mesh: dict, task: str):
  c, lay, model, trainable, opt_state, step, data = _step_setup(assets, mesh, task)
  batch = lay.shard_batch({k: v[:8] for k, v in data.items()})
  with lay.activate():
    out = step(trainable, opt_state, model.frozen, batch, jax.random.PRNGKey(1), 1)
  return batch, model.frozen, out


@pytest.mark.parametrize("task, mesh", [("sft", MIXED), ("reward", TENSOR)])
def test_sft_and_reward_steps_match_one_device(assets, task, mesh):
  _, _, (one_trainable, one_opt, one_metrics) = _one_step(assets, ONE, task)
  batch, frozen, (trainable, opt_state, metrics) = _one_step(assets, mesh, task)
  fsdp, tensor = mesh["fsdp"], mesh["tensor"]
  rows = _assert_placed(batch, mesh)
  assert set(rows.values()) == {(8 // (mesh["data"] * fsdp), 33)}  # T = 16 + 16 + 1
  assert _assert_placed(frozen, mesh)["params/layers_0/mlp/up/kernel"] == (32 // fsdp,
                                                                            64 // tensor)
  shapes = _assert_placed(trainable, mesh)
  assert shapes["lora/layers_0/attn/q/b"] == (8, 4 // tensor, 8)  # (rank, heads, head_dim)
  assert shapes["lora/layers_0/mlp/down/b"] == (8, 32 // fsdp)  # (rank, embed)
  if task == "reward":
    assert shapes["params/score/kernel"] == (32 // fsdp, 1)
  moments = _assert_placed(opt_state, mesh)
  assert sorted(set(moments.values()) - {()}) == sorted(set(shapes.values()))
  _close((trainable, opt_state, metrics), (one_trainable, one_opt, one_metrics))
  assert float(one_metrics["grad_norm"]) > 0 and float(metrics["nonfinite/any"]) == 0


def test_loop_resumes_into_the_sharded_layout(assets, tmp_path):
  """`loop.run` (the SFT and reward trainers' loop) on the 2 x 2 x 2 mesh: stopped after step
  1 and resumed from its checkpoint, it ends bit for bit where an uninterrupted run does."""
  from perl_jax.trainers import loop

  c, lay, model, trainable, opt_state, step, data = _step_setup(assets, MIXED, "sft")
  c.data.batch_size, c.checkpoint.asynchronous, c.log_every, c.eval_every = 8, False, 1, 1
  fresh = lambda: jax.tree.map(jnp.copy, (trainable, opt_state))  # the steps donate theirs
  # The encoded arrays as pipeline records: one dict per row, stacked back into a batch.
  rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["tokens_BxT"]))]
  stack = lambda records: {k: np.stack([r[k] for r in records]) for k in data}

  def run(workdir, steps):
    c.total_iterations = steps
    start_trainable, start_opt_state = fresh()
    with lay.activate():
      return loop.run(c, str(workdir), step_fn=step, trainable=start_trainable,
                      opt_state=start_opt_state, frozen=model.frozen,
                      train_batches=Batches(rows, stack, c.data.batch_size, c.seed),
                      rng=jax.random.PRNGKey(3), bases={}, setup_metrics={},
                      evaluate=lambda t: {}, log_eval=lambda *a: None, progress_keys=(),
                      layout=lay)

  run(tmp_path / "resumed", 1)[3].close()
  resumed, resumed_opt, _, writer = run(tmp_path / "resumed", 2)
  writer.close()
  straight, straight_opt, _, writer = run(tmp_path / "straight", 2)
  writer.close()
  assert _assert_placed(resumed, MIXED)["lora/layers_0/mlp/down/b"] == (8, 16)
  for a, b in zip(jax.tree.leaves((resumed, resumed_opt)), jax.tree.leaves((straight,
                                                                            straight_opt))):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(a, b)
  assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")


# --- Checkpoints, config --------------------------------------------------------------------


def test_checkpoint_restores_into_the_layout_of_its_template(tmp_path):
  """Saved from an FSDP layout, restored into a tensor-parallel one: values equal, shards new."""
  model = Transformer(tiny_config())
  params = random_params(model)
  fsdp = layout_lib.Layout.from_config(_set(config.sft_config(), FSDP))
  tensor = layout_lib.Layout.from_config(_set(config.sft_config(), TENSOR))
  c = _set(config.sft_config(), FSDP, checkpoint__asynchronous=False)
  ck = checkpoint.Checkpointer(str(tmp_path), c)
  ck.save(1, {"params": fsdp.place(model, {"params": params})}, {})
  ck.close()
  template = {"params": tensor.place(model, {"params": jax.tree.map(np.zeros_like, params)})}
  state, _ = checkpoint.Checkpointer(str(tmp_path), _set(c, TENSOR)).restore(template)
  q = state["params"]["params"]["layers_0"]["attn"]["q"]["kernel"]
  assert q.sharding == template["params"]["params"]["layers_0"]["attn"]["q"]["kernel"].sharding
  assert _shard(q) == (16, 1, 8)
  jax.tree.map(np.testing.assert_array_equal, state["params"]["params"], params)


@pytest.mark.parametrize("task, keys, message", [
    ("sft", dict(mesh__data=-1, mesh__fsdp=-1), r"config\.mesh\.fsdp: only one"),
    ("sft", dict(mesh__data=3, mesh__fsdp=1), r"config\.mesh: .* = 3 does not divide the 8"),
    ("sft", dict(mesh__tensor=0), r"config\.mesh\.tensor: 0 must be"),
    ("sft", dict(mesh__tensor=3), r"config\.mesh\.fsdp=-1: .* 3, which does not divide"),
    ("sft", dict(mesh__rules="embd=fsdp"), r"config\.mesh\.rules: unknown logical axis 'embd'"),
    ("sft", dict(mesh__rules="embed=model"), r"config\.mesh\.rules: 'embed=model': mesh axes"),
    ("sft", dict(mesh__rules="embed"), r"config\.mesh\.rules: entry 'embed' is not"),
    ("sft", dict(data__batch_size=12), r"config\.data\.batch_size: 12 examples do not split"),
    ("reward", dict(mesh__fsdp=2, data__batch_size=9), r"config\.data\.batch_size"),
    ("ppo", dict(ppo__batch_size=12), r"config\.ppo\.batch_size: 12 prompts"),
    ("ppo", dict(ppo__batch_size=8), r"config\.ppo\.num_minibatches: a microbatch of 4"),
])
def test_bad_mesh_config_fails_naming_the_key(task, keys, message):
  c = _set({"sft": config.sft_config, "reward": config.reward_config,
            "ppo": config.ppo_config}[task](), {}, **keys)
  with pytest.raises(config.ConfigError, match=message):
    config.validate(c)


def test_mesh_rules_override_entries_in_place():
  c = _set(config.sft_config(), {}, mesh__rules="kv_heads=none, embed=fsdp+data,mlp=tensor")
  rules = config.mesh_rules(c)
  assert [name for name, _ in rules] == [name for name, _ in layout_lib.sharding.LOGICAL_RULES]
  assert dict(rules)["kv_heads"] is None and dict(rules)["embed"] == ("fsdp", "data")
  # They reach placement: no 'tensor' on KV heads, 'embed' over fsdp x data.
  lay = layout_lib.Layout.from_config(_set(c, MIXED))
  specs = lay.shardings(Transformer(tiny_config()),
                        {"params": {"layers_0": {"attn": {"k": {"kernel": 0}}}}})
  assert specs["params"]["layers_0"]["attn"]["k"]["kernel"].spec == P(("fsdp", "data"), None, None)
  assert dict(config.check_mesh(_set(config.sft_config(), ONE), 8)[0]) == ONE
