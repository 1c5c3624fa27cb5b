"""Multi-host start-up: when and how to call `jax.distributed.initialize`.

Design
------
JAX is single-controller per host: every host runs one copy of ``python -m perl_jax.train``,
and before the first JAX call the copies must find each other through a coordinator (process
0). `plan` decides, from the environment and three optional flags, which of three cases holds;
it is a pure function of its inputs so that tests can hand it fake environments:

1. **Explicit.** ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or the
   environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
   ``JAX_PROCESS_ID``; a flag and a variable that disagree are an error, not a silent pick).
   With all three, JAX's cluster detection is switched off, so every local device stays
   visible to the one process on its host.
2. **A cluster JAX detects itself**, in JAX's order: Open MPI (``OMPI_MCA_orte_hnp_uri``),
   SLURM (the step variables ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
   ``SLURM_PROCID``, ``SLURM_LOCALID``: exactly the set ``jax._src.clusters.SlurmCluster``
   requires) and Cloud TPU VMs (found by ``import jax`` itself, which looks for TPU chips on
   the PCI bus; the worker list then comes from the TPU metadata server). Here
   `jax.distributed.initialize` is called without the missing values and JAX fills them in:
   this module does not re-implement node-list parsing or metadata queries. Any of the three
   flags that were given are passed on and win over detection. A SLURM step with a single task
   is run single-process: there is nobody to coordinate with.
3. **Single process.** Nothing is set: no initialize call, as before.

A partial set of flags with no cluster to fill the rest is an error naming the missing flags.

Bounded failure: the call passes ``initialization_timeout`` (how long a process waits for all
the others to connect; a worker that never starts makes the others fail after it rather than
hang) and ``heartbeat_timeout_seconds`` (a process that stops sending heartbeats for that long
is declared dead and the coordination service fails every other process, so a peer killed in
the middle of a collective does not leave the survivors blocked forever). See BUILD_NOTES.md
for the chosen values.

One task per node on SLURM: JAX's SLURM detection, when it runs, makes each process see only
the GPU numbered by its ``SLURM_LOCALID``, which is right for one task per GPU and wrong for
one task per node. ``launch/slurm.py`` therefore exports ``JAX_LOCAL_DEVICE_IDS`` (all GPUs of
the node), which `jax.distributed.initialize` reads before it detects anything.

After start-up, `is_primary` tells the one process (index 0) that writes logs, metrics,
TensorBoard events and summary.json. Checkpoints are different: Orbax writes them collectively,
every process its own shards, so every process must call the checkpointer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# Seconds. Generous enough for a pod slice whose workers are started one ssh at a time and
# import JAX at different speeds, short enough that a dead peer ends the run within minutes.
INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 60
SHUTDOWN_TIMEOUT_S = 120

ENV_VARS = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
            "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
# The variables jax._src.clusters.SlurmCluster.is_env_present checks (jax 0.10.2).
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
OMPI_VAR = "OMPI_MCA_orte_hnp_uri"


class DistributedConfigError(ValueError):
  """The multi-host flags or environment variables are incomplete or contradict each other."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do. `kwargs` is None for a single-process run, else the keyword
  arguments of `jax.distributed.initialize`; `reason` says in words why."""
  kwargs: dict[str, Any] | None
  reason: str

  @property
  def multi_process(self) -> bool:
    return self.kwargs is not None


def detect_cluster(env: Mapping[str, str], on_cloud_tpu: bool) -> str | None:
  """The cluster JAX will detect: "openmpi", "slurm", "cloud_tpu" (JAX's order), or None."""
  if OMPI_VAR in env:
    return "openmpi"
  if all(v in env for v in SLURM_VARS):
    return "slurm"
  if on_cloud_tpu:
    return "cloud_tpu"
  return None


def _explicit_values(env: Mapping[str, str], flags: Mapping[str, Any]) -> dict[str, Any]:
  """The explicitly given values, from flags or environment, checked and parsed."""
  values: dict[str, Any] = {}
  for name, var in ENV_VARS.items():
    flag, from_env = flags.get(name), env.get(var)
    if flag is not None and from_env not in (None, "") and str(flag) != from_env:
      raise DistributedConfigError(f"--{name}={flag} contradicts the environment variable "
                                   f"{var}={from_env}; set one or make them agree")
    raw, source = (flag, f"--{name}") if flag is not None else (from_env, var)
    if raw in (None, ""):
      continue
    if name == "coordinator_address":
      host, _, port = str(raw).rpartition(":")
      if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"{source}={raw!r}: expected HOST:PORT, e.g. "
                                     "10.0.0.1:8476 (the address of process 0)")
      values[name] = str(raw)
    else:
      try:
        values[name] = int(raw)
      except (TypeError, ValueError):
        raise DistributedConfigError(f"{source}={raw!r}: not an integer") from None
  n, i = values.get("num_processes"), values.get("process_id")
  if n is not None and n < 1:
    raise DistributedConfigError(f"--num_processes={n}: must be at least 1")
  if i is not None and i < 0:
    raise DistributedConfigError(f"--process_id={i}: must be >= 0")
  if n is not None and i is not None and i >= n:
    raise DistributedConfigError(f"--process_id={i} is out of range for --num_processes={n} "
                                 f"(process ids are 0..{n - 1})")
  return values


