"""Low-rank adapters (LoRA) as a separate parameter tree.

Design
------
A LoRA-adapted linear map computes ``y = W x + (alpha / r) * B (A x)`` with ``A`` of rank ``r``
and ``B`` initialised to zero, so a fresh adapter leaves the network unchanged.

* The adapters live in their own Flax variable collection, ``'lora'``, whose tree mirrors the
  ``'params'`` tree: the adapter of ``params['layers_0']['attn']['q']['kernel']`` is
  ``lora['layers_0']['attn']['q'] = {'a': ..., 'b': ...}``. A model call reads
  ``model.apply({'params': base, 'lora': adapters}, ...)``.
* Switching adapters off is leaving the collection out: ``model.apply({'params': base}, ...)``
  is bit-for-bit the base model. PPO uses this to get reference log-probs from the policy's
  own frozen weights, with no second copy of them (PERL).
* Which kernels get adapters is decided by regular expressions over parameter paths such as
  ``layers_3/attn/q/kernel`` (``re.search``). Every pattern must match at least one kernel.
* Adapters are declared by the layers themselves (``perl_jax.models.Linear``), because only
  the layer knows which kernel axes are inputs and which are outputs, and their logical axis
  names (``lora_rank`` plus the kernel's own) so they can be sharded like the kernel. The
  values are then drawn on the host (`fill_adapters`): tracing the layers gives the shapes
  with `jax.eval_shape`, and NumPy fills them. Compiling the layers' own initialisers instead
  cost a ~4 s, ~100 MB compile per model on CPU (one threefry per adapter), for a few
  hundred thousand random numbers.
* Only the adapter tree is trainable, so only it needs gradients and optimizer state; the
  frozen base is passed as a separate argument and never differentiated.
* Dropout on the adapter input is active only when the call supplies a ``'lora_dropout'``
  RNG, so evaluation and sampling are deterministic by default.
* Training multiplies by the merged kernel (`adapted_matmul`): ``x (W + s A B)`` forward and
  ``dy (W + s A B)^T`` backward are one matmul each, where autodiff of ``x W + s (x A) B``
  runs three. The adapter gradients are the same four thin products either way. Thin
  (rank-r) matmuls run far below the machine's matmul rate on CPU, so this took ~40% off the
  adapters' cost in a training step. Kernels stored in 16 bits, and dropout, keep the
  unmerged form (see `inference_variables` for the 16-bit reason).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = Any  # a nested dict of arrays

# Paths of the attention and MLP projections in perl_jax.models.Transformer.
ATTENTION_TARGETS = (r"attn/(q|k|v|o)/kernel$",)
MLP_TARGETS = (r"mlp/(gate|up|down)/kernel$",)
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Hyperparameters of the adapters. Frozen (hashable) so models can hold it as an attribute."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ATTENTION_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    if not self.targets:
      raise ValueError("lora.targets is empty: name at least one parameter-path regex")
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"lora.targets: {pattern!r} is not a valid regex: {e}") from e

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def targets_path(self, path: str) -> bool:
    return any(re.search(p, path) for p in self.targets)


def path_str(path: Sequence[Any]) -> str:
  """'layers_0/attn/q/kernel' from a jax tree path or a tuple of names."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


