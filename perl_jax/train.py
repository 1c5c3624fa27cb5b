"""The trainer entry point.

    python -m perl_jax.train --config=configs/ppo_lora.py [--config.key=value ...] [--workdir=DIR]

`config.task` picks the trainer (sft, reward, ppo). A PPO config with no `policy.init` /
`reward.init` runs the built-in synthetic task end to end: SFT policy, then a LoRA reward
model, then PPO against it; finished stages are cached in the workdir, so a second run goes
straight to PPO. Every run writes WORKDIR/summary.json.

Bad input
---------
Before any weights are loaded or anything is compiled, `run` checks every input of the run
(`check_inputs`): the config (unknown keys, values that cannot work together), the workdir
(writable), every JSONL file and every record of a prepared dataset (``data.tfds``: it must
exist, with the splits asked for) (valid JSON, the fields of its schema, non-empty text; every
prompt formatted (``data.prompt_format``) and, with every response, encoded with the tokenizer
the trainer will use, against ``data.max_prompt_len`` / ``data.max_response_len`` and
``data.truncate``), every checkpoint
(config.json against its tensor shapes; a perl_jax model directory against its base's
architecture and fingerprint) and every tokenizer against the models that read its ids.

Exit status:

* 0: the run finished.
* 2: bad input: a `ConfigError`, `DataError`, `CheckpointError` or `TokenizerError`, a flag
  that does not parse, or a config key that does not exist. One paragraph on stderr,
  ``perl_jax.train: bad <config|data|checkpoint|tokenizer|flag>: <message>``, names the key,
  the file and line, or the tensor; no traceback.
* 3: `optimizer.max_consecutive_skips` steps in a row had a non-finite loss or gradient; the
  message names the step, and the last checkpoint holds the last good state.
* 75: preempted (SIGTERM): the step in flight finished and was saved; run the same command
  again to resume (every trainer resumes from ``WORKDIR/checkpoints`` on its own).
* 1: anything else (a bug, out of memory, ...): the exception propagates with its traceback.

Multi-host
----------
Every host runs this same command. Before anything touches a device, `main` calls
`perl_jax.distributed.initialize`: on Cloud TPU and under SLURM JAX finds its peers itself;
elsewhere pass ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
``JAX_*`` variables of the same names). Only process 0 writes summary.json, metrics,
TensorBoard events and the progress bar, and prints the summary; the other processes log
warnings and errors only. Checkpoints are written by all processes together (Orbax). The
workdir must be one directory every host sees (``launch/tpu.py`` mounts a GCS bucket).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a restart costs a bare interpreter start
  from perl_jax import host as _host

  _host.restart_with_huge_pages("perl_jax.train")  # malloc's mappings on huge pages: host.py

import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from perl_jax import distributed, host
from perl_jax.config import ConfigError
from perl_jax.data.jsonl import DataError
from perl_jax.models.hf import CheckpointError
from perl_jax.tokenizers import TokenizerError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (overrides config.workdir).")
# Multi-host start-up (perl_jax/distributed.py); unset on one host, on Cloud TPU and on SLURM.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 in a multi-host run without cluster "
    "auto-detection (also JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (hosts) in the run (also JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (also JAX_PROCESS_ID).")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # optimizer.max_consecutive_skips non-finite steps in a row
# Preemption (SIGTERM) exits with perl_jax.checkpoint.PREEMPTED_EXIT_CODE (75) after saving.
# Known bad input, reported without a traceback; the first matching name is used.
BAD_INPUT = (ConfigError, DataError, CheckpointError, TokenizerError)
_WHAT = {ConfigError: "bad config", DataError: "bad data", CheckpointError: "bad checkpoint",
         TokenizerError: "bad tokenizer"}


def run(c, workdir: str) -> dict:
  """Validates `c` and its inputs, runs its task in `workdir`, writes and returns the summary."""
  from perl_jax import config

  c = c.copy_and_resolve_references()  # never mutate the caller's config
  config.validate(c)
  _check_multi_process(c)
  _check_writable(workdir)
  counts = check_inputs(c, workdir)  # prompts data.truncate cuts: the trainers need not recount
  if c.task == "sft":
    from perl_jax.trainers import sft
    summary = sft.train(c, workdir, train_prompts_cut=counts["data.train"])
  elif c.task == "reward":
    from perl_jax.trainers import reward
    summary = reward.train(c, workdir, train_prompts_cut=counts["data.train"])
  else:
    summary = _ppo_with_prerequisites(c, workdir, counts["data.prompts"])
  if distributed.is_primary():  # one writer in a multi-host run
    Path(workdir, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return summary


def _check_multi_process(c) -> None:
  """Refuses, before anything is written, what a multi-process run cannot do yet: the SFT and
  reward trainers (their evaluations read sharded arrays on the host), and so the built-in
  synthetic prerequisites of PPO (which would also have every process write the same files)."""
  import jax

  n = jax.process_count()
  if n == 1:
    return
  if c.task != "ppo":
    raise ConfigError(f"config.task={c.task!r} with {n} processes: only PPO runs multi-process "
                      "so far; train this stage in a single process")
  missing = [k for k, v in (("policy.init", c.policy.init), ("reward.init", c.reward.init),
                            ("data.prompts or data.tfds", c.data.prompts or c.data.tfds))
             if not v]
  if missing:
    raise ConfigError(f"{', '.join(missing)} unset with {n} processes: the built-in synthetic "
                      "task (data, SFT policy, reward model) is built in a single process; run "
                      "it once without the multi-host flags, then pass policy.init, reward.init "
                      "and data.prompts from its workdir")


def _ppo_with_prerequisites(c, workdir: str, prompts_cut: int) -> dict:
  """PPO; with missing policy/reward/prompts, first builds them from the synthetic task."""
  from perl_jax import config
  from perl_jax.data import synthetic
  from perl_jax.trainers import ppo

  builtin = not (c.policy.init and c.reward.init and (c.data.prompts or c.data.tfds))
  extra: dict = {}
  gold_fn = None
  if builtin:
    data = synthetic.prepare(os.path.join(workdir, "data"), seed=c.seed)
    gold_fn = synthetic.gold_reward
    if not c.data.prompts:
      c.data.prompts = data["prompts"]
    if not c.policy.init:
      sc = config.sft_config()
      sc.seed, sc.dtype, sc.progress = c.seed, c.dtype, c.progress
      sc.model, sc.mesh = c.model, c.mesh
      sc.total_iterations = c.synthetic.sft_steps
      sc.data.train, sc.data.eval = data["sft_train"], data["sft_eval"]
      sc.data.max_prompt_len, sc.data.max_response_len = (c.data.max_prompt_len,
                                                          c.rollout.max_new_tokens)
      c.policy.init = _cached_stage(sc, os.path.join(workdir, "sft"), "hf_dir")
    if not c.reward.init:
      rc = config.reward_config()
      rc.seed, rc.dtype, rc.progress = c.seed, c.dtype, c.progress
      rc.policy.init, rc.mesh = c.policy.init, c.mesh
      rc.total_iterations = c.synthetic.reward_steps
      rc.data.train, rc.data.eval, rc.data.prompts = (data["pref_train"], data["pref_eval"],
                                                     data["prompts"])
      rc.data.max_prompt_len, rc.data.max_response_len = (c.data.max_prompt_len,
                                                          c.rollout.max_new_tokens)
      if c.lora.rank:
        rc.lora = c.lora
      reward_summary = _cached_summary(rc, os.path.join(workdir, "reward"))
      c.reward.init = reward_summary["model_dir"]
      extra["reward_model_accuracy"] = reward_summary["accuracy"]
  summary = ppo.train(c, workdir, gold_fn=gold_fn, prompts_cut=prompts_cut)
  return {**extra, **summary}


def _cached_summary(c, stage_dir: str) -> dict:
  """Runs a prerequisite stage unless its summary.json shows it already finished."""
  done = Path(stage_dir, "summary.json")
  if done.exists():
    print(f"Reusing {stage_dir} (delete it to retrain)")
    return json.loads(done.read_text())
  return run(c, stage_dir)


def _cached_stage(c, stage_dir: str, key: str) -> str:
  return _cached_summary(c, stage_dir)[key]


def _check_writable(workdir: str) -> None:
  if "://" in workdir:  # os.makedirs would quietly make a local directory named "gs:"
    raise ConfigError(f"--workdir / config.workdir {workdir!r}: a URL, but the trainers write "
                      "with local file I/O; mount the bucket and pass the mounted path "
                      "(launch/tpu.py mounts gs://BUCKET at /gcs/BUCKET on every worker)")
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing the workdir must not delete each other's.
    probe = Path(workdir, f".write_test.{os.getpid()}.{socket.gethostname()}")
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"--workdir / config.workdir {workdir!r} is not writable: {e}") from e


# --- Input checks before any compute --------------------------------------------------------


def check_inputs(c, workdir: str) -> dict[str, int]:
  """Checks every input of run `c` without loading weights or compiling anything.

  Reads and encodes every data file exactly as the trainer will (so a bad line, a missing or
  mistyped field, an empty text or a too-long prompt or response is reported now, naming
  file:line, rather than after the models are loaded), checks every checkpoint with
  `common.peek` (config, tensor shapes, a perl_jax directory's base and its fingerprint), and
  every tokenizer against the models that read its ids. Stages that the built-in task trains
  first are checked when they run. Returns {config key of a data file: prompts that
  ``data.truncate="left"`` will cut}, each count also logged.
  """
  if c.task == "sft":
    return _check_sft(c, workdir)
  if c.task == "reward":
    return _check_reward(c, workdir)
  return _check_ppo(c, workdir)


def _check_sft(c, workdir: str) -> dict[str, int]:
  from perl_jax.data import sources
  from perl_jax.trainers import sft

  train, evals, synthetic_tokenizer, names = sft.data_records(c, workdir)
  if c.policy.init:
    tokenizer = _checked_tokenizer(c, "policy.init", head="lm")
  else:  # the tokenizer a model trained from scratch gets (fitted to the data if needed)
    tokenizer = sft.scratch_tokenizer(sources.materialize(train) + evals, synthetic_tokenizer,
                                      workdir)
  _check_batch_size(c, "data.batch_size", len(train), names["data.train"])
  records = {"data.train": train, "data.eval": evals}
  return {key: _encode(c, tokenizer, recs, "sft", names[key]) for key, recs in records.items()}


def _check_reward(c, workdir: str) -> dict[str, int]:
  from perl_jax.tokenizers import load_tokenizer
  from perl_jax.trainers import reward

  kind, train, evals, prompts, synthetic_tokenizer, names = reward.data_records(c, workdir)
  records = {"data.train": train, "data.eval": evals}
  if prompts is not None:
    records["data.prompts"] = prompts
  # The tokenizers reward.train will pick: the reward model's own, else the policy's, else the
  # synthetic task's.
  policy_tokenizer = None
  if c.policy.init:
    # With normalisation, the policy samples the responses whose scores set gain and bias.
    policy_tokenizer = _checked_tokenizer(c, "policy.init", fallback=synthetic_tokenizer,
                                          head="lm" if c.reward_model.normalize else None)
  if c.reward.init:
    fallback = policy_tokenizer.name_or_path if policy_tokenizer else synthetic_tokenizer
    tokenizer = _checked_tokenizer(c, "reward.init", fallback=fallback)
    if policy_tokenizer is not None and c.reward_model.normalize:
      _check_reads_policy_ids(c, "reward.init", policy_tokenizer)
  elif policy_tokenizer is not None:
    tokenizer = policy_tokenizer
  else:  # the synthetic SFT policy is trained first, with the synthetic tokenizer
    tokenizer = load_tokenizer(synthetic_tokenizer)
  _check_batch_size(c, "data.batch_size", len(train), names["data.train"])
  return {key: _encode(c, tokenizer, recs, "prompts" if key == "data.prompts" else kind,
                       names[key]) for key, recs in records.items()}


def _check_ppo(c, workdir: str) -> dict[str, int]:
  from perl_jax.data import jsonl, sources, synthetic
  from perl_jax.tokenizers import load_tokenizer
  from perl_jax.trainers import ppo

  synthetic_paths = None
  if not (c.policy.init and (c.data.prompts or c.data.tfds)):
    synthetic_paths = synthetic.prepare(os.path.join(workdir, "data"), seed=c.seed)
  if c.policy.init:
    tokenizer = _checked_tokenizer(c, "policy.init", head="lm")
  else:  # the built-in SFT policy is trained (first) with the synthetic tokenizer
    tokenizer = load_tokenizer(synthetic_paths["tokenizer"])
  # Reward and value models read the token ids the policy samples.
  for key in ("reward.init", "value.init"):
    if _get(c, key) and (key == "reward.init" or c.ppo.estimator == "gae"):
      _check_reads_policy_ids(c, key, tokenizer)
  if c.data.tfds:
    prompts, prompts_path = ppo.prompt_records(c), sources.name(c, "train")
  else:
    prompts_path = c.data.prompts or synthetic_paths["prompts"]
    prompts = jsonl.read_jsonl(prompts_path, "prompts")
  if len(prompts) < c.ppo.batch_size:
    raise ConfigError(f"config.ppo.batch_size: {c.ppo.batch_size} prompts per iteration, but "
                      f"{prompts_path} holds only {len(prompts)}")
  counts = {"data.prompts": _encode(c, tokenizer, prompts, "prompts", prompts_path)}
  if c.ppo.ptx_coef:
    counts["data.train"] = _encode(c, tokenizer, jsonl.read_jsonl(c.data.train, "sft"), "sft",
                                   c.data.train)
  return counts


def _get(c, dotted: str) -> Any:
  node = c
  for part in dotted.split("."):
    node = node[part]
  return node


def _named(key: str, init: str, fn) -> Any:
  """fn(), with a bad-input error prefixed by the config key whose checkpoint caused it."""
  try:
    return fn()
  except BAD_INPUT as e:
    raise type(e)(f"config.{key}={init}: {e}") from None


def _checked_tokenizer(c, key: str, head: str | None = None, fallback: str | None = None) -> Any:
  """The tokenizer of checkpoint `config.<key>`, checked against it (`common.checked_tokenizer`);
  with `head`, the checkpoint must have that head."""
  from perl_jax.trainers import common

  init = _get(c, key)

  def check():
    tokenizer = common.checked_tokenizer(init, fallback)
    if head == "lm" and common.peek(init)[0].head != "lm":
      raise CheckpointError(f"{init} is a scalar-head (reward or value) model; a causal LM is "
                            "needed here")
    return tokenizer

  return _named(key, init, check)


def _check_reads_policy_ids(c, key: str, policy_tokenizer: Any) -> None:
  """Checkpoint `config.<key>` scores the token ids the policy samples: its embedding table
  must cover the policy's vocabulary, and its own tokenizer (if it has one) must give the
  same ids to the same tokens."""
  from perl_jax.tokenizers import load_tokenizer
  from perl_jax.trainers import common

  init = _get(c, key)

  def check():
    cfg, tokenizer_dir = common.peek(init)
    policy_vocab = (common.peek(c.policy.init)[0].vocab_size if c.policy.init
                    else len(policy_tokenizer))
    if cfg.vocab_size < policy_vocab:
      raise CheckpointError(f"{init} has vocab_size {cfg.vocab_size}, fewer than the policy's "
                            f"{policy_vocab}: token ids the policy samples would index past its "
                            "embedding table")
    mine = os.path.realpath(getattr(policy_tokenizer, "name_or_path", "") or ".")
    if tokenizer_dir and os.path.realpath(tokenizer_dir) != mine:
      ours, theirs = policy_tokenizer.get_vocab(), load_tokenizer(tokenizer_dir).get_vocab()
      differ = sorted(t for t in ours.keys() & theirs.keys() if ours[t] != theirs[t])
      if differ:
        shown = ", ".join(f"{t!r} ({ours[t]} vs {theirs[t]})" for t in differ[:5])
        raise TokenizerError(f"its tokenizer {tokenizer_dir} gives {len(differ)} tokens other "
                             f"ids than the policy's tokenizer {policy_tokenizer.name_or_path}"
                             f" (e.g. {shown}): it was trained on a different vocabulary")

  _named(key, init, check)


def _check_batch_size(c, key: str, n: int, path: str) -> None:
  if n < _get(c, key):
    raise ConfigError(f"config.{key}: {_get(c, key)} examples per step, but {path} holds only "
                      f"{n} records")


def _encode(c, tokenizer: Any, records: Sequence, kind: str, path: str) -> int:
  """Formats and encodes `records` as the trainer will (every DataError names file:line, or
  dataset/split[index] and the upstream file:line); returns how many prompts
  ``data.truncate="left"`` cuts, and logs that count."""
  import numpy as np

  from perl_jax.data import jsonl, sources

  d = c.data
  fmt = sources.formatter(c, tokenizer)
  if kind == "prompts":
    encode = lambda recs: {"prompt_truncated_B": np.asarray(jsonl.encode_prompt_batch(
        tokenizer, fmt.records(recs, kind), d.max_prompt_len, d.truncate)[2])}
  else:
    encoder = {"sft": jsonl.encode_sft, "pairwise": jsonl.encode_pairs,
               "pointwise": jsonl.encode_pointwise}[kind]
    encode = lambda recs: encoder(tokenizer, fmt.records(recs, kind), d.max_prompt_len,
                                  d.max_response_len, d.truncate)
  n_cut = sources.encode_all(records, encode)
  if n_cut:
    logging.warning("%s: %d of %d prompts are longer than data.max_prompt_len=%d tokens; "
                    "data.truncate='left' keeps their last tokens", path, n_cut, len(records),
                    d.max_prompt_len)
  return int(n_cut)


# --- Command line ---------------------------------------------------------------------------


def error_message(e: BaseException) -> str:
  """The one-paragraph stderr report of a known bad input."""
  what = next(name for cls, name in _WHAT.items() if isinstance(e, cls))
  return f"perl_jax.train: {what}: {' '.join(str(e).split())}"


def _exit_bad_input(what: str, message: str) -> NoReturn:
  print(f"perl_jax.train: {what}: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def _bad_flag(e: Exception, argv: Sequence[str]) -> NoReturn:
  """Reports a flag that does not parse; re-raises anything that is not one."""
  if isinstance(e, flags.Error):  # a value of the wrong type, a --config file that fails
    _exit_bad_input("bad flag", str(e))
  if isinstance(e, OSError) and "config file" in str(e):  # --config=FILE does not exist
    _exit_bad_input("bad flag", f"--config: {e}")
  # ml_collections reports an override of a key that does not exist as an AttributeError or
  # KeyError from deep inside parsing, its message starting with the missing name: find the
  # --config.a.b override it came from.
  missing = re.search(r"\w+", str(e))
  for arg in argv:
    if missing and arg.startswith("--config."):
      key = arg[2:].split("=", 1)[0]
      if missing.group(0) in key.split(".")[1:]:
        hint = re.search(r"Did you mean [^?]*\?", str(e))
        _exit_bad_input("bad config", f"{key}: unknown key (from {arg})"
                        + (f"; {hint.group(0)}" if hint else ""))
  raise e


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with flags that do not parse reported as bad input (exit 2)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError) as e:
    _bad_flag(e, argv)


def cli(c, workdir: str) -> int:
  """Runs `c` as the command line does; returns the exit status. Known bad input (`BAD_INPUT`)
  is one paragraph on stderr and `EXIT_BAD_INPUT`; anything else propagates (traceback)."""
  from perl_jax import checkpoint
  from perl_jax.trainers.common import NonFiniteTrainingError

  try:
    summary = run(c, workdir)
  except BAD_INPUT as e:
    print(error_message(e), file=sys.stderr)
    return EXIT_BAD_INPUT
  except checkpoint.CheckpointMismatchError as e:
    print(f"error: bad checkpoint: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except checkpoint.Preempted as e:  # saved; the same command resumes
    print(str(e), file=sys.stderr)
    return checkpoint.PREEMPTED_EXIT_CODE
  except NonFiniteTrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_DIVERGED
  if distributed.is_primary():
    print(json.dumps(summary, indent=2, default=str))
  return 0


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=EXIT_BAD_INPUT)
  try:
    c = _CONFIG.value
    if c is not None:
      c.task  # config_flags reports a --config file that failed to load on first use
  except (flags.Error, OSError, AttributeError, KeyError) as e:
    _bad_flag(e, sys.argv)
  if c is None:
    raise app.UsageError("--config=configs/<name>.py is required", exitcode=EXIT_BAD_INPUT)
  name = Path(flags.FLAGS["config"].config_filename).stem
  workdir = _WORKDIR.value or c.workdir or os.path.join("workdir", name)
  try:  # before anything touches a device
    plan = distributed.initialize({"coordinator_address": _COORDINATOR.value,
                                   "num_processes": _NUM_PROCESSES.value,
                                   "process_id": _PROCESS_ID.value})
  except distributed.DistributedConfigError as e:
    _exit_bad_input("bad flag", str(e))
  if plan.multi_process:
    logging.info("jax.distributed: %s", plan.reason)
    if not distributed.is_primary():  # one copy of the logs, from process 0
      logging.set_verbosity(logging.WARNING)
  host.trim_after_compiles()  # compiler heap back to the OS after each compile (peak RSS)
  return cli(c, workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
