"""Bad input (issue 4, section 4): every kind gets an error naming the file:line, key or tensor
and exit status 2 from `python -m perl_jax.train`, before anything is loaded or compiled.

In-process cases call `train.cli` (what `main` runs) with the trainers' entry points replaced
by functions that fail the test, so an error caught only once training started cannot pass;
the command-line cases run in fresh processes with JAX_LOG_COMPILES=1, where any XLA
compilation would be logged on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from perl_jax import config, lora, train
from perl_jax.data import synthetic, write_jsonl
from perl_jax.models import Transformer, save_hf_checkpoint, tiny_config
from perl_jax.models.hf import CheckpointError
from perl_jax.tokenizers import load_tokenizer
from perl_jax.trainers import common, ppo, reward, sft
from tests.helpers import one_device, random_adapters, random_params

ROOT = Path(__file__).resolve().parents[1]
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ATTENTION_TARGETS)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# --- Tiny checkpoints and data, built without compiling -------------------------------------


def _hf_dir(path: Path, vocab_size: int, seed: int = 0, **overrides) -> Path:
  """A tiny random Llama checkpoint with the synthetic word-level tokenizer next to it."""
  synthetic.build_tokenizer(path)
  cfg = tiny_config("llama", vocab_size=vocab_size, num_layers=1, mlp_dim=64, **overrides)
  save_hf_checkpoint(cfg, random_params(Transformer(cfg), seed=seed), path)
  return path


def _reward_dir(path: Path, base: Path) -> Path:
  """A LoRA reward model (adapters + scalar head) on `base`, saved with `common.save_model`."""
  cfg = common.peek(str(base))[0].replace(head="scalar")
  module = Transformer(cfg, lora=LORA)
  params = random_params(Transformer(cfg), seed=3)
  trainable = {"lora": random_adapters(module, params, seed=4),
               "params": {"score": params["score"]}}
  common.save_model(path, common.Model(module, {"params": {}}, trainable, str(base), str(base)))
  return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_input")
  vocab = len(synthetic.build_tokenizer(root / "tok"))
  policy = _hf_dir(root / "policy", vocab)
  sft_records = synthetic.make_sft_records(40, seed=0)
  write_jsonl(root / "sft.jsonl", sft_records)
  write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_records])
  write_jsonl(root / "pairs.jsonl", synthetic.make_preference_records(40, seed=0))
  return dict(root=root, vocab=vocab, policy=policy, reward=_reward_dir(root / "rm", policy),
              sft=root / "sft.jsonl", prompts=root / "prompts.jsonl", pairs=root / "pairs.jsonl",
              sft_records=sft_records)


def _lines(path: Path, *lines: str) -> Path:
  path.write_text("".join(line + "\n" for line in lines))
  return path


def _good_lines(assets, n: int = 40) -> list[str]:
  return [json.dumps(r) for r in assets["sft_records"][:n]]


def _config(task: str, assets, **keys) -> config.mlc.ConfigDict:
  """A small config of `task` on the assets; keys are "section__key" overrides."""
  c = one_device({"sft": config.sft_config, "reward": config.reward_config,
                  "ppo": config.ppo_config}[task]())
  c.policy.init = str(assets["policy"])
  c.progress, c.total_iterations, c.data.batch_size = False, 1, 8
  if task == "sft":
    c.data.train = c.data.eval = str(assets["sft"])
  elif task == "reward":
    c.data.train = c.data.eval = str(assets["pairs"])
  else:
    c.reward.init, c.data.prompts, c.ppo.batch_size = (str(assets["reward"]),
                                                       str(assets["prompts"]), 8)
  for name, value in keys.items():
    section, key = name.split("__")
    c[section][key] = value
  return c


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if a trainer starts or a model is loaded (`_bad` also counts compiles)."""

  def started(*args, **kwargs):
    raise AssertionError("training started before the bad input was reported")

  for module, name in ((sft, "train"), (reward, "train"), (ppo, "train"),
                       (common, "load_model"), (common.BaseCache, "get")):
    monkeypatch.setattr(module, name, started)


def _report(err: str) -> str:
  """The one-line (one-paragraph) bad-input report in `err`; there must be exactly one."""
  report = [line for line in err.splitlines() if line.startswith("perl_jax.train: bad ")]
  assert len(report) == 1, err
  return report[0]


def _bad(c, workdir: Path, capsys) -> str:
  """Runs `c` as the command line does; asserts exit 2, no XLA compilation (of programs not
  already cached in this process) and no metrics; returns the report."""
  compiles = []
  listener = lambda event, secs, **kw: compiles.append(event) if event == COMPILE_EVENT else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    assert train.cli(c, str(workdir)) == train.EXIT_BAD_INPUT
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles, f"{len(compiles)} XLA compilations before the error"
  assert not (workdir / "metrics.jsonl").exists()
  return _report(capsys.readouterr().err)


