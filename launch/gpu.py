#!/usr/bin/env python3
"""Train on one machine with several GPUs.

    python launch/gpu.py --config=configs/ppo_lora.py --workdir=/data/runs/ppo \\
        [--gpus=0,1,2,3] [--mem_fraction=0.9] [--dry_run] -- --config.total_iterations=2000

JAX drives every GPU of a host from one Python process (single controller per host), so a
single-node run is ONE process that sees all its GPUs, not one process per GPU:
``python -m perl_jax.train`` spreads its arrays over the local devices through its mesh. This
script sets the environment for that process and runs it:

* ``CUDA_VISIBLE_DEVICES`` only with ``--gpus`` (default: every GPU of the machine);
* ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (``--mem_fraction``, default 0.9): the share of each
  GPU's memory JAX reserves up front (JAX's own default is 0.75);
* ``XLA_FLAGS`` only with ``--xla_flags``.

The exit status is the trainer's: 75 means it was stopped by SIGTERM after saving, and the
same command resumes it. For several nodes use ``launch/slurm.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run as a script
import _common  # noqa: E402
from _common import LaunchError, Runner  # noqa: E402

PROG = "launch/gpu.py"


def environment(args) -> dict[str, str]:
  env = {}
  if args.gpus is not None:
    if not re.fullmatch(r"\d+(,\d+)*", args.gpus):
      raise LaunchError(f"--gpus={args.gpus!r}: expected GPU numbers such as 0,1,2,3")
    env["CUDA_VISIBLE_DEVICES"] = args.gpus
  if not 0 < args.mem_fraction <= 1:
    raise LaunchError(f"--mem_fraction={args.mem_fraction}: must be in (0, 1]")
  env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{args.mem_fraction:g}"
  if args.xla_flags:
    env["XLA_FLAGS"] = args.xla_flags
  return env


def train_command(python: str, config: str, workdir: str | None,
                  trainer_args: list[str]) -> list[str]:
  if not os.path.isfile(config):
    raise LaunchError(f"--config={config}: no such file")
  if workdir is not None and "://" in workdir:
    raise LaunchError(f"--workdir={workdir!r}: must be a path on this machine (or a mounted "
                      "bucket), not a URL")
  return ([python, "-m", "perl_jax.train", f"--config={config}"]
          + ([f"--workdir={workdir}"] if workdir else []) + trainer_args)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="Arguments after -- are passed to perl_jax.train.")
  p.add_argument("--config", required=True, help="configs/*.py file")
  p.add_argument("--workdir", help="output directory (default: the trainer's)")
  p.add_argument("--gpus", help="GPUs to use, e.g. 0,1,2,3 (default: all)")
  p.add_argument("--mem_fraction", type=float, default=0.9,
                 help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)")
  p.add_argument("--xla_flags", help="XLA_FLAGS for the run")
  p.add_argument("--python", default=sys.executable, help="python to run (default: this one)")
  p.add_argument("--dry_run", action="store_true",
                 help="print the command, shell-quoted, and run nothing")
  return p


def main(argv: list[str] | None = None) -> int:
  own, trainer_args = _common.split_trainer_args(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(own)
  r = Runner(args.dry_run)

  def body():
    cmd = train_command(args.python, args.config, args.workdir, trainer_args)
    r.run(cmd, env=environment(args))

  return _common.main_wrapper(PROG, body)


if __name__ == "__main__":
  sys.exit(main())
