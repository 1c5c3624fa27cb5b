"""Checkpoints: atomic Orbax saves, exact resume after SIGKILL and SIGTERM, non-finite faults.

The tests that run one job several times (PPO in worker processes, SFT in this one) compile its
programs once: later runs load them from the session's compilation cache (tests/conftest.py).
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from perl_jax import checkpoint, config
from perl_jax.metrics import MetricsWriter
from perl_jax.models import Transformer, init_params, save_hf_checkpoint
from perl_jax.trainers import common, ppo
from tests.helpers import one_device

WORKER = str(Path(__file__).with_name("resume_worker.py"))


def _ckpt_config(**checkpoint_keys):
  c = config.sft_config()
  for k, v in {**dict(every_steps=1, every_minutes=0.0, keep=2, asynchronous=False),
               **checkpoint_keys}.items():
    c.checkpoint[k] = v
  return c


def _state(seed=0):
  params = {"w": jax.random.normal(jax.random.PRNGKey(seed), (3, 4)), "b": jnp.zeros((4,))}
  opt = optax.adamw(1e-3)
  return {"trainable": params, "opt_state": opt.init(params), "rng": jax.random.PRNGKey(7)}


# --- The Checkpointer on its own ------------------------------------------------------------


def test_save_restore_round_trip_keeps_the_newest_and_ignores_unfinished(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  assert ck.restore(_state()) is None
  for step in (1, 2, 3):
    ck.save(step, _state(step), {"data_position": step})
  ck.wait()
  # A write that never finished (a process killed mid-save) leaves a temporary directory.
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234").mkdir()
  ck = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  state, meta = ck.restore(_state())
  assert meta["step"] == 3 and meta["data_position"] == 3
  jax.tree.map(np.testing.assert_array_equal, state, _state(3))
  assert type(state["opt_state"]) is type(_state()["opt_state"])  # optax state structure
  kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == ["2", "3"]  # keep=2


def test_non_finite_state_is_never_saved(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ck.save(1, _state(), {})
  bad = _state()
  bad["trainable"]["w"] = bad["trainable"]["w"].at[1, 2].set(jnp.nan)
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"'trainable'\]\['w'\]"):
    ck.save(2, bad, {})
  ck.close()
  assert checkpoint.Checkpointer(str(tmp_path), _ckpt_config()).latest_step() == 1


def test_restore_refuses_a_different_config_but_not_a_longer_run(tmp_path):
  ck = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ck.save(1, _state(), {})
  ck.close()
  longer = _ckpt_config(keep=5)
  longer.total_iterations = 1000
  assert checkpoint.Checkpointer(str(tmp_path), longer).restore(_state())[1]["step"] == 1
  other = _ckpt_config()
  other.optimizer.lr = 0.5
  lr = config.sft_config().optimizer.lr
  with pytest.raises(checkpoint.CheckpointMismatchError, match=rf"optimizer\.lr: {lr} -> 0\.5"):
    checkpoint.Checkpointer(str(tmp_path), other).restore(_state())


def test_restore_refuses_a_changed_base(tmp_path, compilation_cache):  # 2nd init_params: cached
  cfg = common.scratch_config(config.sft_config(), 40, dict(pad_token_id=0, bos_token_id=1,
                                                            eos_token_id=2), "float32")
  base = tmp_path / "base"
  save_hf_checkpoint(cfg, init_params(Transformer(cfg), jax.random.PRNGKey(0)), base)
  ck = checkpoint.Checkpointer(str(tmp_path / "run"), _ckpt_config(), {"policy": str(base)})
  ck.save(1, _state(), {})
  ck.close()
  save_hf_checkpoint(cfg, init_params(Transformer(cfg), jax.random.PRNGKey(1)), base)  # retrained
  with pytest.raises(checkpoint.CheckpointMismatchError, match="frozen base of the policy"):
    checkpoint.Checkpointer(str(tmp_path / "run"), _ckpt_config(),
                            {"policy": str(base)}).restore(_state())


def test_metrics_writer_drops_the_records_a_resumed_run_rewrites(tmp_path):
  with MetricsWriter(tmp_path, progress=False, tensorboard=False) as w:
    for step in range(5):
      w.write(step, {"x": float(step)})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "x": 5.0')  # torn by SIGKILL
  with MetricsWriter(tmp_path, progress=False, tensorboard=False, keep_below=3) as w:
    w.write(3, {"x": 30.0})
  steps = [(r["step"], r["x"]) for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert steps == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]
  MetricsWriter(tmp_path, progress=False, tensorboard=False, keep_below=0).close()
  assert (tmp_path / "metrics.jsonl").read_text() == ""


# --- Non-finite steps -----------------------------------------------------------------------


def test_train_step_skips_a_non_finite_update_bit_for_bit():
  def loss_fn(trainable, frozen, batch, rng):
    del frozen, rng
    return jnp.sum((trainable["w"] * batch["x"]) ** 2), {}

  optimizer = optax.adam(0.1)
  step = common.make_train_step(loss_fn, optimizer)
  w = {"w": jnp.arange(3.0)}
  opt_state = optimizer.init(w)
  w, opt_state, m = step(w, opt_state, {}, {"x": jnp.ones(3)}, jax.random.PRNGKey(0), 1)
  assert float(m["nonfinite/any"]) == 0.0
  before = jax.tree.map(np.array, (w, opt_state))
  w, opt_state, m = step(w, opt_state, {}, {"x": jnp.array([1.0, jnp.nan, 1.0])},
                         jax.random.PRNGKey(0), 2)
  assert float(m["nonfinite/loss"]) == 1.0 and float(m["nonfinite/grad"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, (w, opt_state), before)


def test_skip_counter_stops_after_k_in_a_row_naming_step_and_cause():
  counter = common.SkipCounter(limit=3)
  ok = {"loss": 1.0, "nonfinite/any": 0.0, "nonfinite/loss": 0.0, "nonfinite/grad": 0.0}
  bad = {"loss": float("nan"), "nonfinite/any": 1.0, "nonfinite/loss": 0.0,
         "nonfinite/grad": 1.0}
  assert counter.update(1, ok) == {"loss": 1.0, "train/skipped_steps": 0}
  assert counter.update(2, bad) == {"train/skipped_steps": 1}  # NaN loss dropped, count kept
  counter.update(3, bad)
  counter.update(4, ok)  # a good step resets the run of skips
  counter.update(5, bad)
  counter.update(6, bad)
  with pytest.raises(common.NonFiniteTrainingError, match=r"step 7: non-finite grad for 3"):
    counter.update(7, bad)
  assert counter.total == 5
  minibatches = dict(ok, **{k: np.array([0.0, 1.0]) for k in ("nonfinite/any", "nonfinite/loss")})
  assert common.SkipCounter(limit=2).update(1, minibatches)["train/skipped_steps"] == 1


# --- PPO end to end: SIGKILL, SIGTERM and NaN injection --------------------------------------


@pytest.fixture(scope="module")
def ppo_setup(tmp_path_factory, tiny_ppo_assets, compilation_cache_env):
  """Overrides for a 6-iteration PPO run on a random tiny (1-layer) LoRA policy and reward
  model, and the environment of its worker processes: the first run (`straight`) fills the
  compilation cache, the later ones, which run exactly its programs, load them from it
  (tests/conftest.py)."""
  wd = tmp_path_factory.mktemp("resume")
  assets = tiny_ppo_assets
  overrides = {"policy.init": assets["policy"], "reward.init": assets["reward"],
               "data.prompts": assets["prompts"], "total_iterations": 6, "eval_every": 3,
               "log_every": 1, "progress": False, "ppo.batch_size": 8,
               "rollout.max_new_tokens": 6, "checkpoint.every_steps": 2,
               "checkpoint.every_minutes": 0.0, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}
  path = wd / "overrides.json"
  path.write_text(json.dumps(overrides))
  straight = wd / "straight"
  env = {**os.environ, **compilation_cache_env}
  _worker(path, straight, env=env)
  return dict(overrides=path, straight=straight, wd=wd, values=overrides, env=env,
              base=assets["base"])


def _worker(overrides, workdir, *options, env, expect=0):
  proc = subprocess.run([sys.executable, WORKER, str(overrides), str(workdir), *options],
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == expect, proc.stderr[-3000:]
  return proc


def _metrics(workdir):
  """metrics.jsonl without timings (the only values that may differ between runs)."""
  return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
          for line in open(Path(workdir) / "metrics.jsonl")]


def _assert_same_run(workdir, straight):
  a = load_file(str(Path(workdir) / "policy" / common.TRAINABLE_FILE))
  b = load_file(str(Path(straight) / "policy" / common.TRAINABLE_FILE))
  assert a.keys() == b.keys()
  for k in a:  # bitwise: the same programs on the same inputs on this CPU
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert _metrics(workdir) == _metrics(straight)
  assert json.loads((Path(workdir) / "summary.json").read_text()) == json.loads(
      (Path(straight) / "summary.json").read_text())


def test_ppo_killed_mid_run_resumes_to_the_same_result(ppo_setup):
  run = ppo_setup["wd"] / "killed"
  # Rollout calls: eval 0, it 0, it 1, it 2, eval 3, it 3, it 4, it 5 -> the 8th is it 5's.
  proc = subprocess.run([sys.executable, WORKER, str(ppo_setup["overrides"]), str(run),
                         "--kill-at-rollout=8"], capture_output=True, text=True, timeout=600,
                        env=ppo_setup["env"])
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # Step 4's asynchronous write may or may not have finished; Orbax starts a save only after
  # the previous one is complete, so step 2 is there in any case.
  saved = checkpoint.Checkpointer(str(run), _ppo_config(ppo_setup)).latest_step()
  assert saved in (2, 4)
  assert not (run / "summary.json").exists()
  _worker(ppo_setup["overrides"], run, env=ppo_setup["env"])
  _assert_same_run(run, ppo_setup["straight"])


def test_ppo_sigterm_saves_exits_75_and_resumes_to_the_same_result(ppo_setup):
  run = ppo_setup["wd"] / "preempted"
  proc = _worker(ppo_setup["overrides"], run, "--sigterm-after-iteration=2",
                 env=ppo_setup["env"], expect=checkpoint.PREEMPTED_EXIT_CODE)
  assert "saved step 3" in proc.stderr
  # Step 3 is off the every-2-steps schedule: saved because of the signal.
  assert checkpoint.Checkpointer(str(run), _ppo_config(ppo_setup)).latest_step() == 3
  _worker(ppo_setup["overrides"], run, env=ppo_setup["env"])
  _assert_same_run(run, ppo_setup["straight"])


def _ppo_config(ppo_setup):
  c = config.ppo_config()
  for key, value in ppo_setup["values"].items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_ppo_non_finite_advantages_skip_then_stop_with_a_good_checkpoint(ppo_setup, monkeypatch,
                                                                        compilation_cache):
  """In this process, with the programs the workers compiled (the compilation cache)."""
  from perl_jax import train

  c = _ppo_config(ppo_setup)
  c.optimizer.max_consecutive_skips = 3
  c.checkpoint.every_steps = 1
  calls = {"n": 0}
  arrays = ppo.rollout_arrays

  def poisoned(batch, adv, returns):  # iteration 1 is poisoned; from iteration 3 on, all are
    calls["n"] += 1
    if calls["n"] == 2 or calls["n"] >= 4:
      adv = adv + jnp.nan
    return arrays(batch, adv, returns)

  monkeypatch.setattr(ppo, "rollout_arrays", poisoned)
  run = ppo_setup["wd"] / "nan"
  # Iteration 1: both minibatches skipped; 2 is fine; 3 skips 2 and 4's first makes it 3.
  with pytest.raises(common.NonFiniteTrainingError, match=r"step 4: non-finite loss and grad"):
    train.run(c, str(run))
  lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
  by_step = {r["step"]: r for r in lines if "train/skipped_steps" in r}
  assert by_step[1]["train/skipped_steps"] == 2 and "loss/policy_avg" not in by_step[1]
  assert by_step[2]["train/skipped_steps"] == 2 and "loss/policy_avg" in by_step[2]
  base = ppo_setup["base"]  # policy, reward and value share this base
  ck = checkpoint.Checkpointer(str(run), c, {"policy": base, "reward": base, "value": base})
  assert ck.latest_step() == 4  # after iteration 3, whose updates were all skipped
  state, _ = ck.restore(ppo_setup_state(c))
  assert not checkpoint.nonfinite_leaves(state)


def ppo_setup_state(c):
  """A template of the PPO checkpoint state for `c` (shapes only matter)."""
  models = ppo.load_models(c, common.BaseCache(), jax.random.PRNGKey(0))
  popt = common.make_optimizer(c.optimizer)
  from perl_jax import rl
  return {"policy": ppo.TrainState(models.policy.trainable, popt.init(models.policy.trainable)),
          "value": ppo.TrainState(models.value.trainable, popt.init(models.value.trainable)),
          "rng": jax.random.PRNGKey(0), "kl": jnp.asarray(0.0),
          "reward_stats": rl.RunningMeanStd.create()}


# --- SFT: SIGTERM in process, then resume ---------------------------------------------------


def test_sft_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch,
                                                             compilation_cache):
  from perl_jax import train

  c = one_device(config.sft_config())
  c.total_iterations, c.log_every, c.eval_every, c.progress = 6, 1, 3, False
  c.checkpoint.every_steps, c.checkpoint.every_minutes = 0, 0.0
  c.model.num_layers = 1
  assert threading.current_thread() is threading.main_thread()  # where SIGTERM is handled
  train.run(c, str(tmp_path / "straight"))
  update = common.SkipCounter.update

  def signal_at_step_4(self, step, metrics):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return update(self, step, metrics)

  monkeypatch.setattr(common.SkipCounter, "update", signal_at_step_4)
  with pytest.raises(checkpoint.Preempted, match="saved step 4"):
    train.run(c, str(tmp_path / "run"))
  monkeypatch.setattr(common.SkipCounter, "update", update)
  train.run(c, str(tmp_path / "run"))
  a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("run", "straight"))
  assert {k: v for k, v in a.items() if k not in ("seconds", "hf_dir")} == {
      k: v for k, v in b.items() if k not in ("seconds", "hf_dir")}
  x = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
  y = load_file(str(tmp_path / "straight" / "hf" / "model.safetensors"))
  for k in y:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  assert _metrics(tmp_path / "run") == _metrics(tmp_path / "straight")


# --- Determinism ----------------------------------------------------------------------------


def test_same_seed_same_metrics_and_samples_other_seed_other_samples(tmp_path,
                                                                     compilation_cache):
  from perl_jax import train

  def run(name, seed):
    c = one_device(config.sft_config())
    c.total_iterations, c.log_every, c.eval_every, c.progress = 4, 1, 2, False
    c.model.num_layers, c.seed = 1, seed
    train.run(c, str(tmp_path / name))
    samples = [json.loads(x)["samples"] for x in open(tmp_path / name / "samples.jsonl")]
    return _metrics(tmp_path / name), samples

  first, again, other = run("a", 0), run("b", 0), run("c", 1)
  assert first == again
  assert first[1] != other[1]  # the seed draws the initial weights, hence what they generate
