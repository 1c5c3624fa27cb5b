"""Each phase of a trainer as the program it compiles, from shapes, on a mesh of target devices.

A `Phase` is one jitted function of the trainers, called exactly as the trainer calls it
(`sampling`'s compiled sampler for PPO's rollout, `ppo.make_score_fn`, the two programs of
`ppo.make_update_fn`, the SFT and reward train steps), with `jax.ShapeDtypeStruct` arguments
that carry the shardings the trainer's arrays would have. `compile_phase` lowers it and
compiles it for the mesh's devices (host CPUs, or TPU devices from libtpu with no TPU
present) and reads XLA's memory analysis: argument, output, alias (outputs written into
donated inputs) and temp bytes, all per device.

Layouts: `phase_layout` gives each phase its `perl_jax.trainers.layout.Layout` (mesh and
logical-axis rules). Today every phase runs on the trainers' one layout (`config.mesh`);
per-phase layouts (a generation layout that differs from the training one) change that one
function.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from perl_jax import sharding
from perl_jax.lora import path_str
from perl_jax.plan.models import Models
from perl_jax.trainers.layout import Layout


# --- Layouts --------------------------------------------------------------------------------


def mesh_sizes(c: Any, num_devices: int) -> dict[str, int]:
  """{'data', 'fsdp', 'tensor'} of `config.mesh` on `num_devices` devices; a mesh or batch that
  does not fit is a `ConfigError` naming the key (`config.check_mesh`, as the trainers)."""
  from perl_jax import config as config_lib

  return config_lib.check_mesh(c, num_devices)[0]


def phase_layout(c: Any, devices: Sequence[Any] | int, phase: str) -> Layout:
  """The `Layout` (mesh and logical-axis rules) that `phase` runs on; every phase: the
  trainers' one layout, `Layout.from_config`.

  `devices` are the target devices, or their number where there is nothing to compile for:
  a layout on an `AbstractMesh` of the same sizes still gives every array its shard shape.
  """
  del phase  # one layout for all phases until per-phase layouts exist
  from perl_jax import config as config_lib

  if not isinstance(devices, int):
    return Layout.from_config(c, devices)
  sizes, rules = config_lib.check_mesh(c, devices)
  auto = (jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES)
  mesh = jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES),
                                   sharding.MESH_AXES, axis_types=auto)
  return Layout(mesh, rules)


# --- Shapes with shardings ------------------------------------------------------------------


def device_bytes(x: jax.ShapeDtypeStruct) -> int:
  """Bytes of one device's shard of `x` (the whole array when it has no sharding)."""
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def tree_bytes(tree: Any) -> int:
  """Per-device bytes of the array leaves of `tree` (static leaves, a module, are skipped)."""
  return sum(device_bytes(x) for x in jax.tree.leaves(tree)
             if isinstance(x, jax.ShapeDtypeStruct))


def _with(x: Any, s: NamedSharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)


def place_model_tree(module: Any, tree: Any, layout: Layout) -> Any:
  """`tree` ({'params': ..., 'lora': ...}, any subset) with the shardings the trainers give
  its leaves (`Layout.shardings`)."""
  return jax.tree.map(_with, tree, layout.shardings(module, tree))


def place_opt_state(optimizer: optax.GradientTransformation, opt_state: Any,
                    placed_trainable: Any, layout: Layout) -> Any:
  """Optimizer state with moments sharded like their params, the rest (counts) replicated,
  as `Layout.init_opt_state` creates it."""
  shardings = jax.tree.map(lambda x: x.sharding, placed_trainable)
  return optax.tree_map_params(optimizer, lambda x, s: _with(x, s), opt_state, shardings,
                               transform_non_params=lambda x: _with(x, layout.replicated))


def batch(shape: tuple[int, ...], dtype: Any, layout: Layout) -> jax.ShapeDtypeStruct:
  """A [batch, ...] array split over the batch axes (data x fsdp)."""
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.data_sharding(layout.mesh))


def replicated(shape: tuple[int, ...], dtype: Any, layout: Layout) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=layout.replicated)


def rng(layout: Layout) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return replicated(key.shape, key.dtype, layout)


# --- Phases and their compiled memory -------------------------------------------------------


@dataclasses.dataclass
class Phase:
  """One compiled program of a trainer, and how its arguments are placed."""

  name: str
  fn: Callable  # a jitted function: fn.lower(*args, **static)
  args: tuple  # ShapeDtypeStructs with shardings
  static: dict  # static keyword arguments
  state_args: tuple[int, ...]  # positions of arguments that are resident state (params, ...)
  layout: Layout
  kv_cache: int = 0  # bytes per device of the KV cache (inside temp), from its shape

  @property
  def transient_arg_bytes(self) -> int:
    """Per-device bytes of the arguments that are not resident state (batches, keys), from
    their shapes: XLA's argument size cannot be split, since the state arguments repeat shared
    arrays and jit drops arguments a program does not read."""
    return sum(tree_bytes(a) for i, a in enumerate(self.args) if i not in self.state_args)


@dataclasses.dataclass(frozen=True)
class Compiled:
  """XLA's memory analysis of one compiled program, bytes per device."""

  argument: int
  output: int
  alias: int
  temp: int
  code: int

  @classmethod
  def of(cls, compiled: Any) -> Compiled:
    m = compiled.memory_analysis()
    return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
               m.temp_size_in_bytes, m.generated_code_size_in_bytes)


def lower(phase: Phase) -> Any:
  """The phase's `jax.stages.Lowered`, traced inside its mesh and rules (activation constraints
  are read at trace time)."""
  with phase.layout.activate():
    return phase.fn.lower(*phase.args, **phase.static)


def compile_phase(phase: Phase) -> Compiled:
  return Compiled.of(lower(phase).compile())


def resident_bytes(models: Models, placed: dict[str, Any], category: str) -> int:
  """Per-device bytes of the placed trees of one category ('params', 'trainable',
  'optimizer'), each shared leaf once."""
  from perl_jax.plan.models import CATEGORY

  total = 0
  for name, tree in placed.items():
    if CATEGORY[name.split("/")[-1]] != category:
      continue
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if (name, path_str(path)) not in models.repeats:
        total += device_bytes(leaf)
  return total
