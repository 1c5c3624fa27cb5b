"""The launch scripts (launch/*.py), run as a user runs them, in fresh processes.

Dry runs are checked command by command (the gcloud verbs and flags, ``--worker=all``, the
trainer's arguments inside the ssh command, the sbatch script) with PATH pointing at an empty
directory, so a dry run that tried to execute anything would fail. Real runs use fake
``gcloud`` / ``sbatch`` / ``srun`` / trainer programs that record their arguments, which shows
that a real run executes exactly what the dry run printed, and the generated sbatch script is
executed with a fake srun to check its requeue-on-preemption logic.
"""

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GIT = "git+https://github.com/example/perl_jax@v0.1.0"


@pytest.fixture
def env(tmp_path):
  """Runs launch/<script> with PATH = tmp/bin (empty unless a test adds fakes)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  config = tmp_path / "ppo_lora.py"
  config.write_text("from perl_jax import config\n\n\n"
                    "def get_config():\n  return config.ppo_config()\n")

  class Env:
    tmp, bin, log = tmp_path, bin_dir, tmp_path / "calls.jsonl"
    config_path = str(config)

    def launch(self, script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
      return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args],
                            capture_output=True, text=True, cwd=cwd or tmp_path,
                            env={"PATH": str(bin_dir), "HOME": str(tmp_path)})

    def fake(self, name: str, body: str = "") -> None:
      """A program `name` on PATH that appends its argv (and a few env vars) to `log`."""
      path = bin_dir / name
      path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      f"with open({str(self.log)!r}, 'a') as f:\n"
                      "  argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]\n"
                      "  f.write(json.dumps(argv) + '\\n')\n"
                      + body)
      path.chmod(path.stat().st_mode | stat.S_IEXEC)

    def calls(self) -> list[list[str]]:
      return ([json.loads(line) for line in self.log.read_text().splitlines()]
              if self.log.exists() else [])

  return Env()


def commands(stdout: str) -> list[list[str]]:
  """The commands a dry run printed (comment lines skipped)."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def flag(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def ok(result: subprocess.CompletedProcess) -> str:
  assert result.returncode == 0, result.stderr
  return result.stdout


def up_args(env, *extra: str) -> list[str]:
  return ["up", "--name=rl", "--zone=us-central2-b", "--accelerator_type=v4-32",
          f"--package={GIT}", f"--config={env.config_path}", "--workdir=gs://my-bucket/runs/a",
          *extra]


# --- Cloud TPU -------------------------------------------------------------------------------


