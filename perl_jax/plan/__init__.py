"""Will it fit? The per-device memory of every trainer phase, on a machine you do not have.

    python -m perl_jax.plan --config=configs/ppo_lora.py --topology=v5e-8 [--config.key=value]

How
---
1. The config is checked as `perl_jax.train` checks it, and every checkpoint is peeked at
   (config and tensor headers; no weights are read; a directory with config.json alone is
   planned from that).
2. The trainers' own loaders build every model as shapes (`plan.models`): frozen bases once
   however many models share them, adapters, heads, optimizer states.
3. Each phase is the trainers' own jitted function (`plan.tasks`), lowered with arguments that
   carry the shardings of the trainers' layout (`plan.phases.phase_layout`) and compiled for
   the topology's devices: host CPUs for ``cpu-N``, TPU chips through libtpu when it is
   installed (no TPU needed). XLA's memory analysis of each program gives its arguments,
   outputs, aliased (donated) outputs and temporaries per device.
4. A phase's peak is what the trainer holds throughout (`resident`: params, trainable trees,
   optimizer states, from their per-device shard shapes, shared arrays once) plus the
   program's other arguments, its outputs less those written into donated inputs, its
   temporaries (activations, gradients, the KV cache, folded LoRA kernels) and its code. The
   run fits when the largest peak is within the device's usable memory.
5. An analytic estimate (`plan.estimate`) is printed next to every figure. Where nothing
   compiles for the target (GPUs; TPUs without libtpu) the peak is the held state and KV cache
   from their shard shapes (an abstract mesh of the topology's size) plus the estimated
   activations.

On TPU, XLA keeps small temporaries in on-chip memory, and the memory analysis counts device
memory (HBM) only: a small program can report no temporaries at all.

The compiled figures are XLA's own accounting for that program on that device, so they are
as good as the compiler's buffer assignment; what they leave out is runtime overhead (the
allocator's fragmentation, the framework's own buffers, and on GPUs the CUDA context and
cuDNN/cuBLAS workspaces), hence the headroom the verdict reports.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

from perl_jax.plan import estimate as est
from perl_jax.plan import topology as topo_lib
from perl_jax.plan.phases import Compiled
from perl_jax.plan.topology import GiB, Topology, TopologyError

log = logging.getLogger(__name__)

__all__ = ["Plan", "PhaseReport", "make_plan", "report", "TopologyError"]


@dataclasses.dataclass
class PhaseReport:
  name: str
  estimate: est.Memory  # the analytic estimate of the whole phase
  kv_cache: int = 0  # bytes per device, from the cache's shape and layout
  compiled: Compiled | None = None
  transient_args: int = 0  # bytes per device of the arguments that are not held state
  compile_seconds: float = 0.0

  @property
  def in_out(self) -> int | None:
    """Arguments other than held state, plus outputs not written into donated inputs."""
    m = self.compiled
    return None if m is None else self.transient_args + m.output - m.alias

  def peak(self, resident: int) -> float:
    """Bytes per device while the phase runs: held state and KV cache from their shardings,
    plus XLA's temporaries where compiled, else the estimated activations."""
    if self.compiled is None:
      return resident + self.kv_cache + self.transient_args + self.estimate.activations
    # The program's own code lives in device memory too (TPU: megabytes; CPU reports 0).
    return resident + self.in_out + self.compiled.temp + self.compiled.code


@dataclasses.dataclass
class Plan:
  config_name: str
  topology: Topology
  target: str  # how (or why not) the phases were compiled
  mesh: dict[str, int]
  resident: dict[str, int]  # 'params' / 'trainable' / 'optimizer' -> bytes per device
  resident_estimate: est.Memory
  phases: list[PhaseReport]
  seconds: float = 0.0

  @property
  def resident_total(self) -> int:
    return sum(self.resident.values())

  def peak(self) -> tuple[PhaseReport, float]:
    """(phase, bytes per device) of the largest phase: compiled where compiled, else estimated."""
    return max(((p, p.peak(self.resident_total)) for p in self.phases), key=lambda x: x[1])

  @property
  def fits(self) -> bool:
    return self.peak()[1] <= self.topology.usable_bytes


