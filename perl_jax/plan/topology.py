"""Known machines: device count, memory and peak rate per device, and how to compile for them.

A `Topology` names a slice or a node the way people order one (``v5e-8``, ``h100x8``) and says
what `perl_jax.plan` needs to know about it. Compiling for it without the hardware:

* TPU: `jax.experimental.topologies.get_topology_desc` gives abstract devices of a slice
  when the `libtpu` package is installed (it holds the TPU compiler; no TPU is needed, and
  it works with ``JAX_PLATFORMS=cpu``). This is what MaxText's ``train_compile.py`` does;
  the names and chip layouts below follow its ``accelerator_to_spec_map.py``. libtpu is an
  optional extra (``pip install 'perl-jax[tpu]'``): without it, TPU topologies fall back to
  the analytic estimate.
* ``cpu-N``: N host CPU devices of this process (``--xla_force_host_platform_device_count``,
  set by ``python -m perl_jax.plan`` before JAX starts). Their "memory" is the host's RAM
  shared N ways.
* GPUs: JAX has no ahead-of-time GPU compiler without the CUDA plugin and a description of
  the GPU, so GPU topologies get the analytic estimate only.

Device memory is the HBM per chip (GiB). On GPUs JAX preallocates 75% of it by default
(``XLA_PYTHON_CLIENT_MEM_FRACTION``), so that is what a run can use; TPU programs get the
whole HBM less a little the runtime keeps.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
from typing import Any

GiB = 2 ** 30


class TopologyError(ValueError):
  """An unknown topology (or phase) name, or a topology this process cannot compile for."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  platform: str  # "tpu" | "gpu" | "cpu"
  num_devices: int  # JAX devices (TPU chips; v4 and v5p run one device per chip, megacore)
  memory_gib: float  # per device
  peak_tflops: float | None  # dense bf16 per device; None where not meaningful (host CPU)
  usable_fraction: float = 1.0  # of memory_gib that a JAX program can use by default
  # get_topology_desc arguments (TPU only).
  tpu_topology: str | None = None
  chip_config: str = "default"
  chips_per_host: tuple[int, int, int] = (2, 2, 1)

  @property
  def usable_bytes(self) -> float:
    return self.memory_gib * self.usable_fraction * GiB

  def describe(self) -> str:
    peak = f", {self.peak_tflops:g} TFLOP/s bf16" if self.peak_tflops else ""
    usable = (f" ({self.usable_fraction:.0%} usable by default)" if self.usable_fraction < 1
              else "")
    return f"{self.num_devices} x {self.memory_gib:.1f} GiB{usable}{peak}"


def _tpu(name, chips, gib, tflops, topology, config="default", per_host=(2, 2, 1)):
  return Topology(name, "tpu", chips, gib, tflops, 1.0, topology, config, per_host)


def _gpu(name, count, gib, tflops):
  return Topology(name, "gpu", count, gib, tflops, 0.75)


# Chip figures: Cloud TPU and NVIDIA data sheets (HBM per chip; dense bf16 without sparsity).
KNOWN: dict[str, Topology] = {t.name: t for t in (
    _tpu("v4-8", 4, 32, 275, "v4:2x2x1", "megacore"),
    _tpu("v5e-8", 8, 16, 197, "v5e:2x4", per_host=(2, 4, 1)),  # one host of 8 chips
    _tpu("v5e-16", 16, 16, 197, "v5e:4x4"),
    _tpu("v5p-8", 4, 95, 459, "v5:2x2x1", "megacore"),
    _tpu("v5p-32", 16, 95, 459, "v5:2x2x4", "megacore"),
    _tpu("v6e-8", 8, 32, 918, "v6e:2x4", per_host=(2, 4, 1)),
    _gpu("a100x8", 8, 80, 312),
    _gpu("h100x8", 8, 80, 989),
    _gpu("h200x8", 8, 141, 989),
)}


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def get(name: str) -> Topology:
  """The topology called `name`; ``cpu-N`` for N host devices. Unknown -> `TopologyError`."""
  m = re.fullmatch(r"cpu-(\d+)", name)
  if m and int(m.group(1)) >= 1:
    n = int(m.group(1))
    return Topology(name, "cpu", n, host_memory_bytes() / n / GiB, None)
  if name in KNOWN:
    return KNOWN[name]
  raise TopologyError(f"unknown topology {name!r}; known: {', '.join(KNOWN)}, cpu-N "
                      "(N host CPU devices)")


def with_memory(topo: Topology, gib: float) -> Topology:
  """`topo` with `gib` usable per device (the --memory_gb override)."""
  if not gib > 0:
    raise TopologyError(f"--memory_gb={gib} must be > 0")
  return dataclasses.replace(topo, memory_gib=gib, usable_fraction=1.0)


def libtpu_version() -> str | None:
  if importlib.util.find_spec("libtpu") is None:
    return None
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "?"


def target_devices(topo: Topology) -> tuple[list[Any] | None, str]:
  """(devices to compile for, or None, and a line saying how or why not)."""
  import jax

  if topo.platform == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < topo.num_devices:
      raise TopologyError(
          f"{topo.name}: this process has {len(devices)} host CPU device(s); start it with "
          f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.num_devices} "
          "(python -m perl_jax.plan sets it itself)")
    return devices[:topo.num_devices], "compiled for this host's CPU"
  if topo.platform == "gpu":
    return None, "no ahead-of-time GPU compiler here: analytic estimate only"
  version = libtpu_version()
  if version is None:
    return None, ("libtpu is not installed (pip install 'perl-jax[tpu]' to compile for TPU "
                  "on this host): analytic estimate only")
  from jax.experimental.topologies import get_topology_desc

  try:
    desc = get_topology_desc(platform="tpu", topology_name=topo.tpu_topology,
                             chip_config_name=topo.chip_config,
                             chips_per_host_bounds=topo.chips_per_host, num_slices=1)
  except Exception as e:  # any libtpu failure means: no compiled figures, say why
    return None, f"libtpu {version} could not describe {topo.tpu_topology}: {e}"
  devices = list(desc.devices)
  if len(devices) != topo.num_devices:
    return None, (f"libtpu {version} gave {len(devices)} devices for {topo.tpu_topology}, "
                  f"expected {topo.num_devices}")
  return devices, f"compiled for {devices[0].device_kind} with libtpu {version}"
