"""Device meshes and one logical-axis rules table for data, FSDP and tensor parallelism.

Design
------
* The model (`perl_jax.models.Transformer`) names every parameter dimension and constrains
  its activations with *logical* axis names (``batch``, ``embed``, ``heads``, ...). This module
  owns the only mapping from those names to the three *mesh* axes ``('data', 'fsdp',
  'tensor')``: `LOGICAL_RULES`. Changing a layout means changing mesh sizes, never model code.
* Layouts: ``data`` splits the batch and replicates params; ``fsdp`` splits the batch *and*
  the params' ``embed`` dimension (ZeRO-3 style: XLA all-gathers a weight just before use);
  ``tensor`` splits heads, KV heads, MLP width and vocab (Megatron style). A mesh axis of size
  1 is a no-op, so the same rules cover every combination.
* One name, two roles. ``embed`` is sharded on ``fsdp`` in params, while activations
  ``(batch, length, embed)`` must not use ``fsdp`` twice. Flax resolves logical names by
  walking the rules *in order* and giving a dimension a mesh axis only if no other dimension
  of the same array already holds it (`flax.linen.spmd._logical_to_mesh_axes`, documented on
  `nn.logical_to_mesh_axes`). Because ``batch -> ('data', 'fsdp')`` is listed before
  ``embed -> 'fsdp'``, activations resolve to ``P(('data', 'fsdp'), None, None)`` and params
  (which have no ``batch`` dimension) to ``P('fsdp', ...)``. So no separate ``act_embed``
  name is needed, but the ORDER of `LOGICAL_RULES` matters; tests pin the resolved specs.
* A parameter dimension not divisible by its mesh axes (e.g. 2 KV heads on ``tensor=4``) is
  replicated along that dimension (``strict=True`` raises instead, naming the parameter).
  Replicating keeps odd checkpoints (Qwen2-0.5B has 14 heads and 2 KV heads) runnable on any
  mesh; only memory is lost. Activation constraints need no such care: XLA pads uneven
  shards inside jit.
* Params are never materialised unsharded: `init_sharded_params` traces `model.init` with
  `jax.eval_shape`, turns the logical boxes into shardings, and runs the init under
  ``jax.jit(..., out_shardings=...)`` so each device only computes its own shards. (Random
  values equal the single-device `init_params`: JAX's partitionable threefry.)
* `activate(mesh)` sets the mesh and the rules for code run inside it, which turns the
  model's ``constrain(...)`` calls from no-ops into real sharding constraints. The rules are
  read when a function is traced, so trace (first call) jitted code inside the context.

Meshes are built with ``AxisType.Auto`` axes so that sharding is propagated by XLA from the
inputs and constraints (``jax.make_mesh`` now defaults to explicit sharding-in-types).
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from perl_jax.lora import (adapter_creator, adapter_shapes, check_targets, fill_adapters, path_str,
                           strip_boxes)

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a [batch, ...] array is split over

Rules = tuple[tuple[str, Any], ...]

# Logical axis -> mesh axes, in priority order (see the module docstring: `batch` must come
# before `embed`, so activations shard their batch, not their embed, on 'fsdp').
LOGICAL_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("length", None),
    ("cache_length", None),
    ("positions", None),
    ("score", None),
    ("lora_rank", None),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all). One size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  bad = [k for k, v in sizes.items() if v != -1 and v < 1]
  if len(free) > 1 or bad:
    raise ValueError(f"mesh sizes {sizes}: each must be >= 1, and at most one may be -1")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"mesh sizes {sizes}: {len(devices)} devices are not divisible by "
                       f"{fixed}, so {free[0]}=-1 cannot fill them")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh sizes data={sizes['data']} x fsdp={sizes['fsdp']} x "
                     f"tensor={sizes['tensor']} = {math.prod(sizes.values())} but there are "
                     f"{len(devices)} devices")
  grid = np.asarray(devices, dtype=object).reshape(tuple(sizes[a] for a in MESH_AXES))
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is None:  # older jax: every axis is implicitly 'auto'
    return Mesh(grid, MESH_AXES)
  return Mesh(grid, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))


def _mesh_size(mesh: Mesh, axes: Any) -> int:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, name: str, strict: bool) -> P:
  """Drops mesh axes that do not evenly divide their dimension (or raises if strict)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None or dim % _mesh_size(mesh, axes) == 0:
      out.append(axes)
      continue
    if strict:
      raise ValueError(f"{name}: dimension of size {dim} cannot be split over mesh axes "
                       f"{axes} of size {_mesh_size(mesh, axes)} (mesh {dict(mesh.shape)})")
    # Keep the longest prefix of a multi-axis assignment that still divides, else replicate.
    kept = None
    if not isinstance(axes, str):
      for n in range(len(axes) - 1, 0, -1):
        if dim % _mesh_size(mesh, axes[:n]) == 0:
          kept = tuple(axes[:n])
          break
    log.info("%s: size %d not divisible by mesh axes %s; using %s", name, dim, axes, kept)
    out.append(kept)
  return P(*out)


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def abstract_variables(model: nn.Module, collection: str = "params") -> Any:
  """Boxed ShapeDtypeStructs of one collection of `model` ('params' or 'lora'); no compute."""
  tokens = jnp.zeros((1, 2), jnp.int32)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(model.init, rng, tokens)
  if collection == "params":
    return variables["params"]
  if collection != "lora":
    raise ValueError(f"collection={collection!r} must be 'params' or 'lora'")
  params = strip_boxes(variables["params"])  # not unbox(): see lora.strip_boxes

  return jax.eval_shape(adapter_creator(model), params, rng)