def make_plan(c: Any, topology: Topology, config_name: str = "", compile: bool = True,
              only: Sequence[str] | None = None) -> Plan:
  """Builds and (where a compiler for the topology is at hand) compiles every phase of `c`, or
  the phases named in `only` (the others get the estimate alone)."""
  from perl_jax import config as config_lib
  from perl_jax.plan import models as models_lib, phases, tasks
  from perl_jax.trainers import common

  start = time.perf_counter()
  c = c.copy_and_resolve_references()
  config_lib.validate(c, num_devices=topology.num_devices)  # the mesh is the topology's
  for model in ("policy", "reward", "value"):
    if model in c and c[model].init:
      _check_checkpoint(c[model].init)
  devices, target = (topo_lib.target_devices(topology) if compile else
                     (None, "not compiled (--nocompile): shard shapes and the estimate only"))
  sizes = phases.mesh_sizes(c, topology.num_devices)
  optimizers = models_lib.optimizers(c)
  models = models_lib.abstract_models(c, optimizers)
  state, estimates = _estimates(c, models, est.Mesh(**sizes))
  reports = {name: PhaseReport(name, memory) for name, memory in estimates.items()}
  unknown = sorted(set(only or ()) - set(reports))
  if unknown:
    raise TopologyError(f"--phases: {', '.join(unknown)} not among this task's phases "
                        f"({', '.join(reports)})")
  # Without target devices an abstract mesh of the same sizes still gives every shard shape.
  target_devices = devices if devices is not None else topology.num_devices
  layout = phases.phase_layout(c, target_devices, "state")
  placed = tasks.placed_trees(models, layout, optimizers)
  resident = {k: phases.resident_bytes(models, placed, k)
              for k in ("params", "trainable", "optimizer")}
  build = tasks.ppo_phases if c.task == "ppo" else tasks.train_phase
  for phase in build(c, models, placed, optimizers, target_devices):
    r = reports[phase.name]
    r.transient_args, r.kv_cache = phase.transient_arg_bytes, phase.kv_cache
    if devices is not None and (only is None or phase.name in only):
      t = time.perf_counter()
      r.compiled = phases.compile_phase(phase)
      r.compile_seconds = time.perf_counter() - t
      log.info("plan: compiled %s for %s in %.1f s", phase.name, topology.name,
               r.compile_seconds)
  return Plan(config_name, topology, target, sizes, resident, state, list(reports.values()),
              time.perf_counter() - start)


def _check_checkpoint(init: str) -> None:
  """`common.peek` (config and tensor headers; a `CheckpointError` names the fault), or, for a
  Hugging Face directory holding config.json but no weights yet, that config alone: a model
  can be planned before it is downloaded."""
  from pathlib import Path

  from perl_jax.models.hf import read_hf_config
  from perl_jax.trainers import common

  path = Path(init)
  weights = any(path.glob("*.safetensors")) or (path / common.META_FILE).exists()
  if (path / "config.json").exists() and not weights:
    read_hf_config(path)
  else:
    common.peek(init)