# --- Command-line runs, in fresh processes (started together, they run in parallel) ---------


def _cli_cases(assets) -> dict[str, list[str]]:
  root = assets["root"]
  bad_prompts = _lines(root / "cli_prompts.jsonl", *[json.dumps({"prompt": "describe the fox"})
                                                       for _ in range(10)],
                       '{"prompt": "tell me about the cat",}')
  small_vocab = _hf_dir(root / "cli_small_vocab", vocab_size=8)
  (root / "a_file").write_text("")
  return {
      "not_json": ["--config=configs/ppo_lora.py", f"--config.policy.init={assets['policy']}",
                   f"--config.reward.init={assets['reward']}",
                   f"--config.data.prompts={bad_prompts}", f"--workdir={root / 'cli_not_json'}"],
      "vocab": ["--config=configs/sft.py", f"--config.policy.init={small_vocab}",
                f"--config.data.train={assets['sft']}", f"--config.data.eval={assets['sft']}",
                f"--workdir={root / 'cli_vocab'}"],
      "unknown_key": ["--config=configs/reward_lora.py", "--config.reward_model.marjin=0.5",
                      f"--workdir={root / 'cli_unknown_key'}"],
      "workdir": ["--config=configs/sft.py", f"--workdir={root / 'a_file' / 'run'}"],
  }