def param_shardings(model_or_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES, *,
                    collection: str = "params", strict: bool = False) -> Any:
  """NamedSharding tree for a model's params (or its 'lora' adapters with collection='lora').

  `model_or_tree` is a Transformer, or a tree whose leaves are Flax logical boxes
  (`nn.LogicallyPartitioned`, abstract or concrete), e.g. ``jax.eval_shape(model.init, ...)``.
  The result has the structure of the unboxed tree, ready for `shard_params` or out_shardings.
  """
  if isinstance(model_or_tree, nn.Module):
    tree = abstract_variables(model_or_tree, collection)
  else:
    tree = model_or_tree
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_box)
  unboxed = [l for _, l in leaves if not _is_box(l)]
  if unboxed:
    raise ValueError(f"{len(unboxed)} leaves carry no logical axis names (first: "
                     f"{path_str(next(p for p, l in leaves if not _is_box(l)))}); pass the "
                     "model or the boxed tree from model.init / jax.eval_shape")

  def one(path, box):
    logical = box.get_partition_spec()
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)
    spec = _fit(spec, tuple(box.value.shape), mesh, path_str(path), strict)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_box)


def shard_params(params: Any, shardings: Any) -> Any:
  """Places (or reshards) a plain param tree onto `shardings` (from `param_shardings`)."""
  return jax.device_put(params, shardings)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [batch, ...] arrays: batch split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """device_put of every [batch, ...] array in a tree with `data_sharding(mesh)`."""
  n = _mesh_size(mesh, BATCH_AXES)
  for path, x in jax.tree_util.tree_leaves_with_path(batch):
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      raise ValueError(f"{path_str(path) or 'batch'}: leading dimension {np.shape(x)[:1]} "
                       f"must be divisible by data x fsdp = {n}")
  return jax.device_put(batch, data_sharding(mesh))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
  """Makes `mesh` current and `rules` the logical axis rules, enabling activation constraints.

  Trace jitted functions inside this context: Flax reads the rules at trace time.
  """
  set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
  mesh_ctx = set_mesh(mesh) if set_mesh is not None else mesh
  with mesh_ctx, nn.logical_axis_rules(rules):
    yield mesh


def init_sharded_params(model: nn.Module, rng: jax.Array, mesh: Mesh,
                        rules: Rules = LOGICAL_RULES, *, strict: bool = False) -> Any:
  """Random params created directly in their sharding (plain arrays, boxes removed).

  Same values as `perl_jax.models.init_params(model, rng)`, never held on one device.
  """
  abstract = abstract_variables(model, "params")
  shardings = param_shardings(abstract, mesh, rules, strict=strict)
  tokens = jnp.zeros((1, 2), jnp.int32)

  def init(rng):
    return nn.meta.unbox(model.init(rng, tokens)["params"])

  # No activate(): out_shardings alone place the result; the init's forward pass is tiny.
  return jax.jit(init, out_shardings=shardings)(rng)


def init_sharded_adapters(model: nn.Module, params: Any, rng: jax.Array, mesh: Mesh,
                          rules: Rules = LOGICAL_RULES, *, strict: bool = False) -> Any:
  """LoRA adapters placed in their sharding; same values as `perl_jax.lora.init_adapters`.

  Drawn on the host (adapters are small next to the base) and put on the devices shard by shard.
  """
  check_targets(model.lora, params)  # as init_adapters: every pattern must select a kernel
  shardings = param_shardings(model, mesh, rules, collection="lora", strict=strict)
  return jax.device_put(fill_adapters(adapter_shapes(model, params, rng), rng), shardings)


def describe(shardings: Any) -> dict[str, P]:
  """{'layers_0/attn/q/kernel': P('fsdp', 'tensor', None), ...}: a flat view for logs and tests."""
  leaves = jax.tree_util.tree_leaves_with_path(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  return {path_str(p): s.spec for p, s in leaves}
