"""Runs a small PPO job in its own process for tests/test_checkpoint.py; exits as the CLI does.

    python tests/resume_worker.py OVERRIDES_JSON WORKDIR [--kill-at-rollout=N]
                                  [--sigterm-after-iteration=N]

--kill-at-rollout=N: SIGKILL this process at the start of the N-th call of `ppo.rollout`
(evaluations sample too), i.e. somewhere in the middle of an iteration, with no chance to save.
--sigterm-after-iteration=N: send this process SIGTERM while iteration N runs (as Cloud TPU
does on preemption); the trainer must finish the iteration, save and exit with code 75.
"""

import json
import os
import signal
import sys


def main() -> None:
  overrides, workdir, *options = sys.argv[1:]
  opts = dict(o.lstrip("-").split("=") for o in options)
  from perl_jax import config, train
  from perl_jax.trainers import ppo

  calls = {"rollout": 0, "iteration": 0}
  rollout = ppo.rollout

  def counting_rollout(*args, **kwargs):
    calls["rollout"] += 1
    if calls["rollout"] == int(opts.get("kill-at-rollout", 0)):
      os.kill(os.getpid(), signal.SIGKILL)
    return rollout(*args, **kwargs)

  ppo.rollout = counting_rollout
  rollout_arrays = ppo.rollout_arrays

  def signalling_rollout_arrays(*args, **kwargs):  # called once per training iteration
    if calls["iteration"] == int(opts.get("sigterm-after-iteration", -1)):
      os.kill(os.getpid(), signal.SIGTERM)
    calls["iteration"] += 1
    return rollout_arrays(*args, **kwargs)

  ppo.rollout_arrays = signalling_rollout_arrays
  c = config.ppo_config()
  for key, value in json.loads(open(overrides).read()).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  sys.exit(train.cli(c, workdir))  # the command line's own exit statuses (75: preempted)


if __name__ == "__main__":
  main()
