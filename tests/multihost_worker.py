"""Runs a small PPO job as one process of a multi-host run, for tests/test_multihost.py.

    python tests/multihost_worker.py OVERRIDES_JSON WORKDIR [--exit-after-checkpoint=N]

Joins the run the environment describes (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID; none set: a single-process run), with short start-up and heartbeat timeouts so
a lost peer ends the test in seconds, then runs `train.cli` as the command line does.
--exit-after-checkpoint=N: once checkpoint N is completely written (every process), the process
exits at once with status 9 (os._exit: no cleanup, no final save), as a killed job would.
"""

import json
import os
import sys


def main() -> None:
  overrides, workdir, *options = sys.argv[1:]
  opts = dict(o.lstrip("-").split("=") for o in options)
  from perl_jax import checkpoint, config, distributed, train

  distributed.INITIALIZATION_TIMEOUT_S, distributed.HEARTBEAT_TIMEOUT_S = 60, 10
  distributed.initialize()
  exit_after = int(opts.get("exit-after-checkpoint", -1))
  save = checkpoint.Checkpointer.save

  def save_then_exit(self, step, state, meta):
    save(self, step, state, meta)
    if step == exit_after:
      from jax.experimental import multihost_utils
      self.wait()
      multihost_utils.sync_global_devices("checkpoint written")  # every process's part is
      os._exit(9)

  checkpoint.Checkpointer.save = save_then_exit
  c = config.ppo_config()
  for key, value in json.loads(open(overrides).read()).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  sys.exit(train.cli(c, workdir))


if __name__ == "__main__":
  main()
