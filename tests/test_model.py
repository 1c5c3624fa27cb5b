"""Model core: KV-cache decode equals a full forward, padding invariance, axes, dtypes, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax.models import (FAMILIES, ModelConfig, Transformer, init_cache, init_params,
                             logical_axes, tiny_config)


def _tokens(cfg, b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, cfg.vocab_size, (b, t)), jnp.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefill_and_decode_equal_full_forward(family):
  cfg = tiny_config(family)  # gemma2: window 8 < 14 tokens, so the window is exercised
  model = Transformer(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  tokens = _tokens(cfg, 2, 14)
  mask = jnp.ones((2, 14), bool).at[0, :3].set(False)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, tokens, mask_BxT=mask)
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
  cache = init_cache(cfg, 2, 20)
  out, cache = apply({"params": params}, tokens[:, :6], positions[:, :6], mask[:, :6],
                     cache=cache)
  outs = [out]
  for i in range(6, 14):
    out, cache = apply({"params": params}, tokens[:, i:i + 1], positions[:, i:i + 1],
                       mask[:, i:i + 1], cache=cache)
    outs.append(out)
  assert int(cache["index"]) == 14
  decoded = jnp.concatenate(outs, axis=1)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_left_padding_does_not_change_real_positions(family):
  cfg = tiny_config(family)
  model = Transformer(cfg)
  params = init_params(model, jax.random.PRNGKey(1))
  tokens = _tokens(cfg, 1, 10, seed=2)
  alone = jax.jit(model.apply)({"params": params}, tokens)
  padded = jnp.concatenate([jnp.zeros((1, 5), jnp.int32), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 5), bool), jnp.ones((1, 10), bool)], axis=1)
  out = jax.jit(model.apply)({"params": params}, padded, mask_BxT=mask)
  assert np.all(np.isfinite(np.asarray(out)))  # fully masked pad rows stay finite
  np.testing.assert_allclose(np.asarray(out[:, 5:]), np.asarray(alone), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_param_has_logical_axes_and_count_matches_config(family):
  for head in ("lm", "scalar"):
    cfg = tiny_config(family, head=head)
    model = Transformer(cfg)
    axes = logical_axes(model)
    params = init_params(model, jax.random.PRNGKey(0))
    flat_axes = jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat_axes) == len(flat_params)
    for (path, spec), (_, p) in zip(flat_axes, flat_params):
      assert len(spec) == p.ndim and all(isinstance(a, str) for a in spec), (path, spec)
    assert sum(p.size for _, p in flat_params) == cfg.num_params()


@pytest.mark.parametrize("family,head", [(f, "lm") for f in FAMILIES] + [("llama", "scalar")])
def test_outputs_from_equals_slicing_the_full_outputs(family, head):
  """`outputs_from` also trims the last block to those positions (its keys and values still
  cover all): same outputs as slicing the full ones, with adapters, padding and, for the
  Gemma-2 config, a sliding-window last layer shorter than the sequence."""
  from perl_jax import lora

  extra = {"layer_types": ("full", "sliding")} if family == "gemma2" else {}
  cfg = tiny_config(family, head=head, **extra)
  model = Transformer(cfg, lora=lora.LoraConfig(rank=2, targets=lora.ALL_TARGETS))
  params = init_params(Transformer(cfg), jax.random.PRNGKey(0))
  adapters = jax.tree.map(lambda x: x + 0.05, lora.init_adapters(model, params,
                                                                 jax.random.PRNGKey(1)))
  variables = {"params": params, "lora": adapters}
  t = 13
  tokens = _tokens(cfg, 3, t)
  mask = jnp.ones((3, t), bool).at[1, :4].set(False).at[2, -3:].set(False)
  apply = jax.jit(model.apply, static_argnames="outputs_from")
  full = apply(variables, tokens, mask_BxT=mask)
  for start in (6, t - 1):  # a window of queries, and a single one
    tail = apply(variables, tokens, mask_BxT=mask, outputs_from=start)
    assert tail.shape == full[:, start:].shape
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, start:]), atol=2e-5,
                               rtol=2e-5)


def test_scalar_head_gives_one_value_per_token():
  cfg = tiny_config("llama", head="scalar")
  model = Transformer(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  values = jax.jit(model.apply)({"params": params}, _tokens(cfg, 3, 7))
  assert values.shape == (3, 7) and values.dtype == jnp.float32
  h = params["score"]["kernel"]
  assert h.shape == (cfg.embed_dim, 1)


def test_bfloat16_params_and_compute_close_to_float32():
  cfg32 = tiny_config("llama")
  cfg16 = cfg32.replace(dtype="bfloat16", param_dtype="bfloat16")
  params = init_params(Transformer(cfg32), jax.random.PRNGKey(0))
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  tokens = _tokens(cfg32, 2, 9)
  out32 = jax.jit(Transformer(cfg32).apply)({"params": params}, tokens)
  out16 = jax.jit(Transformer(cfg16).apply)({"params": params16}, tokens)
  assert out16.dtype == jnp.float32  # logits are always float32
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(
      init_params(Transformer(cfg16), jax.random.PRNGKey(0))))
  # bf16 has ~3 significant digits; logits here are O(1).
  np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), atol=5e-2)


def test_invalid_config_names_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny_config("llama", num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="rope_type"):
    tiny_config("llama", rope_type="yarn")
  with pytest.raises(ValueError, match="family"):
    ModelConfig(family="mamba", vocab_size=8, embed_dim=8, num_layers=1, num_heads=1,
                num_kv_heads=1, head_dim=8, mlp_dim=8)


def test_decode_without_positions_is_an_error():
  cfg = tiny_config("llama")
  model = Transformer(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="positions_BxT"):
    jax.jit(model.apply)({"params": params}, _tokens(cfg, 1, 2), cache=init_cache(cfg, 1, 4))


def test_rope_table_rows_equal_the_direct_computation():
  # The gathered-table path (positions known to lie in [0, L)) against cos/sin of every
  # position directly, and both against NumPy in float64 (HF's formula: cat(freqs, freqs)).
  from perl_jax.models.transformer import rope_cos_sin, rope_inv_freq

  inv = rope_inv_freq(tiny_config("llama"))
  rng = np.random.default_rng(0)
  b, t = 3, 11
  positions = rng.integers(0, t, (b, t)).astype(np.int32)
  table = rope_cos_sin(jnp.asarray(positions), inv, jnp.float32, num_positions=t)
  direct = rope_cos_sin(jnp.asarray(positions), inv, jnp.float32)
  angles = positions[..., None].astype(np.float64) * np.concatenate([inv, inv])[None, None]
  for got, want, fn in zip(table, direct, (np.cos, np.sin)):
    assert got.shape == (b, t, 1, 2 * len(inv))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the same float32 ops
    np.testing.assert_allclose(np.asarray(got)[:, :, 0], fn(angles), atol=2e-6)
