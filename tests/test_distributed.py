"""Multi-host start-up (perl_jax/distributed.py) and the one-writer rule.

`distributed.plan` is checked on fake environments (SLURM, Cloud TPU, Open MPI, explicit
flags and variables, bad and partial flags). Real `jax.distributed.initialize` calls run in
fresh processes on CPU: two processes that find each other, a survivor that must fail within
the heartbeat timeout when its peer dies, and a process whose peer never starts.
"""

import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import pytest

from perl_jax import config, distributed, metrics, train
from perl_jax.distributed import DistributedConfigError

ROOT = Path(__file__).resolve().parents[1]
SLURM_2 = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
TIMEOUTS = {"initialization_timeout": distributed.INITIALIZATION_TIMEOUT_S,
            "heartbeat_timeout_seconds": distributed.HEARTBEAT_TIMEOUT_S,
            "shutdown_timeout_seconds": distributed.SHUTDOWN_TIMEOUT_S}
EXPLICIT = {"coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3}


# --- plan: which case holds ------------------------------------------------------------------


def test_nothing_set_is_single_process():
  p = distributed.plan({"HOME": "/root", "SLURM_JOB_ID": "7"})  # salloc shell: no step vars
  assert p.kwargs is None and not p.multi_process


def test_slurm_is_left_to_jax_with_timeouts():
  p = distributed.plan(SLURM_2)
  assert p.kwargs == TIMEOUTS  # JAX fills address, count and id from the SLURM step
  assert "slurm" in p.reason


def test_slurm_step_with_one_task_is_single_process():
  assert distributed.plan({**SLURM_2, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).kwargs is None


def test_cloud_tpu_and_openmpi_are_left_to_jax():
  assert distributed.plan({}, on_cloud_tpu=True).kwargs == TIMEOUTS
  p = distributed.plan({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"})
  assert p.kwargs == TIMEOUTS and "openmpi" in p.reason


def test_explicit_flags_switch_detection_off():
  p = distributed.plan(SLURM_2, EXPLICIT)  # flags win over the detected cluster
  assert p.kwargs == {**EXPLICIT, **TIMEOUTS, "cluster_detection_method": "deactivate"}


def test_explicit_environment_variables_and_flags_combine():
  env = {"JAX_COORDINATOR_ADDRESS": "host-0:1234", "JAX_NUM_PROCESSES": "2"}
  p = distributed.plan(env, {"process_id": 1, "num_processes": 2})
  assert p.kwargs == {"coordinator_address": "host-0:1234", "num_processes": 2,
                      "process_id": 1, **TIMEOUTS, "cluster_detection_method": "deactivate"}


def test_partial_flags_in_a_detected_cluster_fill_the_rest():
  p = distributed.plan(SLURM_2, {"coordinator_address": "gpu001:5000"})
  assert p.kwargs == {"coordinator_address": "gpu001:5000", **TIMEOUTS}


def test_plan_arguments_exist_in_this_jax():
  signature = inspect.signature(jax.distributed.initialize)
  for env, flags in [(SLURM_2, None), ({}, EXPLICIT)]:
    signature.bind(**distributed.plan(env, flags).kwargs)  # raises on an unknown name


@pytest.mark.parametrize("env,flags,message", [
    ({}, {"coordinator_address": "h:1"},
     "--coordinator_address given but --num_processes (or JAX_NUM_PROCESSES) and --process_id "
     "(or JAX_PROCESS_ID) missing"),
    ({"JAX_NUM_PROCESSES": "2"}, {"process_id": 0},
     "--num_processes, --process_id given but --coordinator_address (or JAX_COORDINATOR_ADDRESS)"
     " missing"),
    ({"JAX_PROCESS_ID": "0"}, {**EXPLICIT}, "--process_id=3 contradicts the environment "
     "variable JAX_PROCESS_ID=0"),
    ({}, {**EXPLICIT, "coordinator_address": "10.0.0.1"}, "--coordinator_address='10.0.0.1': "
     "expected HOST:PORT"),
    ({}, {**EXPLICIT, "coordinator_address": "h:99999"}, "expected HOST:PORT"),
    ({}, {**EXPLICIT, "process_id": 4}, "--process_id=4 is out of range for --num_processes=4"),
    ({}, {**EXPLICIT, "num_processes": 0}, "--num_processes=0: must be at least 1"),
    ({}, {**EXPLICIT, "process_id": -1}, "--process_id=-1: must be >= 0"),
    ({"JAX_NUM_PROCESSES": "two"}, {"process_id": 0}, "JAX_NUM_PROCESSES='two': not an integer"),
])
def test_bad_or_partial_settings_name_the_flag(env, flags, message):
  with pytest.raises(DistributedConfigError) as e:
    distributed.plan(env, flags)
  assert message in str(e.value)


def test_train_reports_bad_distributed_flags_and_url_workdirs(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  runs = {"flags": ["--num_processes=2", f"--workdir={tmp_path / 'a'}"],
          "url": ["--workdir=gs://bucket/run"]}
  config = f"--config={ROOT}/configs/sft.py"
  procs = {k: subprocess.Popen([sys.executable, "-m", "perl_jax.train", config, *args],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for k, args in runs.items()}
  out = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
  (_, err), rc = out["flags"]
  assert rc == train.EXIT_BAD_INPUT and "perl_jax.train: bad flag: --num_processes given but" \
      in err, err
  (_, err), rc = out["url"]
  assert rc == train.EXIT_BAD_INPUT and "bad config: --workdir / config.workdir 'gs://bucket/" \
      "run': a URL" in err, err
  assert not (tmp_path / "gs:").exists()  # no local directory named after the URL


# --- one writer ------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_metrics_writer_writes_only_on_process_zero(tmp_path, capsys, monkeypatch, index):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  with metrics.MetricsWriter(tmp_path / "run", total_steps=3) as w:  # default: process 0 writes
    w.write(1, {"loss": 1.0})
    w.write_samples(1, [{"prompt": "p", "response": "r"}])
  run = tmp_path / "run"
  err = capsys.readouterr().err
  if index == 0:
    written = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert written[:2] == ["metrics.jsonl", "samples.jsonl"] and len(written) == 3
    assert written[2].startswith("tb/events.out.tfevents.")
    assert "loss=" in err  # the progress bar
  else:
    assert not run.exists() and err == ""


@pytest.mark.parametrize("primary", [True, False])
def test_summary_is_written_only_by_process_zero(tmp_path, monkeypatch, primary):
  from perl_jax.trainers import sft

  monkeypatch.setattr(distributed, "is_primary", lambda: primary)
  monkeypatch.setattr(train, "check_inputs", lambda c, workdir: {"data.train": 0})
  monkeypatch.setattr(sft, "train", lambda c, workdir, train_prompts_cut: {"loss": 0.5})
  assert train.run(config.sft_config(), str(tmp_path)) == {"loss": 0.5}
  summary = tmp_path / "summary.json"
  assert summary.exists() == primary
  if primary:
    assert json.loads(summary.read_text()) == {"loss": 0.5}
  assert not list(tmp_path.glob(".write_test*"))  # each process removed its probe


# --- real jax.distributed.initialize calls, in fresh processes -------------------------------

_WORKER = textwrap.dedent("""
    import os, sys, time
    from perl_jax import distributed
    distributed.HEARTBEAT_TIMEOUT_S = 2
    distributed.INITIALIZATION_TIMEOUT_S = int(os.environ["INIT_TIMEOUT_S"])
    plan = distributed.initialize()
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils
    print(f"joined {jax.process_index()} of {jax.process_count()}", flush=True)
    if os.environ["ROLE"] == "dies":
      os._exit(9)
    start = time.monotonic()
    multihost_utils.process_allgather(jnp.ones(1))  # blocks: the peer is gone
    print("allgather returned", flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_a_dead_or_missing_peer_fails_the_run_in_bounded_time():
  """Process 1 dies after joining: process 0 must abort within the heartbeat timeout instead
  of waiting forever in its collective. A process whose peer never starts gives up after the
  initialisation timeout."""
  base = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_NUM_PROCESSES="2")
  pair, lone = _free_port(), _free_port()
  runs = {"survivor": {"JAX_PROCESS_ID": "0", "ROLE": "survives", "PORT": pair,
                       "INIT_TIMEOUT_S": 30},
          "dies": {"JAX_PROCESS_ID": "1", "ROLE": "dies", "PORT": pair, "INIT_TIMEOUT_S": 30},
          "lone": {"JAX_PROCESS_ID": "0", "ROLE": "survives", "PORT": lone,
                   "INIT_TIMEOUT_S": 1}}
  start = time.monotonic()
  procs = {name: subprocess.Popen(
      [sys.executable, "-c", _WORKER], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**base, **{k: str(v) for k, v in r.items()},
                      "JAX_COORDINATOR_ADDRESS": f"localhost:{r['PORT']}"})
      for name, r in runs.items()}
  out = {name: p.communicate(timeout=90) for name, p in procs.items()}
  elapsed = time.monotonic() - start
  assert "joined 1 of 2" in out["dies"][0] and procs["dies"].returncode == 9
  stdout, stderr = out["survivor"]
  assert "joined 0 of 2" in stdout and "allgather returned" not in stdout
  assert procs["survivor"].returncode != 0
  assert "stopped sending heartbeats" in stderr, stderr[-2000:]
  stdout, stderr = out["lone"]
  assert "joined" not in stdout and procs["lone"].returncode != 0, stderr[-2000:]
  assert elapsed < 60  # JAX's defaults (300 s to join, 100 s heartbeat) are not in play
