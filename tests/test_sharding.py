"""Sharding: meshes, the logical rules table, and layout invariance of logits and samples.

Runs on the 8 host CPU devices set up in conftest.py. Every layout test also checks that the
params really are split (shard shapes), since a replicated run would match trivially.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from perl_jax import sharding
from perl_jax.lora import ALL_TARGETS, LoraConfig, init_adapters
from perl_jax.models import Transformer, init_params, tiny_config
from perl_jax.models import transformer as transformer_module



def test_conftest_provides_8_host_devices():
  # Every test below builds 8-device meshes; without them they must fail, never skip.
  assert jax.device_count() == 8

FSDP = dict(fsdp=8)
TENSOR4 = dict(fsdp=2, tensor=4)
TENSOR8 = dict(fsdp=1, tensor=8)
MIXED = dict(data=2, fsdp=2, tensor=2)
TOL = 1e-5


def _config(family: str, **overrides):
  # 8 query heads so tensor=8 splits them; 4 KV heads so tensor=8 must replicate those.
  return tiny_config(family, num_heads=8, num_kv_heads=4, **overrides)


def _prompts(batch: int = 8, length: int = 10, seed: int = 1):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 3, 128)
  mask = np.ones((batch, length), bool)
  mask[: batch // 2, :3] = False  # left padding on half the rows
  return tokens, jnp.asarray(mask)


def _shard_shape(x: jax.Array) -> tuple[int, ...]:
  return x.addressable_shards[0].data.shape


def _random_params(model: Transformer, seed: int = 0) -> dict:
  """Random params from numpy: no compiled `model.init` (it costs seconds on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(sharding.abstract_variables(model))

  def fill(path, x):
    noise = rng.normal(0.0, 0.1 if path[-1].key == "scale" else 0.05, x.shape)
    return jnp.asarray((1.0 if path[-1].key == "scale" else 0.0) + noise, x.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def llama():
  model = Transformer(_config("llama"))
  return model, _random_params(model)


# --- meshes ----------------------------------------------------------------------------------


def test_make_mesh_fills_the_free_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert dict(sharding.make_mesh(data=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(data=-1, fsdp=1, tensor=4).shape)["data"] == 2
  small = sharding.make_mesh(fsdp=2, tensor=2, devices=jax.devices()[:4])
  assert small.devices.size == 4
  # Auto axes: sharding follows inputs and constraints (make_mesh's default is Explicit).
  if hasattr(jax.sharding, "AxisType"):
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=3), "not divisible by 3"),
    (dict(data=2, fsdp=2, tensor=4), "data=2 x fsdp=2 x tensor=4 = 16 but there are 8 devices"),
    (dict(data=-1, fsdp=-1), "at most one may be -1"),
    (dict(tensor=0), "must be >= 1"),
])
def test_make_mesh_errors_name_the_sizes(sizes, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    sharding.make_mesh(**sizes)


# --- the rules table -------------------------------------------------------------------------


def test_rules_resolve_params_and_activations_without_reusing_a_mesh_axis():
  resolve = lambda names: nn.logical_to_mesh_axes(names, sharding.LOGICAL_RULES)
  # Params: embed on fsdp, the "wide" axes on tensor.
  assert resolve(("embed", "heads", "head_dim")) == P("fsdp", "tensor", None)
  assert resolve(("vocab", "embed")) == P("tensor", "fsdp")
  assert resolve(("embed", "lora_rank")) == P("fsdp", None)
  # Activations: batch takes ('data', 'fsdp') first, so embed stays unsharded.
  assert resolve(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
  assert resolve(("batch", "cache_length", "kv_heads", "head_dim")) == P(
      ("data", "fsdp"), None, "tensor", None)


def test_every_model_constraint_resolves_to_distinct_mesh_axes(llama, monkeypatch):
  """Records each constrain() the model makes (with and without a cache) and resolves it."""
  model, params = llama
  seen = set()
  original = transformer_module.constrain

  def record(x, axes):
    seen.add(tuple(axes))
    return original(x, axes)

  monkeypatch.setattr(transformer_module, "constrain", record)
  cache = transformer_module.init_cache(model.cfg, 8, 6)
  tokens, mask = _prompts(length=4)
  with sharding.activate(sharding.make_mesh(**MIXED)):
    jax.eval_shape(lambda p, c: model.apply({"params": p}, tokens, jnp.zeros((8, 4), jnp.int32),
                                            mask, cache=c), params, cache)
  assert ("batch", "length", "embed") in seen
  assert ("batch", "cache_length", "kv_heads", "head_dim") in seen
  for axes in seen:
    spec = nn.logical_to_mesh_axes(axes, sharding.LOGICAL_RULES)
    used = [a for entry in spec if entry is not None
            for a in ((entry,) if isinstance(entry, str) else entry)]
    assert len(used) == len(set(used)), (axes, spec)
    assert spec[0] == ("data", "fsdp"), (axes, spec)  # every activation splits its batch


def test_activate_turns_constraints_on_inside_jit(llama):
  model, params = llama
  mesh = sharding.make_mesh(**MIXED)
  tokens = jnp.zeros((8, 4), jnp.int32)
  lower = lambda: jax.jit(model.apply).lower({"params": params}, tokens).as_text()
  assert "sharding_constraint" not in lower()
  with sharding.activate(mesh):
    text = lower()
  assert text.count("sharding_constraint") >= 2 * model.cfg.num_layers
  assert '[{"data", "fsdp"}, {}, {}]' in text  # the (batch, length, embed) residual stream


# --- param shardings -------------------------------------------------------------------------


@pytest.mark.parametrize("layout, q_shard, down_shard, embedding_shard", [
    (FSDP, (8, 8, 16), (128, 8), (128, 8)),
    (TENSOR4, (32, 2, 16), (32, 32), (32, 32)),
    (MIXED, (32, 4, 16), (64, 32), (64, 32)),
])
def test_params_are_really_sharded(llama, layout, q_shard, down_shard, embedding_shard):
  model, params = llama
  mesh = sharding.make_mesh(**layout)
  shardings = sharding.param_shardings(model, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(params)
  placed = sharding.shard_params(params, shardings)
  layer = placed["layers_0"]
  assert layer["attn"]["q"]["kernel"].shape == (64, 8, 16)
  assert _shard_shape(layer["attn"]["q"]["kernel"]) == q_shard
  assert _shard_shape(layer["mlp"]["down"]["kernel"]) == down_shard  # (mlp=128, embed=64)
  assert _shard_shape(placed["embed"]["embedding"]) == embedding_shard  # (vocab=128, embed=64)
  # Each device holds 1 / (fsdp * tensor) of the weights (norm scales only 1 / fsdp).
  full = sum(x.size for x in jax.tree.leaves(params))
  local = sum(np.prod(_shard_shape(x)) for x in jax.tree.leaves(placed))
  split = mesh.shape["fsdp"] * mesh.shape["tensor"]
  assert local <= 1.05 * full / split


def test_indivisible_dims_are_replicated_or_rejected(llama):
  model, _ = llama
  mesh = sharding.make_mesh(**TENSOR8)  # 8 query heads split, 4 KV heads cannot be
  specs = sharding.describe(sharding.param_shardings(model, mesh))
  assert specs["layers_0/attn/q/kernel"] == P('fsdp', 'tensor', None)
  assert specs["layers_0/attn/k/kernel"] == P('fsdp', None, None)
  with pytest.raises(ValueError, match=r"layers_0/attn/k/kernel.*size 4.*tensor"):
    sharding.param_shardings(model, mesh, strict=True)
  # A multi-axis rule keeps the longest prefix that divides: 12 = 4 * 3 fits data=4, not 4 x 2.
  odd = Transformer(tiny_config("llama", embed_dim=12))
  rules = (("embed", ("data", "fsdp")),) + sharding.LOGICAL_RULES[1:]
  specs = sharding.describe(sharding.param_shardings(odd, sharding.make_mesh(data=4, fsdp=2),
                                                     rules))
  assert specs["final_norm/scale"] == P('data',)


def test_param_shardings_needs_logical_names(llama):
  model, params = llama
  with pytest.raises(ValueError, match="carry no logical axis names"):
    sharding.param_shardings(params, sharding.make_mesh())


def test_shard_batch_checks_the_batch_size():
  mesh = sharding.make_mesh(**MIXED)
  placed = sharding.shard_batch({"tokens": jnp.zeros((8, 3), jnp.int32)}, mesh)
  assert _shard_shape(placed["tokens"]) == (2, 3)
  with pytest.raises(ValueError, match="tokens.*divisible by data x fsdp = 4"):
    sharding.shard_batch({"tokens": jnp.zeros((6, 3), jnp.int32)}, mesh)


def test_init_sharded_params_matches_init_params():
  model = Transformer(_config("llama", num_layers=1))  # init compiles slowly on CPU
  mesh = sharding.make_mesh(**MIXED)
  placed = sharding.init_sharded_params(model, jax.random.PRNGKey(0), mesh)
  expected = sharding.param_shardings(model, mesh)
  jax.tree.map(assert_sharded_as, placed, expected)
  jax.tree.map(np.testing.assert_array_equal, placed, init_params(model, jax.random.PRNGKey(0)))
  assert _shard_shape(placed["lm_head"]["kernel"]) == (32, 64)


def assert_sharded_as(x: jax.Array, s: jax.sharding.NamedSharding):
  assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)


# --- layouts give the same numbers as one device ----------------------------------------------


@pytest.mark.parametrize("family, layouts", [
    ("llama", (FSDP, TENSOR4, MIXED)),
    ("gemma2", (FSDP, TENSOR8, MIXED)),  # tied embeddings, softcaps, sliding window
])
def test_logits_match_one_device(family, layouts):
  model = Transformer(_config(family))
  params = _random_params(model)
  tokens, mask = _prompts()
  expected = jax.jit(model.apply)({"params": params}, tokens, mask_BxT=mask)
  for layout in layouts:
    mesh = sharding.make_mesh(**layout)
    with sharding.activate(mesh):
      placed = sharding.shard_params(params, sharding.param_shardings(model, mesh))
      logits = jax.jit(model.apply)({"params": placed}, sharding.shard_batch(tokens, mesh),
                                    mask_BxT=sharding.shard_batch(mask, mesh))
    assert _shard_shape(placed["layers_0"]["attn"]["q"]["kernel"])[1] == 8 // mesh.shape["tensor"]
    np.testing.assert_allclose(logits, expected, atol=TOL, rtol=TOL, err_msg=str(layout))


def test_lora_adapters_shard_like_their_kernels(llama):
  _, params = llama
  model = Transformer(_config("llama"), lora=LoraConfig(rank=4, targets=ALL_TARGETS))
  mesh = sharding.make_mesh(**MIXED)
  specs = sharding.describe(sharding.param_shardings(model, mesh, collection="lora"))
  assert specs["layers_0/attn/q/a"] == P('fsdp', None)
  assert specs["layers_0/attn/q/b"] == P(None, 'tensor', None)
  assert specs["layers_0/attn/o/a"] == P('tensor', None, None)
  assert specs["layers_0/mlp/down/b"] == P(None, 'fsdp')

  adapters = sharding.init_sharded_adapters(model, params, jax.random.PRNGKey(3), mesh)
  jax.tree.map(np.testing.assert_array_equal, adapters,
               init_adapters(model, params, jax.random.PRNGKey(3)))
  assert _shard_shape(adapters["layers_0"]["attn"]["q"]["b"]) == (4, 4, 16)

  # Non-zero B (fresh adapters are a no-op); sharded and one-device runs must agree.
  rng = np.random.default_rng(4)
  adapters = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(np.float32),
                          jax.device_get(adapters))
  tokens, mask = _prompts()
  expected = jax.jit(model.apply)({"params": params, "lora": adapters}, tokens, mask_BxT=mask)
  with sharding.activate(mesh):
    variables = {
        "params": sharding.shard_params(params, sharding.param_shardings(model, mesh)),
        "lora": sharding.shard_params(
            adapters, sharding.param_shardings(model, mesh, collection="lora")),
    }
    logits = jax.jit(model.apply)(variables, sharding.shard_batch(tokens, mesh),
                                  mask_BxT=sharding.shard_batch(mask, mesh))
  np.testing.assert_allclose(logits, expected, atol=TOL, rtol=TOL)


# --- sampling --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [FSDP, MIXED])
def test_sampled_tokens_match_one_device(llama, layout):
  sampling = pytest.importorskip("perl_jax.sampling")
  model, params = llama
  cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, num_samples=2)
  tokens, mask = _prompts(length=6)
  args = dict(eos_ids=(2,), pad_id=0)
  expected = sampling.sample(model, {"params": params}, tokens, mask, jax.random.PRNGKey(2),
                             cfg, **args)
  mesh = sharding.make_mesh(**layout)
  with sharding.activate(mesh):
    placed = sharding.shard_params(params, sharding.param_shardings(model, mesh))
    out = sampling.sample(model, {"params": placed}, sharding.shard_batch(tokens, mesh),
                          sharding.shard_batch(mask, mesh), jax.random.PRNGKey(2), cfg, **args)
  assert _shard_shape(placed["lm_head"]["kernel"])[0] == 64 // mesh.shape["fsdp"]
  assert len(np.unique(np.asarray(expected.tokens))) > 20  # really sampled, not a constant
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.mask, expected.mask)
  np.testing.assert_allclose(out.logprobs, expected.logprobs, atol=TOL, rtol=TOL)
