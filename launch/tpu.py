#!/usr/bin/env python3
"""Train on a Cloud TPU VM or pod slice: create it, install perl_jax, run, stream logs, delete.

    python launch/tpu.py up --name=rlhf --zone=us-central2-b --accelerator_type=v4-32 \\
        --package=git+https://github.com/ORG/perl_jax --config=configs/ppo_lora.py \\
        --workdir=gs://BUCKET/runs/ppo -- --config.total_iterations=2000

Subcommands (each has --help; add --dry_run to print the exact commands and run nothing):

* ``create``: ``gcloud compute tpus tpu-vm create`` (``--spot`` for a Spot slice), or with
  ``--queued_resource`` a queued-resource request (``--spot``, ``--reserved`` or
  ``--best_effort``), waiting until it is ACTIVE.
* ``setup``: on every worker (``--worker=all``): installs Cloud Storage FUSE and
  ``perl-jax[tpu]`` from ``--package`` (a git URL, a local wheel, which is copied to the
  workers first, or a requirement such as ``perl-jax==0.1.0``).
* ``run``: copies ``--config`` to every worker, mounts the workdir's bucket, and starts
  ``python3 -m perl_jax.train`` on all workers at once; the output streams here and is also
  appended to ``~/perl_jax_train.log`` on each worker (``--detach``: start and return).
  Arguments after ``--`` go to the trainer. JAX finds the other workers itself
  (`perl_jax.distributed`).
* ``logs``: follows ``~/perl_jax_train.log`` on one worker (default 0, the process that logs).
* ``delete``: deletes the slice (or the queued resource and its slice).
* ``up``: create, setup, run, then delete (also when the run fails; ``--keep`` keeps it).

The workdir must be ``gs://BUCKET/PATH``: the slice's disks go away with it (and with a
preemption), and every worker of a pod must see the same directory. perl_jax writes with
ordinary file I/O, so ``run`` mounts the bucket with gcsfuse at ``/gcs/BUCKET`` on every
worker and passes ``--workdir=/gcs/BUCKET/PATH`` to the trainer.

Preemption: a Spot slice that is reclaimed gets SIGTERM; the trainer saves and exits 75, or
the slice simply disappears. Either way ``up`` ends with a failure and deletes what is left;
re-running the same command makes a new slice and the trainer resumes from the workdir's last
checkpoint.
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

PROG = "launch/tpu.py"
MOUNT_ROOT = "/gcs"
LOG_FILE = "~/perl_jax_train.log"
# Default TPU software version by accelerator-type prefix (Cloud TPU docs); --runtime_version
# overrides.
RUNTIME_VERSIONS = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"),
                    ("v5litepod", "v2-alpha-tpuv5-lite"), ("v4", "tpu-ubuntu2204-base"),
                    ("v3", "tpu-ubuntu2204-base"), ("v2", "tpu-ubuntu2204-base"))
# gcsfuse for a directory several hosts write to: list "directories" that exist only as
# object prefixes, allow renaming directories (Orbax renames a finished checkpoint into
# place), and no metadata cache, so each host sees the others' files at once.
GCSFUSE_FLAGS = "--implicit-dirs --rename-dir-limit=1000000 --metadata-cache-ttl-secs=0"
INSTALL_GCSFUSE = (
    "if ! command -v gcsfuse >/dev/null; then "
    "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] "
    "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main\" "
    "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; "
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
    "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; "
    "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi")


# --- what each step runs -------------------------------------------------------------------


def _gcloud(args, *verb: str, alpha: bool = False) -> list[str]:
  cmd = ["gcloud"] + (["alpha"] if alpha else []) + ["compute", "tpus", *verb]
  return cmd + [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, worker: str, remote: str) -> list[str]:
  return _gcloud(args, "tpu-vm", "ssh", args.name) + [f"--worker={worker}",
                                                      f"--command={remote}"]


def runtime_version(args) -> str:
  if args.runtime_version:
    return args.runtime_version
  for prefix, version in RUNTIME_VERSIONS:
    if args.accelerator_type.startswith(prefix + "-"):
      return version
  raise LaunchError(f"--accelerator_type={args.accelerator_type}: no default TPU software "
                    "version for it; pass --runtime_version")


def create(r: Runner, args) -> None:
  kinds = [k for k in ("spot", "reserved", "best_effort") if getattr(args, k)]
  if len(kinds) > 1:
    raise LaunchError(f"--{' and --'.join(kinds)} exclude each other; choose one")
  if not args.queued_resource and kinds and kinds[0] != "spot":
    raise LaunchError(f"--{kinds[0]} is a queued-resource option; add --queued_resource")
  version = runtime_version(args)
  if not args.queued_resource:
    r.run(_gcloud(args, "tpu-vm", "create", args.name)
          + [f"--accelerator-type={args.accelerator_type}", f"--version={version}"]
          + (["--spot"] if args.spot else []))
    return
  # --best-effort is only in gcloud's alpha track.
  r.run(_gcloud(args, "queued-resources", "create", args.name, alpha=args.best_effort)
        + [f"--node-id={args.name}", f"--accelerator-type={args.accelerator_type}",
           f"--runtime-version={version}"]
        + [f"--{k.replace('_', '-')}" for k in kinds])
  r.wait_for(_gcloud(args, "queued-resources", "describe", args.name)
             + ["--format=value(state.state)"],
             lambda out: _qr_state(out, args.name) == "ACTIVE",
             "the queued resource is ACTIVE")


def _qr_state(out: str, name: str) -> str:
  state = out.strip()
  if state in ("FAILED", "SUSPENDED"):
    raise LaunchError(f"queued resource {name} is {state}; see `gcloud compute tpus "
                      f"queued-resources describe {name}`")
  return state


def pip_requirement(package: str) -> tuple[str | None, str]:
  """(a local wheel to copy to the workers or None, the pip requirement with the tpu extra)."""
  if package.endswith(".whl"):
    if not os.path.isfile(package):
      raise LaunchError(f"--package={package}: no such wheel file")
    return package, f"/tmp/{os.path.basename(package)}[tpu]"
  if "://" in package:  # git+https://..., https://.../x.tar.gz
    return None, f"perl-jax[tpu] @ {package}"
  m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)", package)
  if not m or m.group(1).lower().replace("_", "-") != "perl-jax":
    raise LaunchError(f"--package={package!r}: expected a git URL, a .whl file or a "
                      "perl-jax requirement such as perl-jax==0.1.0")
  return None, f"perl-jax[tpu]{m.group(3)}"


def setup(r: Runner, args) -> None:
  wheel, requirement = pip_requirement(args.package)
  if wheel:
    r.run(_gcloud(args, "tpu-vm", "scp", wheel, f"{args.name}:/tmp/") + ["--worker=all"])
  remote = f"{INSTALL_GCSFUSE} && {args.python} -m pip install -U {_q(requirement)}"
  r.run(_ssh(args, "all", remote))


def gcs_mount(workdir: str) -> tuple[str, str]:
  """(bucket, the path of gs://BUCKET/PATH under the gcsfuse mount)."""
  m = re.fullmatch(r"gs://([a-z0-9][a-z0-9._-]{1,221}[a-z0-9])(/.*)?", workdir)
  if not m:
    raise LaunchError(
        f"--workdir={workdir!r}: must be gs://BUCKET/PATH. A TPU slice's disks are deleted "
        "with it (and lost on preemption), and all workers of a pod must share one workdir")
  bucket, path = m.group(1), (m.group(2) or "").rstrip("/")
  return bucket, f"{MOUNT_ROOT}/{bucket}{path}"


def _check_config(path: str) -> None:
  if not os.path.isfile(path):
    raise LaunchError(f"--config={path}: no such file")


def run(r: Runner, args, trainer_args: list[str]) -> None:
  bucket, workdir = gcs_mount(args.workdir)
  _check_config(args.config)
  remote_config = f"/tmp/{os.path.basename(args.config)}"
  r.run(_gcloud(args, "tpu-vm", "scp", args.config, f"{args.name}:{remote_config}")
        + ["--worker=all"])
  mount_point = f"{MOUNT_ROOT}/{bucket}"
  mount = (f"mountpoint -q {mount_point} || {{ sudo mkdir -p {mount_point} && "
           f"sudo chown \"$USER\" {mount_point} && gcsfuse {GCSFUSE_FLAGS} {bucket} "
           f"{mount_point}; }}")
  train = " ".join([args.python, "-m", "perl_jax.train", _q(f"--config={remote_config}"),
                    _q(f"--workdir={workdir}")] + [_q(a) for a in trainer_args])
  if args.detach:
    remote = f"{mount} && {{ setsid nohup {train} >> {LOG_FILE} 2>&1 < /dev/null & }}"
  else:
    remote = f"set -o pipefail; {mount} && {train} 2>&1 | tee -a {LOG_FILE}"
  r.comment(f"the trainer sees --workdir={workdir} (gs://{bucket} mounted by gcsfuse)")
  r.run(_ssh(args, "all", remote))  # the workers' login shell is bash (Ubuntu images)


def logs(r: Runner, args) -> None:
  r.run(_ssh(args, args.worker, f"tail -n +1 -F {LOG_FILE}"))


def delete(r: Runner, args) -> None:
  if args.queued_resource:  # --force deletes the slice with the request
    r.run(_gcloud(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"])
  else:
    r.run(_gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"])


def up(r: Runner, args, trainer_args: list[str]) -> None:
  gcs_mount(args.workdir)  # bad arguments fail before anything is created
  pip_requirement(args.package)
  _check_config(args.config)
  runtime_version(args)
  create(r, args)
  try:
    setup(r, args)
    run(r, args, trainer_args)
  except BaseException:
    print(f"{PROG}: the run did not finish; re-run the same command to resume from "
          f"{args.workdir}", file=sys.stderr)
    raise
  finally:
    if not args.keep:
      delete(r, args)


_q = shlex.quote


# --- command line ---------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM / slice name")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", help="GCP project (default: gcloud's configured one)")
  common.add_argument("--dry_run", action="store_true",
                      help="print the commands, shell-quoted, and run nothing")
  qr = argparse.ArgumentParser(add_help=False)
  qr.add_argument("--queued_resource", action="store_true",
                  help="create/delete through a queued-resource request named --name")
  make = argparse.ArgumentParser(add_help=False)
  make.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16")
  make.add_argument("--runtime_version", help="TPU software version (default by TPU type)")
  make.add_argument("--spot", action="store_true", help="a Spot slice (preemptible)")
  make.add_argument("--reserved", action="store_true",
                    help="with --queued_resource: use the project's reservation")
  make.add_argument("--best_effort", action="store_true",
                    help="with --queued_resource: best-effort quota (gcloud alpha)")
  install = argparse.ArgumentParser(add_help=False)
  install.add_argument("--package", required=True,
                       help="git URL, local .whl, or a perl-jax requirement")
  python = argparse.ArgumentParser(add_help=False)
  python.add_argument("--python", default="python3", help="python on the workers")
  train = argparse.ArgumentParser(add_help=False)
  train.add_argument("--config", required=True, help="local configs/*.py, copied to workers")
  train.add_argument("--workdir", required=True, help="gs://BUCKET/PATH")

  p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("create", parents=[common, qr, make], help="create the slice")
  sub.add_parser("setup", parents=[common, install, python],
                 help="install perl-jax[tpu] and gcsfuse on every worker")
  after = "Arguments after -- are passed to perl_jax.train, e.g. -- --config.seed=1"
  run_p = sub.add_parser("run", parents=[common, train, python],
                         help="run perl_jax.train on every worker", description=after)
  run_p.add_argument("--detach", action="store_true",
                     help="start the run and return; follow it with `logs`")
  logs_p = sub.add_parser("logs", parents=[common], help="follow a worker's training log")
  logs_p.add_argument("--worker", default="0", help="worker number (0 is the one that logs)")
  sub.add_parser("delete", parents=[common, qr], help="delete the slice")
  up_p = sub.add_parser("up", parents=[common, qr, make, install, train, python],
                        help="create, setup, run, delete", description=after)
  up_p.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
  up_p.set_defaults(detach=False)
  return p


def main(argv: list[str] | None = None) -> int:
  own, trainer_args = _common.split_trainer_args(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(own)
  if trainer_args and args.command not in ("run", "up"):
    parser().error(f"arguments after -- are for the trainer; `{args.command}` takes none")
  r = Runner(args.dry_run)

  def body():
    step = {"create": lambda: create(r, args), "setup": lambda: setup(r, args),
            "run": lambda: run(r, args, trainer_args), "logs": lambda: logs(r, args),
            "delete": lambda: delete(r, args), "up": lambda: up(r, args, trainer_args)}
    step[args.command]()

  return _common.main_wrapper(PROG, body)


if __name__ == "__main__":
  sys.exit(main())
