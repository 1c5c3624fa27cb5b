"""``config.layouts = "auto"``: choose each PPO phase's mesh by measuring it (a small cost model).

Design
------
* Candidates (`candidates`): the factorisations data x fsdp x tensor of the device count in
  which data x fsdp divides every batch the phases split (prompts, responses, microbatches) and
  tensor divides the attention heads. ``config.mesh`` comes first, then single-axis layouts,
  then mixed ones, more tensor first; at most ``phase_mesh.auto_candidates`` are kept (the cap
  bounds start-up time: each candidate compiles each phase once).
* Measurements (`measure`): for each phase and candidate, one compiling run, then the compiled
  program's ``cost_analysis()`` (FLOPs, bytes accessed; the scoring and update programs, the
  sampler is a loop of programs and has none) and ``phase_mesh.auto_runs`` timed runs (the
  median). Inputs are the real models and a batch of random prompt tokens of the configured
  shapes. Plus, for every pair of candidates, the time to move the trainable trees (adapters
  and heads) from one to the other: the per-iteration reallocation.
* The rule (`choose`, pure and unit-tested): per phase the fastest median time; candidates
  within `TIE` (5%) of it count as equal and the one with fewer bytes accessed (then FLOPs)
  wins, since timings on a loaded machine are noisy and memory traffic is what differs between
  layouts. A candidate whose bytes accessed exceed `PRUNE` (4x) the phase's smallest is not
  timed at all. The per-phase choice is kept only if its summed time plus the reallocation it
  needs (train layout -> generate and score layouts) beats the best single layout for all
  phases (chosen by the same rule on summed times) by more than `TIE`; otherwise that single
  layout is used (no moves at all).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any, Callable

import jax

from perl_jax import sharding
from perl_jax.trainers import phases
from perl_jax.trainers.layout import Layout

log = logging.getLogger(__name__)

TIE = 0.05
PRUNE = 4.0
Sizes = tuple[int, int, int]  # (data, fsdp, tensor)


def candidates(n: int, rows: tuple[int, ...], heads: int, first: Sizes | None = None,
               cap: int = 4) -> list[Sizes]:
  """(data, fsdp, tensor) meshes of `n` devices that split every batch in `rows` over data x
  fsdp and `heads` over tensor; `first` (config.mesh) leads, then fewest mixed axes."""
  out = [(d, f, n // (d * f)) for d in range(1, n + 1) for f in range(1, n // d + 1)
         if n % (d * f) == 0 and all(r % (d * f) == 0 for r in rows) and heads % (n // (d * f)) == 0]
  out.sort(key=lambda s: (s != first, sum(x > 1 for x in s), -s[2], -s[1]))
  return out[:cap]


def choose(seconds: dict[str, dict[Sizes, float]], realloc_s: dict[tuple[Sizes, Sizes], float],
           cost: dict[str, dict[Sizes, tuple[float, float]]] | None = None) -> dict[str, Sizes]:
  """{phase: mesh} from measured seconds {phase: {mesh: s}} (a mesh missing from a phase was
  pruned), reallocation seconds {(train mesh, other mesh): s} and cost analysis {phase: {mesh:
  (flops, bytes)}}; see the module docstring for the rule."""
  cost = cost or {}
  per_phase = {p: _best(seconds[p], cost.get(p, {})) for p in phases.PHASES}
  train = per_phase["train"]
  split = sum(seconds[p][per_phase[p]] for p in phases.PHASES) + sum(
      realloc_s.get((train, per_phase[p]), 0.0) for p in ("generate", "score")
      if per_phase[p] != train)
  shared = [m for m in seconds["train"] if all(m in seconds[p] for p in phases.PHASES)]
  if shared:  # the best single layout, by the same rule over the summed phases
    total = {m: sum(seconds[p][m] for p in phases.PHASES) for m in shared}
    summed = {m: tuple(sum(cost[p][m][i] for p in phases.PHASES) for i in (0, 1))
              for m in shared if all(m in cost.get(p, {}) for p in phases.PHASES)}
    uniform = _best(total, summed)
    if total[uniform] <= split * (1 + TIE):  # no moves, unless splitting clearly pays
      return dict.fromkeys(phases.PHASES, uniform)
  return per_phase


def _best(times: dict[Sizes, float], cost: dict[Sizes, tuple[float, float]]) -> Sizes:
  """The fastest; among those within TIE of it, fewest bytes accessed, then FLOPs, then time."""
  fastest = min(times.values())
  tied = [m for m, s in times.items() if s <= fastest * (1 + TIE)]
  return min(tied, key=lambda m: (cost.get(m, (math.inf, math.inf))[::-1], times[m]))


def measure(probe: Callable[[Layout], tuple[Callable[[], Any], Callable[[], Any] | None]],
            layouts: dict[Sizes, Layout], runs: int) -> tuple[dict, dict]:
  """({mesh: median seconds}, {mesh: (flops, bytes)}) of one phase. `probe(layout)` gives a
  thunk running the phase there and, where the phase is one program, its `jit(...).lower`."""
  seconds, cost = {}, {}
  thunks = {}
  for sizes, layout in layouts.items():
    with layout.activate():
      thunk, lower = probe(layout)
      jax.block_until_ready(thunk())  # compiles
      if lower is not None:
        analysis = lower().compile().cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        cost[sizes] = (float(analysis.get("flops", 0.0)),
                       float(analysis.get("bytes accessed", 0.0)))
    thunks[sizes] = thunk
  least = min((b for _, b in cost.values()), default=None)
  for sizes, layout in layouts.items():
    if least and cost.get(sizes, (0, 0))[1] > PRUNE * least:
      log.info("layouts=auto: %s pruned (bytes accessed %.3g > %g x %.3g)", sizes,
               cost[sizes][1], PRUNE, least)
      continue
    times = []
    with layout.activate():
      for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(thunks[sizes]())
        times.append(time.perf_counter() - t0)
    seconds[sizes] = statistics.median(times)
  return seconds, cost


def choose_layouts(c: Any, main: Layout) -> phases.PhaseLayouts:
  """Measures the candidates on `main`'s devices with PPO's phase functions and returns the
  chosen `PhaseLayouts` (logged, with the measurements)."""
  from perl_jax.trainers import ppo_probes

  phases.check_config(c, len(jax.devices()))
  probes, trainable = ppo_probes.build(c, main)
  n = main.mesh.devices.size
  rows = ppo_probes.batch_rows(c)
  first = tuple(main.mesh.shape[a] for a in sharding.MESH_AXES)
  cands = candidates(n, rows, probes["heads"], first, c.phase_mesh.auto_candidates)
  devices = list(main.mesh.devices.flat)
  layouts = {s: Layout(sharding.make_mesh(*s, devices=devices), main.rules) for s in cands}
  seconds, cost = {}, {}
  for phase in phases.PHASES:
    seconds[phase], cost[phase] = measure(probes[phase], layouts, c.phase_mesh.auto_runs)
  realloc_s = {}
  for a in cands:
    for b in cands:
      if a != b:
        src = trainable(layouts[a])
        t0 = time.perf_counter()
        jax.block_until_ready(trainable(layouts[b], src))
        realloc_s[(a, b)] = time.perf_counter() - t0
  choice = choose(seconds, realloc_s, cost)
  log.info("layouts=auto: seconds %s; cost (flops, bytes) %s; reallocation %s; chosen %s",
           seconds, cost, realloc_s, choice)
  sizes = {p: dict(zip(sharding.MESH_AXES, choice[p])) for p in phases.PHASES}
  chosen = phases.PhaseLayouts.from_sizes(main, sizes)
  log.info("layouts=auto chose %s", chosen)
  return chosen

