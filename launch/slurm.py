#!/usr/bin/env python3
"""Train on several GPU nodes under SLURM: write an sbatch script and submit it.

    python launch/slurm.py --nodes=4 --gpus_per_node=8 --config=configs/ppo_lora.py \\
        --workdir=/shared/runs/ppo --partition=gpu --time=24:00:00 \\
        --setup='source ~/venvs/perl_jax/bin/activate' [--dry_run] -- --config.seed=1

The script runs ``srun`` with one task per node; each task is one ``python -m
perl_jax.train`` process that drives all GPUs of its node (JAX is single-controller per
host). JAX recognises the SLURM step from its environment and finds process 0's node and a
port by itself (`perl_jax.distributed`); the script only exports ``JAX_LOCAL_DEVICE_IDS``
so that each process sees every GPU of its node (JAX's SLURM default is one GPU per task).

The config file and the workdir must be on a file system every node mounts (both are made
absolute here). ``--dry_run`` prints the script (as the here-document that writes it) and the
sbatch command, and writes nothing; otherwise the script is written to ``--script`` and
submitted (``--no_submit``: only written).

Time limit and preemption: SLURM sends SIGTERM ``--signal_s`` seconds before the time limit
(``#SBATCH --signal``); the trainer saves and exits 75, and the script then requeues the job
(``scontrol requeue``), which resumes from the workdir. A task that fails for another reason
makes srun stop the others (``--kill-on-bad-exit``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script
import _common  # noqa: E402
from _common import LaunchError, Runner  # noqa: E402

PROG = "launch/slurm.py"
PREEMPTED_EXIT_CODE = 75  # perl_jax.checkpoint.PREEMPTED_EXIT_CODE (not imported: no JAX here)


def sbatch_script(args, trainer_args: list[str]) -> str:
  """The batch script for `args` (see the module docstring)."""
  if args.nodes < 1 or args.gpus_per_node < 1:
    raise LaunchError(f"--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} must "
                      "be at least 1")
  if not os.path.isfile(args.config):
    raise LaunchError(f"--config={args.config}: no such file")
  if "://" in args.workdir:
    raise LaunchError(f"--workdir={args.workdir!r}: must be a directory on a file system all "
                      "nodes mount, not a URL")
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.job_name):
    raise LaunchError(f"--job_name={args.job_name!r}: letters, digits, _ . - only")
  options = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={args.gpus_per_node}", f"--cpus-per-task={args.cpus_per_task}",
             f"--output={args.output}", f"--signal=TERM@{args.signal_s}", "--requeue"]
  for name in ("partition", "time", "account"):
    if getattr(args, name):
      options.append(f"--{name}={getattr(args, name)}")
  train = shlex.join(
      [args.python, "-m", "perl_jax.train", f"--config={os.path.abspath(args.config)}",
       f"--workdir={os.path.abspath(args.workdir)}"] + trainer_args)
  device_ids = ",".join(str(i) for i in range(args.gpus_per_node))
  lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options), "", "set -eo pipefail",
           *args.setup, "",
           "# One process per node drives all of the node's GPUs (JAX's SLURM default is one",
           "# GPU per task). JAX finds the coordinator from the SLURM step itself.",
           f"export JAX_LOCAL_DEVICE_IDS={device_ids}",
           f"export XLA_PYTHON_CLIENT_MEM_FRACTION={args.mem_fraction:g}", "",
           f"srun --nodes={args.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {train} "
           "&& status=0 || status=$?",
           f"if [ \"$status\" -eq {PREEMPTED_EXIT_CODE} ]; then  # saved on SIGTERM: go again",
           "  scontrol requeue \"$SLURM_JOB_ID\"",
           "fi",
           "exit \"$status\"", ""]
  return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Arguments after -- are passed to perl_jax.train.")
  p.add_argument("--nodes", type=int, required=True, help="number of nodes")
  p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
  p.add_argument("--config", required=True, help="configs/*.py on a shared file system")
  p.add_argument("--workdir", required=True, help="output directory on a shared file system")
  p.add_argument("--partition", help="#SBATCH --partition")
  p.add_argument("--time", help="#SBATCH --time, e.g. 24:00:00")
  p.add_argument("--account", help="#SBATCH --account")
  p.add_argument("--cpus_per_task", type=int, default=16, help="CPUs per node's task")
  p.add_argument("--job_name", default="perl_jax")
  p.add_argument("--output", default="perl_jax-%j.out", help="#SBATCH --output")
  p.add_argument("--signal_s", type=int, default=300,
                 help="seconds before the time limit that SIGTERM arrives (default 300)")
  p.add_argument("--mem_fraction", type=float, default=0.9,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)")
  p.add_argument("--setup", action="append", default=[],
                 help="a shell line run before srun, e.g. activating a venv; srun passes "
                      "the environment on to every node (repeatable)")
  p.add_argument("--python", default="python", help="python on the nodes (default: python)")
  p.add_argument("--script", default="perl_jax.sbatch", help="where to write the script")
  p.add_argument("--no_submit", action="store_true",
                 help="write the script but do not run sbatch")
  p.add_argument("--dry_run", action="store_true",
                 help="print the script and the sbatch command; write and run nothing")
  return p


def main(argv: list[str] | None = None) -> int:
  own, trainer_args = _common.split_trainer_args(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(own)
  r = Runner(args.dry_run)

  def body():
    script = sbatch_script(args, trainer_args)
    r.write_file(args.script, script)
    if not args.no_submit:
      r.run(["sbatch", args.script])

  return _common.main_wrapper(PROG, body)


if __name__ == "__main__":
  sys.exit(main())
