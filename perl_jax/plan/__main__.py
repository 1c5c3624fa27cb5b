"""python -m perl_jax.plan --config=configs/ppo_lora.py --topology=v5e-8 [--memory_gb=G]

Prints the per-device memory of every phase of the configured run on the topology, and
whether it fits (see `perl_jax.plan`). Exit status: 0 whether it fits or not (the verdict is
printed); 2 for bad input (an unknown topology, a bad config key or value, a bad checkpoint),
with one paragraph on stderr as `perl_jax.train` reports it.

``--config`` is `perl_jax.train`'s flag: the same config files and ``--config.key=value``
overrides (the trainer's other flags are accepted and ignored).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Sequence

from absl import app, flags

from perl_jax import train  # defines --config: the trainer's config files and overrides

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Where it would run: v5e-8, v5p-32, h100x8, ... or cpu-N (N host CPU "
    "devices); an unknown name lists the known ones.")
_MEMORY_GB = flags.DEFINE_float(
    "memory_gb", None, "Override the usable memory per device, GiB (e.g. to leave room for "
    "other processes).")
_PHASES = flags.DEFINE_list(
    "phases", None, "Compile only these phases (e.g. generate,update/policy); the others get "
    "the analytic estimate.")
_COMPILE = flags.DEFINE_bool(
    "compile", True, "Compile every phase for the topology where possible; --nocompile gives "
    "shard shapes and the analytic estimate only.")


def _host_devices(n: int) -> None:
  """Asks for n host CPU devices; XLA reads the flag when JAX starts its CPU backend."""
  current = os.environ.get("XLA_FLAGS", "")
  m = re.search(r"--xla_force_host_platform_device_count=(\d+)", current)
  if m and int(m.group(1)) >= n:
    return
  current = re.sub(r"--xla_force_host_platform_device_count=\d+", "", current)
  os.environ["XLA_FLAGS"] = f"{current} --xla_force_host_platform_device_count={n}".strip()


def cli(c, topology_name: str, memory_gb: float | None = None, config_name: str = "",
        compile: bool = True, only: Sequence[str] | None = None) -> int:
  """Plans `c` on `topology_name` and prints the report; returns the exit status."""
  import perl_jax.plan as plan
  from perl_jax.plan import topology

  try:
    topo = topology.get(topology_name)
    if memory_gb is not None:
      topo = topology.with_memory(topo, memory_gb)
    result = plan.make_plan(c, topo, config_name, compile=compile, only=only)
  except topology.TopologyError as e:
    print(f"perl_jax.plan: bad flag: {' '.join(str(e).split())}", file=sys.stderr)
    return train.EXIT_BAD_INPUT
  except train.BAD_INPUT as e:
    print(train.error_message(e).replace("perl_jax.train", "perl_jax.plan"), file=sys.stderr)
    return train.EXIT_BAD_INPUT
  print(plan.report(result))
  return 0


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=train.EXIT_BAD_INPUT)
  try:
    c = train._CONFIG.value  # noqa: SLF001 (the trainer's own --config flag)
    if c is not None:
      c.task  # config_flags reports a --config file that failed to load on first use
  except (flags.Error, OSError, AttributeError, KeyError) as e:
    train._bad_flag(e, sys.argv)  # noqa: SLF001
  if c is None or _TOPOLOGY.value is None:
    raise app.UsageError("--config=configs/<name>.py and --topology=NAME are required",
                         exitcode=train.EXIT_BAD_INPUT)
  m = re.fullmatch(r"cpu-(\d+)", _TOPOLOGY.value)
  if m:  # before anything starts JAX's backends
    _host_devices(int(m.group(1)))
  name = os.path.basename(flags.FLAGS["config"].config_filename)
  return cli(c, _TOPOLOGY.value, _MEMORY_GB.value, name, _COMPILE.value, _PHASES.value)


if __name__ == "__main__":
  app.run(main, flags_parser=train._parse_flags)  # noqa: SLF001 (bad flags: exit 2, as train)