@pytest.fixture(scope="module")
def cli_runs(assets):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")
  procs = {name: subprocess.Popen([sys.executable, "-m", "perl_jax.train", *args], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
           for name, args in _cli_cases(assets).items()}
  out = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    out[name] = (proc.returncode, stderr)
  return out


def _cli_bad(cli_runs, name: str) -> str:
  rc, err = cli_runs[name]
  assert rc == train.EXIT_BAD_INPUT, err
  assert "Traceback" not in err, err
  assert "Finished XLA compilation" not in err, err  # JAX_LOG_COMPILES=1 logs every compile
  return _report(err)


# --- 1. JSONL that is not JSON ---------------------------------------------------------------


def test_jsonl_that_is_not_json_names_file_and_line(assets, cli_runs, tmp_path, capsys,
                                                    no_compute):
  err = _cli_bad(cli_runs, "not_json")  # PPO: before the policy and reward models are loaded
  assert f"{assets['root'] / 'cli_prompts.jsonl'}:11: not valid JSON" in err
  assert not (assets["root"] / "cli_not_json" / "metrics.jsonl").exists()
  bad = _lines(tmp_path / "train.jsonl", *_good_lines(assets, 5), "", "{'prompt': 'single'}")
  err = _bad(_config("sft", assets, data__train=str(bad)), tmp_path / "run", capsys)
  assert f"bad data: {bad}:7: not valid JSON" in err


# --- 2. A missing or mistyped field ----------------------------------------------------------


@pytest.mark.parametrize("task,line,message", [
    ("sft", '{"prompt": "describe the fox"}', "missing key 'response'"),
    ("sft", '{"prompt": 7, "response": "red ."}', "key 'prompt' must be a string, got number 7"),
    ("reward", '{"prompt": "a fox", "chosen": "red .", "rejected": ["fox ."]}',
     "key 'rejected' must be a string, got array"),
    ("ppo", '{"prompt": null}', "key 'prompt' must be a string, got null"),
])
def test_missing_or_mistyped_field_names_file_line_and_key(assets, tmp_path, capsys, no_compute,
                                                           task, line, message):
  good = {"sft": _good_lines(assets),
          "reward": assets["pairs"].read_text().splitlines(),
          "ppo": assets["prompts"].read_text().splitlines()}[task]
  bad = _lines(tmp_path / "data.jsonl", *good[:12], line, *good[12:])
  key = {"sft": "data__train", "reward": "data__eval", "ppo": "data__prompts"}[task]
  err = _bad(_config(task, assets, **{key: str(bad)}), tmp_path / "run", capsys)
  assert f"bad data: {bad}:13: {message}" in err


# --- 3. An empty prompt or response ----------------------------------------------------------


@pytest.mark.parametrize("record,key", [({"prompt": "", "response": "red ."}, "prompt"),
                                        ({"prompt": "describe the fox", "response": " \t"},
                                         "response")])
def test_empty_prompt_or_response_names_file_line_and_key(assets, tmp_path, capsys, no_compute,
                                                          record, key):
  bad = _lines(tmp_path / "eval.jsonl", *_good_lines(assets, 3), json.dumps(record))
  err = _bad(_config("sft", assets, data__eval=str(bad)), tmp_path / "run", capsys)
  assert f"{bad}:4: key '{key}' is empty" in err


# --- 4. Prompts longer than data.max_prompt_len ----------------------------------------------


def _long_prompt_data(assets, tmp_path) -> Path:
  long = {"prompt": "write a story of the fox and the bird and the cat and the dog and the "
                    "fish and the tree", "response": "red fox ."}
  return _lines(tmp_path / "train.jsonl", *_good_lines(assets, 10), json.dumps(long),
                *_good_lines(assets, 5), json.dumps(long))


def test_too_long_prompt_errors_naming_file_and_line(assets, tmp_path, capsys, no_compute):
  data = _long_prompt_data(assets, tmp_path)
  n = len(load_tokenizer(assets["policy"])(json.loads(data.read_text().splitlines()[10])["prompt"])
          ["input_ids"])
  assert n > 16
  err = _bad(_config("sft", assets, data__train=str(data)), tmp_path / "run", capsys)
  assert "2 prompt(s) longer than max_prompt_len=16 tokens" in err
  assert f"{data}:11: {n} tokens; {data}:17: {n} tokens" in err


def test_too_long_prompt_truncated_left_with_a_logged_count(assets, tmp_path, caplog):
  data = _long_prompt_data(assets, tmp_path)
  c = _config("sft", assets, data__train=str(data), data__truncate="left")
  with caplog.at_level("WARNING"):
    assert train.cli(c, str(tmp_path / "run")) == 0
  assert any(f"{data}: 2 of 17 prompts are longer than data.max_prompt_len=16" in r.getMessage()
             for r in caplog.records)
  first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["params/prompts_truncated"] == 2  # data.eval is the default (untruncated) data


# --- 5. A tokenizer whose vocabulary does not fit the model ----------------------------------


def test_tokenizer_that_does_not_fit_the_model(assets, cli_runs, tmp_path, capsys, no_compute):
  err = _cli_bad(cli_runs, "vocab")
  small = assets["root"] / "cli_small_vocab"
  assert f"bad tokenizer: config.policy.init={small}: tokenizer {small} has {assets['vocab']} " \
         f"tokens" in err and "vocab_size is 8" in err
  # PPO: the reward model must read every id the policy samples.
  small_rm = _hf_dir(tmp_path / "small_rm", vocab_size=8)
  err = _bad(_config("ppo", assets, reward__init=str(small_rm)), tmp_path / "run", capsys)
  assert f"config.reward.init={small_rm}" in err
  assert f"has vocab_size 8, fewer than the policy's {assets['vocab']}" in err


# --- 6. A checkpoint from a different architecture or size -----------------------------------


def _edit_json(path: Path, **changes) -> None:
  data = json.loads(path.read_text())
  for key, value in changes.items():
    section, _, name = key.rpartition("__")
    (data[section] if section else data)[name] = value
  path.write_text(json.dumps(data))


def test_checkpoint_that_does_not_fit_its_config(assets, tmp_path, capsys, no_compute):
  # An HF checkpoint whose config.json says a different MLP width than its tensors hold.
  hf = tmp_path / "hf"
  shutil.copytree(assets["policy"], hf)
  _edit_json(hf / "config.json", intermediate_size=96)
  err = _bad(_config("sft", assets, policy__init=str(hf)), tmp_path / "a", capsys)
  assert "bad checkpoint: config.policy.init=" in err
  assert "tensor model.layers.0.mlp.gate_proj.weight has shape (64, 64), expected (96, 64)" in err
  # A perl_jax reward model whose adapters are not the rank its meta file says.
  rm = tmp_path / "rm"
  shutil.copytree(assets["reward"], rm)
  _edit_json(rm / common.META_FILE, lora__rank=8)
  err = _bad(_config("ppo", assets, reward__init=str(rm)), tmp_path / "b", capsys)
  assert f"{rm / common.TRAINABLE_FILE} does not fit the model" in err
  assert "tensor lora/layers_0/attn/q/a has shape (64, 4), expected (64, 8)" in err


def test_reward_model_whose_base_is_now_a_different_size(assets, tmp_path, capsys, no_compute):
  base = _hf_dir(tmp_path / "base", assets["vocab"])
  rm = _reward_dir(tmp_path / "rm", base)
  meta = json.loads((rm / common.META_FILE).read_text())
  del meta["base_fingerprint"]  # as written before fingerprints: the architecture check remains
  (rm / common.META_FILE).write_text(json.dumps(meta))
  shutil.rmtree(base)
  _hf_dir(base, assets["vocab"], embed_dim=32, num_heads=2, num_kv_heads=1)
  err = _bad(_config("ppo", assets, reward__init=str(rm)), tmp_path / "run", capsys)
  assert f"{rm} was trained on a different architecture than its base checkpoint" in err
  assert "embed_dim=64 (base: 32)" in err and "num_heads=4 (base: 2)" in err


# --- 7. A LoRA checkpoint restored onto a different base -------------------------------------


def _load_reward(rm: Path) -> common.Model:
  return common.load_model(str(rm), head="scalar", lora=None, cache=common.BaseCache(),
                           rng=jax.random.PRNGKey(0))


def test_lora_checkpoint_on_a_retrained_base_is_refused(assets, tmp_path, capsys):
  base = _hf_dir(tmp_path / "base", assets["vocab"])
  rm = _reward_dir(tmp_path / "rm", base)
  recorded = json.loads((rm / common.META_FILE).read_text())["base_fingerprint"]
  assert recorded == common.base_fingerprint(base) and recorded["num_tensors"] == 12
  assert _load_reward(rm).base == os.path.abspath(base)  # the same base loads
  # Retrained: same config, names and shapes, other values.
  _hf_dir(base, assets["vocab"], seed=1)
  with pytest.raises(CheckpointError) as e:
    _load_reward(rm)
  message = str(e.value)
  assert f"{rm} was trained on base checkpoint {os.path.abspath(base)!r}" in message
  assert "same names and shapes but different values" in message
  assert "config.json differs" not in message
  # The command line refuses it before any compute.
  with pytest.MonkeyPatch.context() as m:
    m.setattr(ppo, "train", lambda *a, **k: pytest.fail("PPO started"))
    err = _bad(_config("ppo", assets, reward__init=str(rm)), tmp_path / "run", capsys)
  assert "bad checkpoint: config.reward.init=" in err and "different values" in err
  # config.json edited: named as such.
  _hf_dir(base, assets["vocab"])  # back to the original weights
  _load_reward(rm)
  _edit_json(base / "config.json", transformers_version="0.0.1")  # same architecture
  with pytest.raises(CheckpointError, match="its config.json differs"):
    common.peek(str(rm))


def test_old_meta_without_fingerprint_still_loads(assets, tmp_path):
  rm = tmp_path / "rm"
  shutil.copytree(assets["reward"], rm)
  meta = json.loads((rm / common.META_FILE).read_text())
  del meta["base_fingerprint"]
  (rm / common.META_FILE).write_text(json.dumps(meta))
  model = _load_reward(rm)
  assert set(model.trainable) == {"lora", "params"}
  np.testing.assert_array_equal(
      np.asarray(model.trainable["params"]["score"]["kernel"]),
      np.asarray(_load_reward(assets["reward"]).trainable["params"]["score"]["kernel"]))


# --- 8. An unknown config key ----------------------------------------------------------------


def test_unknown_config_key(assets, cli_runs, tmp_path, capsys, no_compute):
  err = _cli_bad(cli_runs, "unknown_key")
  assert "bad config: config.reward_model.marjin: unknown key" in err and '"margin"' in err
  c = _config("sft", assets)
  c.data.max_prompt_length = 32  # ConfigDicts accept new attributes set in Python
  err = _bad(c, tmp_path / "run", capsys)
  assert "config.data.max_prompt_length: unknown key for task 'sft' (did you mean " \
         "config.data.max_prompt_len?)" in err


# --- 9. A workdir that is not writable -------------------------------------------------------


def test_workdir_that_is_not_writable(assets, cli_runs, tmp_path, capsys, no_compute):
  err = _cli_bad(cli_runs, "workdir")
  assert f"bad config: --workdir / config.workdir '{assets['root'] / 'a_file' / 'run'}' is " \
         "not writable" in err
  blocker = tmp_path / "file"
  blocker.write_text("")
  err = _bad(_config("sft", assets), blocker / "run", capsys)
  assert f"'{blocker / 'run'}' is not writable" in err


# --- Anything else keeps its traceback -------------------------------------------------------


def test_unknown_errors_propagate(assets, tmp_path, monkeypatch):
  def bug(*args, **kwargs):
    raise RuntimeError("a bug, not bad input")

  monkeypatch.setattr(train, "check_inputs", bug)
  with pytest.raises(RuntimeError, match="a bug"):
    train.cli(_config("sft", assets), str(tmp_path / "run"))
  # A plain ValueError is not "known bad input" either.

  def plain_value_error(*args, **kwargs):
    raise ValueError("not one of the bad-input types")

  monkeypatch.setattr(train, "check_inputs", plain_value_error)
  with pytest.raises(ValueError, match="not one of"):
    train.cli(_config("sft", assets), str(tmp_path / "run"))
