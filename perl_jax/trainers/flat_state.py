"""The trainable tree and its optimizer state as flat vectors, inside one jitted update.

Why
---
A LoRA trainable tree has many small leaves (an ``a`` and a ``b`` per adapted kernel: 56 for
a 4-layer model with adapters on every projection). Inside a jitted update every per-leaf
operation (Adam's moments, weight decay, the finiteness checks, the skip `lax.cond`, the
scan carry over minibatches) becomes its own group of HLO instructions: in PPO's policy
update they outnumbered the model's forward and backward pass, and XLA:CPU's compile memory
and the memory each compiled program keeps grow with that count. On one vector they are one
group each (PPO benchmark: 11,607 -> 6,270 instructions, peak RSS -55 MB, the same step time).

What
----
Only for a trainable tree on one device (`on_one_device`): under a multi-device mesh the
adapters and Adam's moments are sharded leaf by leaf (`perl_jax.sharding`), and one vector
would have to be gathered onto every device and lose those layouts.

`flatten` turns ``(trainable, opt_state)`` into ``(vector, flat opt_state)`` at the start of
the jitted function, and the returned `unflatten` turns them back at its end, so callers,
checkpoints and sharding layouts only ever see the usual trees. Inside, the loss still takes
the tree (`FlatLayout.unravel`, slices of the vector) and its gradient tree is raveled once.

The flat state is exactly the state the same optimizer builds for the vector
(``optimizer.init(vector)``): every sub-tree of ``opt_state`` shaped like the trainable tree
(Adam's ``mu`` and ``nu``) becomes one vector, everything else (step counts) is kept. This is
the same update as the tree form whenever the optimizer is elementwise apart from global
reductions (global-norm clipping): true of `common.make_optimizer`, not of per-leaf masks or
factored second moments, so `flatten` refuses optimizer states it cannot map. Trees whose
leaves differ in dtype are not flattened (a vector has one dtype) and take the tree path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any


@dataclasses.dataclass(frozen=True)
class FlatLayout:
  """Where each leaf of a tree sits in one vector (leaves in `jax.tree` order)."""

  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtype: Any

  @classmethod
  def of(cls, tree: Params) -> "FlatLayout | None":
    """The layout of `tree`, or None when it is not worth or not possible to flatten."""
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = {jnp.dtype(x.dtype) for x in leaves}
    if len(leaves) < 2 or len(dtypes) != 1:
      return None
    return cls(treedef, tuple(tuple(x.shape) for x in leaves), dtypes.pop())

  def matches(self, tree: Any) -> bool:
    leaves, treedef = jax.tree.flatten(tree)
    return (treedef == self.treedef
            and tuple(tuple(x.shape) for x in leaves) == self.shapes
            and all(jnp.dtype(x.dtype) == self.dtype for x in leaves))

  def ravel(self, tree: Params) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

  def unravel(self, vector: jax.Array) -> Params:
    sizes = [int(np.prod(s)) for s in self.shapes]
    offsets = np.cumsum([0] + sizes)
    leaves = [vector[int(o):int(o) + n].reshape(s)
              for o, n, s in zip(offsets[:-1], sizes, self.shapes)]
    return jax.tree.unflatten(self.treedef, leaves)


def on_one_device(tree: Params) -> bool:
  """True when every leaf of `tree` lives on a single device (and the same one)."""
  devices = set()
  for x in jax.tree.leaves(tree):
    sharding = getattr(x, "sharding", None)
    if sharding is None:  # a NumPy array: placed on the default device when passed to jit
      continue
    if sharding.num_devices > 1:  # also for shardings over an abstract mesh (the planner's)
      return False
    if not isinstance(getattr(sharding, "mesh", None), jax.sharding.AbstractMesh):
      devices |= set(sharding.device_set)  # an abstract mesh names no concrete device
  return len(devices) <= 1


def flatten(optimizer: optax.GradientTransformation, trainable: Params, opt_state: Any
            ) -> tuple[FlatLayout, jax.Array, Any, Callable[[jax.Array, Any], tuple]] | None:
  """(layout, vector, flat opt_state, unflatten) for a trainable tree, or None (see above).

  ``unflatten(vector, flat_opt_state)`` returns ``(trainable, opt_state)`` as trees of the
  input's structure. Call inside `jax.jit`: the conversions are concatenations and slices.
  """
  layout = FlatLayout.of(trainable)
  if layout is None:
    return None
  vector = layout.ravel(trainable)
  template = jax.eval_shape(optimizer.init, jax.ShapeDtypeStruct(vector.shape, vector.dtype))

  def to_flat(t, sub):
    if layout.matches(sub):
      return layout.ravel(sub)
    if jax.tree.structure(sub).num_leaves != 1 or jnp.shape(sub) != t.shape:
      raise ValueError(f"optimizer state {jax.tree.structure(sub)} does not map onto the flat "
                       f"state {t}: use the tree update for this optimizer")
    return sub

  flat_opt = jax.tree.map(to_flat, template, opt_state)

  def unflatten(vector: jax.Array, flat_opt_state: Any) -> tuple[Params, Any]:
    back = lambda f, sub: layout.unravel(f) if layout.matches(sub) else f
    return layout.unravel(vector), jax.tree.map(back, flat_opt_state, opt_state)

  return layout, vector, flat_opt, unflatten