def test_tpu_up_dry_run(env):
  out = ok(env.launch("tpu.py", *up_args(env, "--dry_run", "--project=p1"), "--",
                      "--config.total_iterations=7", "--config.note=two words"))
  create, setup, copy, train, delete = commands(out)
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert create == tpu + ["create", "rl", "--zone=us-central2-b", "--project=p1",
                          "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
  assert setup[:6] == tpu + ["ssh", "rl"] and "--worker=all" in setup
  install = flag(setup, "command")
  assert "sudo apt-get install -y -q gcsfuse" in install
  assert shlex.split(install.rsplit("&&", 1)[1]) == [
      "python3", "-m", "pip", "install", "-U", f"perl-jax[tpu] @ {GIT}"]
  assert copy == tpu + ["scp", env.config_path, "rl:/tmp/ppo_lora.py", "--zone=us-central2-b",
                        "--project=p1", "--worker=all"]
  assert train[:6] == tpu + ["ssh", "rl"] and "--worker=all" in train
  remote = shlex.split(flag(train, "command"))
  i = remote.index("perl_jax.train")
  assert remote[i - 2:i + 5] == ["python3", "-m", "perl_jax.train", "--config=/tmp/ppo_lora.py",
                                 "--workdir=/gcs/my-bucket/runs/a",
                                 "--config.total_iterations=7", "--config.note=two words"]
  assert remote[i + 5:] == ["2>&1", "|", "tee", "-a", "~/perl_jax_train.log"]
  mount = remote[remote.index("gcsfuse"):]
  assert mount[:4] == ["gcsfuse", "--implicit-dirs", "--rename-dir-limit=1000000",
                       "--metadata-cache-ttl-secs=0"] and mount[4:6] == ["my-bucket",
                                                                        "/gcs/my-bucket;"]
  assert delete == tpu + ["delete", "rl", "--zone=us-central2-b", "--project=p1", "--quiet"]


@pytest.mark.parametrize("extra,verb,flags", [
    ([], ["tpu-vm", "create"], ["--version=v2-alpha-tpuv5-lite"]),
    (["--spot"], ["tpu-vm", "create"], ["--version=v2-alpha-tpuv5-lite", "--spot"]),
    (["--queued_resource"], ["queued-resources", "create"],
     ["--node-id=rl", "--runtime-version=v2-alpha-tpuv5-lite"]),
    (["--queued_resource", "--spot"], ["queued-resources", "create"],
     ["--node-id=rl", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]),
    (["--queued_resource", "--reserved", "--runtime_version=v2-alpha-tpuv5-lite-x"],
     ["queued-resources", "create"], ["--node-id=rl", "--runtime-version=v2-alpha-tpuv5-lite-x",
                                      "--reserved"]),
    (["--queued_resource", "--best_effort"], ["queued-resources", "create"],
     ["--node-id=rl", "--runtime-version=v2-alpha-tpuv5-lite", "--best-effort"]),
])
def test_tpu_create_variants(env, extra, verb, flags):
  out = ok(env.launch("tpu.py", "create", "--name=rl", "--zone=z1",
                      "--accelerator_type=v5litepod-16", "--dry_run", *extra))
  cmds = commands(out)
  alpha = ["alpha"] if "--best_effort" in extra else []  # best-effort is alpha-only
  assert cmds[0] == (["gcloud", *alpha, "compute", "tpus", *verb, "rl", "--zone=z1"]
                     + [f for f in flags if f.startswith("--node-id")]
                     + ["--accelerator-type=v5litepod-16"]
                     + [f for f in flags if not f.startswith("--node-id")])
  if "--queued_resource" in extra:  # then it waits until the request is granted
    assert cmds[1:] == [["gcloud", "compute", "tpus", "queued-resources", "describe", "rl",
                         "--zone=z1", "--format=value(state.state)"]]
    assert "until the queued resource is ACTIVE" in out
  else:
    assert len(cmds) == 1


def test_tpu_other_steps(env):
  wheel = env.tmp / "perl_jax-0.1.0-py3-none-any.whl"
  wheel.write_bytes(b"")
  base = ["--name=rl", "--zone=z1", "--dry_run"]
  copy, install = commands(ok(env.launch("tpu.py", "setup", *base, f"--package={wheel}")))
  assert copy[4:7] == ["scp", str(wheel), "rl:/tmp/"] and "--worker=all" in copy
  assert flag(install, "command").endswith(
      "python3 -m pip install -U '/tmp/perl_jax-0.1.0-py3-none-any.whl[tpu]'")
  [install] = commands(ok(env.launch("tpu.py", "setup", *base, "--package=perl-jax==0.1.0")))
  assert flag(install, "command").endswith("pip install -U 'perl-jax[tpu]==0.1.0'")
  [logs] = commands(ok(env.launch("tpu.py", "logs", *base)))
  assert "--worker=0" in logs and flag(logs, "command") == "tail -n +1 -F ~/perl_jax_train.log"
  [delete] = commands(ok(env.launch("tpu.py", "delete", *base, "--queued_resource")))
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "rl",
                    "--zone=z1", "--force", "--quiet"]
  [_, train] = commands(ok(env.launch("tpu.py", "run", *base, f"--config={env.config_path}",
                                      "--workdir=gs://b-1/x/", "--detach")))
  remote = flag(train, "command")
  assert "--workdir=/gcs/b-1/x " in remote and "setsid nohup" in remote
  assert remote.endswith(">> ~/perl_jax_train.log 2>&1 < /dev/null & }")