def kernel_paths(params: Params) -> list[str]:
  """Paths of every kernel in a param tree: the places an adapter can go."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [path_str(p) for p, _ in leaves if path_str(p).endswith("kernel")]


def check_targets(cfg: LoraConfig, params: Params) -> list[str]:
  """The kernel paths `cfg.targets` selects; an error names any pattern that selects nothing."""
  paths = kernel_paths(params)
  unmatched = [p for p in cfg.targets if not any(re.search(p, k) for k in paths)]
  if unmatched:
    examples = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    raise ValueError(f"lora.targets {unmatched} match no parameter. Kernels look like: {examples}")
  return [k for k in paths if cfg.targets_path(k)]


def adapter_creator(model: Any):
  """A function (params, rng) -> adapter tree with Flax logical-axis boxes, for `model`.

  The layers create their own adapters during a one-token forward pass with the 'lora'
  collection mutable, so shapes (A: in_dims + (r,), B: (r,) + out_dims) and axis names come
  from the kernels themselves and this works for every family. Wrap it in `jax.jit` (with
  `out_shardings` to create adapters directly in a sharding; see `perl_jax.sharding`) or in
  `jax.eval_shape` to get shapes without compute.
  """
  if model.lora is None:
    raise ValueError("LoRA adapters need a model constructed with lora=LoraConfig(...)")

  def create(params: Params, rng: jax.Array) -> Params:
    tokens = jnp.zeros((1, 1), jnp.int32)  # made in the trace: an eager array compiles a program
    _, variables = model.apply({"params": params}, tokens, rngs={"lora_init": rng}, mutable=["lora"])
    return variables["lora"]

  return create


def init_adapters(model: Any, params: Params, rng: jax.Array) -> Params:
  """Adapters for `model` (a Transformer built with `lora=LoraConfig(...)`) as plain arrays.

  A ~ N(0, 1/fan_in), B = 0. Every target pattern must select at least one kernel of `params`.
  """
  check_targets(model.lora, params)
  return jax.tree.map(jnp.asarray, fill_adapters(adapter_shapes(model, params, rng), rng))


def adapter_shapes(model: Any, params: Params, rng: jax.Array) -> Params:
  """The adapter tree of `model` as plain ShapeDtypeStructs (traced, nothing compiled)."""
  return strip_boxes(jax.eval_shape(adapter_creator(model), params, rng))


def strip_boxes(tree: Params) -> Params:
  """`tree` without Flax's metadata boxes, applying no sharding constraint.

  For abstract trees: Flax's unbox() constrains each leaf to its logical axes inside an active
  mesh/rules context, which is an error for a ShapeDtypeStruct outside a trace.
  """
  import flax.linen as nn  # local: this module's math needs no Flax

  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def fill_adapters(abstract: Params, rng: jax.Array) -> Params:
  """Values for an adapter tree of ShapeDtypeStructs: A ~ N(0, 1/fan_in), B = 0.

  Drawn on the host with NumPy: the draws depend only on `rng` and the tree (leaves in
  `jax.tree` order), so every process of a multi-host run makes the same adapters and can
  place them with `jax.device_put`. Under a trace (the planner's `jax.eval_shape`) the key has
  no value, so the same distribution is drawn with `jax.random` instead; only shapes matter
  there.
  """
  if isinstance(rng, jax.core.Tracer):
    keys = iter(jax.random.split(rng, len(jax.tree.leaves(abstract))))
    normal = lambda shape: jax.random.normal(next(keys), shape, jnp.float32)
    zeros = jnp.zeros
  else:
    gen = np.random.default_rng(np.asarray(jax.random.key_data(rng), np.uint32).ravel())
    normal = lambda shape: gen.standard_normal(shape, np.float32)
    zeros = np.zeros

  def fill(path, leaf):
    name = path_str(path).rsplit("/", 1)[-1]
    if name == "b":
      return zeros(leaf.shape, leaf.dtype)
    if name != "a":
      raise ValueError(f"unexpected leaf {path_str(path)!r} in an adapter tree")
    fan_in = int(np.prod(leaf.shape[:-1]))
    return (normal(leaf.shape) * np.float32(fan_in ** -0.5)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def unbox(tree: Params) -> Params:
  """Strips Flax's logical-partitioning boxes, leaving plain arrays."""
  import flax.linen as nn  # local: this module's math needs no Flax

  return nn.meta.unbox(tree)


def _adapter_items(adapters: Params) -> list[tuple[tuple[str, ...], dict]]:
  """(module path, {'a', 'b'}) for each adapted kernel."""
  out = []

  def walk(node, prefix):
    if isinstance(node, dict) and "a" in node and "b" in node:
      out.append((prefix, node))
      return
    for k, v in node.items():
      walk(v, prefix + (k,))

  walk(adapters, ())
  return out


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """The dense weight update scale * A @ B with A: in_dims + (r,), B: (r,) + out_dims."""
  return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge(params: Params, adapters: Params, cfg: LoraConfig) -> Params:
  """Returns params with every adapter folded into its kernel (the input trees are unchanged)."""
  merged = jax.tree_util.tree_map(lambda x: x, params)  # fresh containers, shared leaves
  for path, ab in _adapter_items(adapters):
    node = merged
    try:
      for k in path:
        node = node[k]
      kernel = node["kernel"]
    except KeyError as e:
      raise ValueError(f"adapter {'/'.join(path)} has no kernel in the base params") from e
    d = delta(ab["a"], ab["b"], cfg.scale)
    if d.shape != kernel.shape:
      raise ValueError(f"adapter {'/'.join(path)} gives shape {d.shape}, kernel is {kernel.shape}")
    node["kernel"] = (kernel.astype(jnp.float32) + d).astype(kernel.dtype)
  return merged


def inference_variables(variables: dict, cfg: LoraConfig | None) -> dict:
  """`variables` with the adapters folded into float32 kernels, for forward-only passes.

  Sampling and scoring need no adapter gradients, so one merge (a rank-r product per kernel)
  replaces a pair of thin matmuls per adapted layer and token. Kernels stored in 16-bit stay
  unmerged: rounding W + delta to bfloat16 would erase most of a small adapter update, and the
  sampled policy would drift from the one being trained.
  """
  adapters = variables.get("lora")
  if cfg is None or not adapters:
    return variables
  if any(x.dtype != jnp.float32 for x in jax.tree_util.tree_leaves(variables["params"])):
    return variables
  rest = {k: v for k, v in variables.items() if k not in ("params", "lora")}
  return {"params": merge(variables["params"], adapters, cfg), **rest}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def adapted_matmul(x_NxI: jax.Array, w_IxO: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array,
                   scale: float) -> jax.Array:
  """x (W + scale A B), the adapted linear map, with a hand-written backward pass.

  Forward and input gradient multiply by the merged kernel (one matmul each); the adapter
  gradients are dA = scale x^T (dy B^T) and dB = scale (x A)^T dy. The merge (a rank-r
  product, the size of W) is recomputed in the backward pass instead of being kept.
  dW = x^T dy is returned too: under `jax.jit` it is dead code unless W is differentiated.
  """
  return x_NxI @ merged_kernel(w_IxO, a_IxR, b_RxO, scale)


def merged_kernel(w_IxO: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array,
                  scale: float) -> jax.Array:
  return w_IxO + scale * (a_IxR @ b_RxO)


def _adapted_matmul_fwd(x, w, a, b, scale):
  return adapted_matmul(x, w, a, b, scale), (x, w, a, b)


def _adapted_matmul_bwd(scale, residuals, dy_NxO):
  x, w, a, b = residuals
  g_NxR = dy_NxO @ b.T
  # dA = x^T g computed as (g^T x)^T: XLA:CPU runs the [R, I] product 5-20x faster than the
  # [I, R] one (BUILD_NOTES), and the barrier stops XLA folding the transpose back into it.
  da_RxI = jax.lax.optimization_barrier(_contract_rows(g_NxR, x))
  return (dy_NxO @ merged_kernel(w, a, b, scale).T, x.T @ dy_NxO, scale * da_RxI.T,
          scale * _contract_rows(x @ a, dy_NxO))


def _contract_rows(u_NxP: jax.Array, v_NxQ: jax.Array) -> jax.Array:
  """u^T v, [P, Q], contracting the shared leading (token) axis without a transposed copy."""
  return jax.lax.dot_general(u_NxP, v_NxQ, (((0,), (0,)), ((), ())))


adapted_matmul.defvjp(_adapted_matmul_fwd, _adapted_matmul_bwd)


def count_params(tree: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def trainable_fraction(adapters: Params, base: Params) -> float:
  """Adapter parameters as a fraction of all parameters (base + adapters)."""
  n = count_params(adapters)
  return n / (n + count_params(base))
