"""The trainer entry point.

    python -m perl_jax.train --config=configs/ppo_lora.py [--config.key=value ...] [--workdir=DIR]

`config.task` picks the trainer (sft, reward, ppo). A PPO config with no `policy.init` /
`reward.init` runs the built-in synthetic task end to end: SFT policy, then a LoRA reward
model, then PPO against it; finished stages are cached in the workdir, so a second run goes
straight to PPO. Every run writes WORKDIR/summary.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (overrides config.workdir).")


def run(c, workdir: str) -> dict:
  """Validates `c`, runs its task in `workdir`, writes and returns the summary."""
  from perl_jax import config

  c = c.copy_and_resolve_references()  # never mutate the caller's config
  config.validate(c)
  _check_writable(workdir)
  if c.task == "sft":
    from perl_jax.trainers import sft
    summary = sft.train(c, workdir)
  elif c.task == "reward":
    from perl_jax.trainers import reward
    summary = reward.train(c, workdir)
  else:
    summary = _ppo_with_prerequisites(c, workdir)
  Path(workdir, "summary.json").write_text(json.dumps(summary, indent=2, default=str))
  return summary


def _ppo_with_prerequisites(c, workdir: str) -> dict:
  """PPO; with missing policy/reward/prompts, first builds them from the synthetic task."""
  from perl_jax import config
  from perl_jax.data import synthetic
  from perl_jax.trainers import ppo

  builtin = not (c.policy.init and c.reward.init and c.data.prompts)
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
      sc.model = c.model
      sc.total_iterations = c.synthetic.sft_steps
      sc.data.train, sc.data.eval = data["sft_train"], data["sft_eval"]
      sc.data.max_prompt_len, sc.data.max_response_len = (c.data.max_prompt_len,
                                                          c.rollout.max_new_tokens)
      c.policy.init = _cached_stage(sc, os.path.join(workdir, "sft"), "hf_dir")
    if not c.reward.init:
      rc = config.reward_config()
      rc.seed, rc.dtype, rc.progress = c.seed, c.dtype, c.progress
      rc.policy.init = c.policy.init
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
  summary = ppo.train(c, workdir, gold_fn=gold_fn)
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
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = Path(workdir, ".write_test")
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"--workdir {workdir!r} is not writable: {e}") from e


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  c = _CONFIG.value
  if c is None:
    raise app.UsageError("--config=configs/<name>.py is required")
  name = Path(flags.FLAGS["config"].config_filename).stem
  workdir = _WORKDIR.value or c.workdir or os.path.join("workdir", name)
  try:
    summary = run(c, workdir)
  except (ValueError, FileNotFoundError) as e:  # bad input: a message naming it, not a trace
    sys.exit(f"error: {e}")
  print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
  app.run(main)