@pytest.mark.parametrize("args,message", [
    (["--workdir=/home/me/run"], "--workdir='/home/me/run': must be gs://BUCKET/PATH"),
    (["--workdir=gs://"], "must be gs://BUCKET/PATH"),
    (["--reserved"], "--reserved is a queued-resource option; add --queued_resource"),
    (["--queued_resource", "--spot", "--best_effort"], "--spot and --best_effort exclude"),
    (["--accelerator_type=tpu9-8"], "--accelerator_type=tpu9-8: no default TPU software "
     "version for it; pass --runtime_version"),
    (["--package=numpy"], "--package='numpy': expected a git URL"),
    (["--package=missing.whl"], "--package=missing.whl: no such wheel file"),
    (["--config=nope.py"], "--config=nope.py: no such file"),
])
def test_tpu_bad_arguments_fail_before_any_command(env, args, message):
  result = env.launch("tpu.py", *up_args(env, "--dry_run"), *args)  # later flags win
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert result.stdout == ""  # nothing printed, so nothing would have been created


def test_tpu_real_run_executes_what_the_dry_run_prints(env):
  args = up_args(env, "--queued_resource", "--spot") + ["--", "--config.seed=3"]
  env.fake("gcloud", "if 'describe' in sys.argv: print('ACTIVE')\n")
  dry = commands(ok(env.launch("tpu.py", *args[:1], "--dry_run", *args[1:])))
  assert env.calls() == []  # gcloud is on PATH, and the dry run did not call it
  ok(env.launch("tpu.py", *args))
  assert env.calls() == dry


def test_tpu_up_deletes_the_slice_when_the_run_fails(env):
  env.fake("gcloud", "sys.exit(75 if any('perl_jax.train' in a for a in sys.argv) else 0)\n")
  result = env.launch("tpu.py", *up_args(env))
  assert result.returncode == 75
  assert "re-run the same command to resume from gs://my-bucket/runs/a" in result.stderr
  assert [c[4] for c in env.calls()] == ["create", "ssh", "scp", "ssh", "delete"]


def test_tpu_real_run_needs_gcloud(env):
  result = env.launch("tpu.py", *up_args(env))
  assert result.returncode == 2 and "gcloud not found on PATH" in result.stderr


# --- one GPU node ----------------------------------------------------------------------------


def test_gpu_dry_run_and_real_run(env):
  fake_python = env.bin / "python-fake"
  args = [f"--config={env.config_path}", "--workdir=/data/run", "--gpus=0,1,2,3",
          f"--python={fake_python}", "--", "--config.seed=1"]
  out = ok(env.launch("gpu.py", "--dry_run", *args))
  assert out.splitlines() == [
      f"CUDA_VISIBLE_DEVICES=0,1,2,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 {fake_python} -m "
      f"perl_jax.train --config={env.config_path} --workdir=/data/run --config.seed=1"]
  env.fake("python-fake", "print(os.environ['CUDA_VISIBLE_DEVICES'], "
           "os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']); sys.exit(75)\n")
  result = env.launch("gpu.py", *args)
  assert result.returncode == 75  # the trainer's status (preempted), passed on
  assert result.stdout == "0,1,2,3 0.9\n"
  assert env.calls() == [["python-fake", "-m", "perl_jax.train", f"--config={env.config_path}",
                          "--workdir=/data/run", "--config.seed=1"]]
  bad = env.launch("gpu.py", f"--config={env.config_path}", "--gpus=all", "--dry_run")
  assert bad.returncode == 2 and "--gpus='all': expected GPU numbers" in bad.stderr