def plan(env: Mapping[str, str], flags: Mapping[str, Any] | None = None, *,
         on_cloud_tpu: bool = False) -> Plan:
  """Decides how this process joins the run (see the module docstring).

  Args:
    env: the environment (``os.environ``).
    flags: ``coordinator_address``, ``num_processes``, ``process_id``; None or absent = unset.
    on_cloud_tpu: whether ``import jax`` found TPU chips on this machine.
  Raises:
    DistributedConfigError: naming the flag or variable that is missing, malformed or
      contradicts another.
  """
  explicit = _explicit_values(env, flags or {})
  timeouts = {"initialization_timeout": INITIALIZATION_TIMEOUT_S,
              "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
              "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
  if len(explicit) == len(ENV_VARS):
    return Plan({**explicit, **timeouts, "cluster_detection_method": "deactivate"},
                f"explicit: process {explicit['process_id']} of {explicit['num_processes']}, "
                f"coordinator {explicit['coordinator_address']}")
  cluster = detect_cluster(env, on_cloud_tpu)
  if cluster is None:
    if explicit:
      missing = [f"--{k} (or {v})" for k, v in ENV_VARS.items() if k not in explicit]
      given = ", ".join(f"--{k}" for k in explicit)
      raise DistributedConfigError(
          f"{given} given but {' and '.join(missing)} missing: outside a cluster that JAX "
          "detects (SLURM, Cloud TPU, Open MPI) a multi-process run needs all three of "
          "--coordinator_address, --num_processes and --process_id")
    return Plan(None, "single process: no coordinator flags and no cluster detected")
  if cluster == "slurm" and not explicit and env["SLURM_NTASKS"].strip() == "1":
    return Plan(None, "single process: a SLURM step with one task")
  filled = ", ".join(f"{k}={v}" for k, v in explicit.items())
  return Plan({**explicit, **timeouts},
              f"{cluster} detected by JAX" + (f" (given: {filled})" if filled else ""))


def initialize(flags: Mapping[str, Any] | None = None,
               env: Mapping[str, str] | None = None) -> Plan:
  """Plans from ``os.environ`` and `flags` and calls `jax.distributed.initialize` if needed.

  Must run before anything touches a JAX device. Returns the plan that was carried out.
  """
  import os

  import jax
  from jax._src import cloud_tpu_init  # set by `import jax`: TPU chips and libtpu found

  p = plan(os.environ if env is None else env, flags,
           on_cloud_tpu=bool(cloud_tpu_init.running_in_cloud_tpu_vm))
  if p.kwargs is not None and not jax.distributed.is_initialized():
    jax.distributed.initialize(**p.kwargs)
  return p


def is_primary() -> bool:
  """True on the process that writes logs, metrics and summaries (process index 0)."""
  import jax

  return jax.process_index() == 0