def _estimates(c: Any, models: Any, mesh: est.Mesh) -> tuple[est.Memory, dict[str, est.Memory]]:
  """(resident state, {phase: whole-phase estimate}) from the models' configs."""
  from perl_jax.plan.tasks import eval_rows, reward_kind
  from perl_jax.trainers import ppo

  m = {k: est.Model(module.cfg, module.lora) for k, module in models.modules.items()}
  if c.task != "ppo":
    name = "policy" if c.task == "sft" else "reward"
    state = est.state(models.bases, [m[name]], [m[name]], mesh)  # + the loaded copy
    rows = c.data.batch_size * (2 if c.task == "reward" and reward_kind(c) == "pairwise" else 1)
    t = c.data.max_prompt_len + c.data.max_response_len + 1
    act = est.update(m[name], rows, t, t, mesh)
    return state, {"train step": dataclasses.replace(state, activations=act)}
  p, r = c.ppo, c.rollout
  value = m.get("value")
  state = est.state(models.bases, [m["policy"]] + ([value] if value else []), [m["reward"]],
                    mesh)
  n = r.max_new_tokens
  rows, length = p.batch_size * r.num_samples, c.data.max_prompt_len + n
  micro = rows // (p.num_minibatches * p.grad_accum)
  forwards = [(est.Model(m["policy"].cfg, None), n), (m["reward"], 0)] + (
      [(value, 0)] if value else []) + ([(m["policy"], n)] if ppo.recompute_logprobs(r) else [])
  out = {}

  def generate(name, prompts, samples):
    kv, other = est.generate(m["policy"], prompts, samples, c.data.max_prompt_len, n, mesh)
    out[name] = dataclasses.replace(state, kv_cache=kv, activations=other)

  generate("generate", p.batch_size, r.num_samples)
  out["score"] = dataclasses.replace(state, activations=est.score(forwards, rows, length, mesh))
  out["update/policy"] = dataclasses.replace(
      state, activations=est.update(m["policy"], micro, length, n, mesh))
  if value:
    out["update/value"] = dataclasses.replace(
        state, activations=est.update(value, micro, length, 0, mesh))
  n_eval = eval_rows(mesh.batch_shards)
  if n_eval > rows:
    generate("eval generate", n_eval, 1)
    out["eval score"] = dataclasses.replace(
        state, activations=est.score(forwards, n_eval, length, mesh))
  return state, out


# --- The report -----------------------------------------------------------------------------


def _size(b: float | None) -> str:
  if b is None:
    return "-"
  if abs(b) >= GiB:
    return f"{b / GiB:.2f} GiB"
  if abs(b) >= 2 ** 20:
    return f"{b / 2 ** 20:.1f} MiB"
  return f"{b / 2 ** 10:.0f} KiB"


def report(plan: Plan) -> str:
  """The table and the verdict, as printed by ``python -m perl_jax.plan``."""
  from perl_jax.benchmarks import _row

  t = plan.topology
  mesh = " x ".join(f"{k}={v}" for k, v in plan.mesh.items())
  lines = [f"{plan.config_name or 'config'} on {t.name}: {t.describe()}",
           f"mesh: {mesh}; {plan.target}", ""]

  def table(header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines.extend([_row(header, widths), "  ".join("-" * w for w in widths)]
                 + [_row(r, widths) for r in rows] + [""])

  e = plan.resident_estimate
  held = [("params (frozen)", "params", e.params),
          ("adapters / trainable", "trainable", e.trainable),
          ("optimizer state", "optimizer", e.optimizer)]
  table(["held throughout, per device", "sharded", "estimate"],
        [[label, _size(plan.resident[k]), _size(v)] for label, k, v in held])
  rows = []
  for p in plan.phases:
    m = p.compiled
    rows.append([p.name, _size(p.kv_cache or None), _size(m.temp if m else None), _size(p.in_out),
                 _size(p.peak(plan.resident_total)), _size(p.estimate.kv_cache or None),
                 _size(p.estimate.activations), _size(p.estimate.total)])
  table(["phase, per device", "KV cache", "temp", "in/out", "peak", "est. KV cache",
         "est. transient", "est. peak"], rows)
  phase, peak = plan.peak()
  usable = t.usable_bytes
  source = ("compiled" if phase.compiled is not None
            else "held state sharded, activations estimated")
  verdict = "fits" if peak <= usable else "does NOT fit"
  headroom = usable - peak
  lines.append(f"{verdict}: peak {_size(peak)} per device ({phase.name}, {source}) of "
               f"{_size(usable)} usable; headroom {'-' if headroom < 0 else ''}"
               f"{_size(abs(headroom))} ({headroom / usable:.0%})")
  lines.append("sharded: per-device shard shapes of the trainers' layout; temp (XLA's "
               "temporaries in device memory, the KV cache included) and in/out (arguments other "
               "than held state, outputs not written into donated inputs) from the compiled "
               "program; peak: held + in/out + temp + the program's code, or, not compiled, "
               "held + KV cache + estimated transient")
  return "\n".join(lines)
