"""Where a trainer's arrays live: the mesh of `config.mesh`, and how each kind of array sits on it.

Design
------
* A `Layout` is a mesh plus the logical-axis rules (`perl_jax.sharding`). A trainer builds
  one from `config.mesh` (`Layout.from_config`) and hands it, as an argument, to everything
  that places arrays (`common.BaseCache`, `common.load_model`, `loop.run`). Nothing reads a
  global mesh, so a later per-phase layout (say, rollout and update on different meshes) is
  a second `Layout` and a reshard between them.
* Params: every frozen or trainable leaf gets the sharding its logical axis names resolve to,
  looked up by path in one table per model (`sharding.param_shardings` of its 'params' and
  'lora' collections). So a frozen base, LoRA adapters, a scalar head and a full fine-tuning
  copy all follow the same rules. Checkpoints go from host memory straight to their shards
  (`jax.device_put` of NumPy arrays); random weights are created in their shards
  (`sharding.init_sharded_params` / `init_sharded_adapters`: `eval_shape`, then
  ``jit(out_shardings=...)``).
* Optimizer state: `jax.eval_shape(optimizer.init)` gives its structure, `optax.tree_map_params`
  gives each param-shaped leaf (Adam's mu and nu) its param's sharding and replicates the rest
  (step counts), and ``jit(optimizer.init, out_shardings=...)`` creates it in place.
* Batches: [batch, ...] arrays split over ('data', 'fsdp') (`sharding.shard_batch`);
  `config.check_mesh` has already checked that the configured batch sizes divide.
* Small state (RNG keys, running statistics, the KL coefficient) is replicated: trainers run
  under `activate()`, where eager arrays are created replicated on the mesh and jitted code
  traced there gets the model's activation constraints.
* Donation: the jitted update steps donate trainable params and optimizer state
  (`common.make_train_step`, `ppo.make_update_fn`), so each device holds one copy of its shards.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, ContextManager, Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from perl_jax import sharding
from perl_jax.lora import path_str

log = logging.getLogger(__name__)

Params = Any


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and the logical-axis rules every array of one trainer phase is placed by."""

  mesh: Mesh
  rules: sharding.Rules = sharding.LOGICAL_RULES

  @classmethod
  def from_config(cls, c: Any, devices: Sequence[jax.Device] | None = None) -> Layout:
    """The layout of `config.mesh` (checked by `config.check_mesh`: a `ConfigError` names the
    key) over `devices` (default: all); a mesh smaller than the device count takes the first."""
    from perl_jax import config

    devices = list(jax.devices() if devices is None else devices)
    sizes, rules = config.check_mesh(c, len(devices))
    used = math.prod(sizes.values())
    if used < len(devices):
      log.warning("mesh %s uses %d of %d devices", sizes, used, len(devices))
    layout = cls(sharding.make_mesh(**sizes, devices=devices[:used]), rules)
    log.info("layout: %s", layout)
    return layout

  def __str__(self) -> str:
    return (" x ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
            + f" on {self.mesh.devices.size} {self.mesh.devices.flat[0].platform} device(s)")

  @property
  def batch_shards(self) -> int:
    """How many pieces a batch is split into: data x fsdp."""
    return math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)

  def activate(self) -> ContextManager[Mesh]:
    """Run (and trace) a phase inside this: activation constraints on, eager arrays replicated."""
    return sharding.activate(self.mesh, self.rules)

  # --- params --------------------------------------------------------------------------------

  def shardings(self, module: Any, tree: Params) -> Params:
    """NamedShardings for `tree` ({'params': ..., 'lora': ...}, any subset) of `module`."""
    table = _table(module, self.mesh, self.rules)

    def one(path, _):
      key = path_str(path)
      if key not in table:
        raise ValueError(f"{key}: not a parameter of this {module.cfg.family} model, so it has "
                         "no logical axis names to shard it by")
      return table[key]

    return jax.tree_util.tree_map_with_path(one, tree)

  def place(self, module: Any, tree: Params) -> Params:
    """`tree` (host NumPy or device arrays) on its shardings; a no-op for arrays already there."""
    return jax.device_put(tree, self.shardings(module, tree))

  def init_params(self, module: Any, rng: jax.Array) -> Params:
    """Random params created in their shards; equal to `models.init_params(module, rng)`."""
    return sharding.init_sharded_params(module, rng, self.mesh, self.rules)

  def init_adapters(self, module: Any, params: Params, rng: jax.Array) -> Params:
    """LoRA adapters created in their shards; equal to `lora.init_adapters(module, params, rng)`."""
    return sharding.init_sharded_adapters(module, params, rng, self.mesh, self.rules)

  def init_opt_state(self, optimizer: optax.GradientTransformation, trainable: Params) -> Any:
    """`optimizer.init(trainable)` created in place: moments sharded like their params, the
    rest replicated. `trainable` must already be placed."""
    param_shardings = jax.tree.map(lambda x: x.sharding, trainable)
    abstract = jax.eval_shape(optimizer.init, trainable)
    out = optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_shardings,
                                transform_non_params=lambda _: self.replicated)
    return jax.jit(optimizer.init, out_shardings=out)(trainable)

  # --- batches and small state ---------------------------------------------------------------

  def shard_batch(self, batch: Any) -> Any:
    """Every [batch, ...] leaf split over ('data', 'fsdp'); the leading size must divide."""
    return sharding.shard_batch(batch, self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)


@functools.lru_cache(maxsize=32)
def _table(module: Any, mesh: Mesh, rules: sharding.Rules) -> dict[str, NamedSharding]:
  """{'params/layers_0/attn/q/kernel': NamedSharding, 'lora/...': ...} of one model (traced
  with `eval_shape`, never compiled)."""
  collections = {"params": sharding.param_shardings(module, mesh, rules)}
  if module.lora is not None:
    collections["lora"] = sharding.param_shardings(module, mesh, rules, collection="lora")
  leaves = jax.tree_util.tree_leaves_with_path(
      collections, is_leaf=lambda x: isinstance(x, NamedSharding))
  return {path_str(p): s for p, s in leaves}
