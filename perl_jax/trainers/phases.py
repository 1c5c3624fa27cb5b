"""A layout per PPO phase (generate, score, train) and the weight moves between them, after ReaL.

Design
------
* `PhaseLayouts` holds three `Layout`s over the same devices. Decoding is often fastest
  tensor-parallel, forward-only scoring data- or fully-sharded, and training fully sharded;
  ``config.layouts`` picks them: ``"manual"`` reads ``config.phase_mesh.{generate,score,train}``
  (strings like ``"data=1,fsdp=2,tensor=4"``; empty means ``config.mesh``, so a config with no
  overrides runs exactly as before), ``"auto"`` measures candidates (`layout_cost`).
* Models load in the *train* layout (their trainable trees and optimizer state live there).
  `Reallocator` gives each phase the variables it reads:
  - frozen trees (the base checkpoint; the reward model entirely) are placed once per layout:
    a cache keyed by (leaf identity, layout). Bases shared between models (`BaseCache`; with
    LoRA the reference *is* the policy's base) are therefore placed once per layout too;
  - the trainable tree (adapters + heads, small with LoRA) changes every update, so it is
    moved each iteration with ``jax.device_put`` into the other layout's NamedShardings.
  Every leaf move is counted (`moves`) so tests can check what moved and when.
* Rollout outputs are re-split onto the score layout and the scored batch onto the train
  layout (`Layout.shard_batch`); these batch moves are small and are timed inside the phase
  that receives them. Weight moves are timed on their own (``perf/realloc_s``).
* Offload: a frozen tree idle between uses (the reward model outside scoring, unless it shares
  its base with a model still in use) can wait in host memory. `host_memory_kind` decides:
  only on an accelerator that offers a ``pinned_host`` memory distinct from its default. On
  CPU the device memory *is* host memory, so offloading would only copy RAM to RAM: it is a
  logged no-op there.
* Each phase runs (and traces) inside its own layout's `activate()`, so the model's activation
  constraints name that phase's mesh. All meshes list the devices in the same order, so arrays
  of different layouts can meet in one jitted call (XLA reshards them).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding

from perl_jax import sharding
from perl_jax.config import ConfigError, check_mesh
from perl_jax.trainers import common
from perl_jax.trainers.layout import Layout

log = logging.getLogger(__name__)

PHASES = ("generate", "score", "train")
MODES = ("manual", "auto")
Params = Any


# --- Config ---------------------------------------------------------------------------------


def parse_mesh(text: str, key: str, num_devices: int) -> dict[str, int] | None:
  """{'data','fsdp','tensor'} sizes of a "data=1,fsdp=2,tensor=4" string (missing axes: 1);
  None for "". The product must equal `num_devices`; a `ConfigError` names `key`."""
  if not isinstance(text, str):
    raise ConfigError(f"config.{key}: {text!r} must be a string like 'data=1,fsdp=2,tensor=4'")
  if not text.strip():
    return None
  sizes = dict.fromkeys(sharding.MESH_AXES, 1)
  for entry in text.split(","):
    name, eq, value = (s.strip() for s in entry.partition("="))
    if not eq or name not in sizes or not value.isdigit() or int(value) < 1:
      raise ConfigError(f"config.{key}: entry {entry!r} is not 'axis=size' with axis one of "
                        f"{sharding.MESH_AXES} and size an integer >= 1")
    sizes[name] = int(value)
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"config.{key}: {text!r} uses {math.prod(sizes.values())} devices but "
                      f"config.mesh uses {num_devices}; a phase mesh must cover the same devices")
  return sizes


def check_config(c: Any, num_devices: int) -> dict[str, dict[str, int] | None]:
  """{phase: sizes or None} of ``config.phase_mesh``, checked against ``config.mesh`` (batch
  sizes must split over every phase's data x fsdp); raises `ConfigError` naming the key."""
  if c.layouts not in MODES:
    raise ConfigError(f"config.layouts: {c.layouts!r} is not one of {MODES}")
  main, _ = check_mesh(c, num_devices)
  n = math.prod(main.values())
  out = {}
  for phase in PHASES:
    key = f"phase_mesh.{phase}"
    sizes = parse_mesh(c.phase_mesh[phase], key, n)
    if sizes is not None:
      shards = sizes["data"] * sizes["fsdp"]
      rows = c.ppo.batch_size * (c.rollout.num_samples if phase != "generate" else 1)
      if rows % shards:
        raise ConfigError(f"config.{key}: a batch of {rows} rows does not split over data x "
                          f"fsdp = {shards}")
      if phase == "train":  # microbatches split too (as config.check_mesh for config.mesh)
        sub = c.copy_and_resolve_references()
        sub.mesh.update(sizes)
        try:
          check_mesh(sub, num_devices)
        except ConfigError as e:
          raise ConfigError(f"config.{key}: {c.phase_mesh[phase]!r}: {e}") from None
    out[phase] = sizes
  if c.layouts == "auto" and c.phase_mesh.auto_candidates < 1:
    raise ConfigError("config.phase_mesh.auto_candidates: must be >= 1")
  return out


# --- Layouts --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PhaseLayouts:
  """The layout of each phase; all over the devices of ``config.mesh``."""

  generate: Layout
  score: Layout
  train: Layout

  @classmethod
  def uniform(cls, layout: Layout) -> PhaseLayouts:
    return cls(layout, layout, layout)

  @classmethod
  def from_sizes(cls, main: Layout, sizes: dict[str, dict[str, int] | None]) -> PhaseLayouts:
    """`main` for a phase whose sizes are None, else a mesh of those sizes on main's devices."""
    devices = list(main.mesh.devices.flat)

    def one(s):
      return main if s is None else Layout(sharding.make_mesh(**s, devices=devices), main.rules)

    return cls(**{p: one(sizes[p]) for p in PHASES})

  @classmethod
  def from_config(cls, c: Any, main: Layout) -> PhaseLayouts:
    """Manual layouts from ``config.phase_mesh`` (``layouts=auto`` is chosen by the trainer,
    which has the phase functions to measure; see `layout_cost`)."""
    return cls.from_sizes(main, check_config(c, len(jax.devices())))

  def __str__(self) -> str:
    return "; ".join(f"{p}: {getattr(self, p)}" for p in PHASES)


def mesh_key(layout: Layout) -> tuple:
  """What makes two layouts place arrays alike: mesh shape, device order and rules."""
  return (tuple(layout.mesh.shape.items()), tuple(d.id for d in layout.mesh.devices.flat),
          layout.rules)


# --- Moving weights -------------------------------------------------------------------------


def _same(x: jax.Array, s: NamedSharding) -> bool:
  """Whether `x` already sits as `s` says (equal specs may be spelled differently)."""
  return x.sharding.is_equivalent_to(s, x.ndim)


def host_memory_kind(device: jax.Device) -> str | None:
  """The memory kind idle frozen weights can be offloaded to, or None: 'pinned_host' where the
  device offers it distinct from its default memory, and the device is not itself the host."""
  kinds = {m.kind for m in device.addressable_memories()}
  default = device.default_memory().kind
  if device.platform == "cpu" or "pinned_host" not in kinds or default == "pinned_host":
    return None
  return "pinned_host"


class Reallocator:
  """Places frozen trees once per layout, moves trainable trees every call; counts leaf moves."""

  def __init__(self):
    self._placed: dict[tuple, tuple[jax.Array, jax.Array]] = {}  # (id, layout) -> (src, copy)
    self.moves: list[tuple[str, str]] = []  # ('frozen' | 'trainable' | 'offload', layout)

  def frozen(self, module: Any, tree: Params, layout: Layout) -> Params:
    """`tree` on `layout`, each leaf placed at most once per layout (kept for later calls)."""
    if tree is None:
      return None
    shardings = layout.shardings(module, tree)
    key = mesh_key(layout)

    def one(x, s: NamedSharding):
      if _same(x, s):
        return x
      hit = self._placed.get((id(x), key))
      if hit is not None and _same(hit[1], s):
        return hit[1]
      placed = jax.device_put(x, s)  # first use here, or back from host memory
      self._placed[(id(x), key)] = (x, placed)  # keep x alive: its id stays unique
      self.moves.append(("frozen", str(layout)))
      return placed

    return jax.tree.map(one, tree, shardings)

  def trainable(self, module: Any, tree: Params, layout: Layout) -> Params:
    """`tree` (the current adapters and heads) resharded onto `layout` (asynchronously)."""
    if tree is None:
      return None
    shardings = layout.shardings(module, tree)
    leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    self.moves.extend(("trainable", str(layout)) for x, s in zip(leaves, specs)
                      if not _same(x, s))
    return jax.tree.map(lambda x, s: x if _same(x, s) else jax.device_put(x, s), tree, shardings)

  def variables(self, module: Any, frozen: Params, trainable: Params, layout: Layout) -> dict:
    """``module.apply`` variables of a frozen + trainable model on `layout`."""
    return common.variables(self.frozen(module, frozen, layout),
                            self.trainable(module, trainable, layout))

  def offload(self, module: Any, tree: Params, layout: Layout, keep: Sequence[Params] = ()):
    """Moves the leaves of `tree` placed for `layout` that no tree in `keep` uses to host
    memory until `frozen` brings them back; a logged no-op where `host_memory_kind` is None."""
    kind = host_memory_kind(layout.mesh.devices.flat[0])
    if kind is None:
      if not getattr(self, "_said", False):
        log.info("offload: no host memory distinct from device memory on %s; frozen models "
                 "stay in place", layout.mesh.devices.flat[0].platform)
        self._said = True
      return
    used = {id(x) for t in keep for x in jax.tree.leaves(t)}
    key = mesh_key(layout)
    for x in jax.tree.leaves(tree):
      hit = self._placed.get((id(x), key))
      if hit is None or id(x) in used or id(hit[1]) in used:
        continue
      self._placed[(id(x), key)] = (x, jax.device_put(hit[1],
                                                      hit[1].sharding.with_memory_kind(kind)))
      self.moves.append(("offload", str(layout)))