# --- SLURM -----------------------------------------------------------------------------------


def _script(stdout: str) -> tuple[str, str, list[list[str]]]:
  """(path, contents) of the here-document a dry run prints, and the commands after it."""
  head, rest = stdout.split("\n", 1)
  assert head.startswith("cat > ") and head.endswith(" <<'PERL_JAX_EOF'"), head
  body, after = rest.split("PERL_JAX_EOF\n", 1)
  return shlex.split(head)[2], body, commands(after)


def test_slurm_script(env):
  args = ["--nodes=3", "--gpus_per_node=4", "--config=ppo_lora.py", "--workdir=runs/a",
          "--partition=gpu", "--time=01:00:00", "--setup=source venv/bin/activate",
          "--script=job.sbatch"]
  out = ok(env.launch("slurm.py", *args, "--dry_run", "--", "--config.seed=5"))
  path, script, after = _script(out)
  assert path == "job.sbatch" and after == [["sbatch", "job.sbatch"]]
  assert not (env.tmp / "job.sbatch").exists()  # a dry run writes nothing
  lines = script.splitlines()
  for option in ["--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=4", "--partition=gpu",
                 "--time=01:00:00", "--signal=TERM@300", "--requeue"]:
    assert f"#SBATCH {option}" in lines
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
  [srun] = [shlex.split(line) for line in lines if line.startswith("srun ")]
  assert srun == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python",
                  "-m", "perl_jax.train", f"--config={env.tmp}/ppo_lora.py",
                  f"--workdir={env.tmp}/runs/a", "--config.seed=5", "&&", "status=0", "||",
                  "status=$?"]
  srun_line = next(i for i, line in enumerate(lines) if line.startswith("srun "))
  assert lines.index("source venv/bin/activate") < srun_line  # the venv first

  # Submitting writes the script and calls sbatch with it.
  env.fake("sbatch")
  ok(env.launch("slurm.py", *args, "--", "--config.seed=5"))
  assert (env.tmp / "job.sbatch").read_text() == script
  assert env.calls() == [["sbatch", "job.sbatch"]]


@pytest.mark.parametrize("trainer_status,requeued", [(0, False), (75, True), (1, False)])
def test_slurm_script_requeues_after_preemption(env, trainer_status, requeued):
  ok(env.launch("slurm.py", "--nodes=2", f"--config={env.config_path}", "--workdir=w",
                "--script=job.sbatch", "--no_submit"))
  env.fake("srun", f"print(os.environ['JAX_LOCAL_DEVICE_IDS']); sys.exit({trainer_status})\n")
  env.fake("scontrol")
  result = subprocess.run(["/bin/bash", "job.sbatch"], cwd=env.tmp, capture_output=True,
                          text=True, env={"PATH": f"{env.bin}:/usr/bin:/bin",
                                          "SLURM_JOB_ID": "77"})
  assert result.returncode == trainer_status, result.stderr
  assert result.stdout == "0,1,2,3,4,5,6,7\n"
  calls = env.calls()
  assert calls[0][:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
  assert calls[1:] == ([["scontrol", "requeue", "77"]] if requeued else [])


def test_slurm_bad_arguments(env):
  base = ["--nodes=2", f"--config={env.config_path}", "--dry_run"]
  result = env.launch("slurm.py", *base, "--workdir=gs://b/w")
  assert result.returncode == 2 and "not a URL" in result.stderr
  result = env.launch("slurm.py", *base, "--workdir=w", "--gpus_per_node=0")
  assert result.returncode == 2 and "must be at least 1" in result.stderr


# --- every script ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["tpu.py", "--help"], ["tpu.py", "up", "--help"],
                                  ["gpu.py", "--help"], ["slurm.py", "--help"]])
def test_help(env, argv):
  out = ok(env.launch(*argv))
  assert out.startswith(f"usage: launch/{argv[0]}")
  assert "--dry_run" in out
