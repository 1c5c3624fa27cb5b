"""LoRA: a fresh adapter is a no-op, merge == unmerged, only adapters train, targeting is strict."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import lora
from perl_jax.models import FAMILIES, Transformer, init_params, tiny_config

TOL = 1e-5  # float32; merged vs unmerged differ only by summation order


def _batch(cfg, seed=0, b=3, t=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, :4] = False  # a left-padded row
  return jnp.asarray(tokens), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def _base_params(family):
  return init_params(Transformer(tiny_config(family)), jax.random.PRNGKey(0))


def _setup(family, targets=lora.ALL_TARGETS, rank=4, alpha=8.0, dropout=0.0):
  cfg = tiny_config(family)
  lcfg = lora.LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
  model = Transformer(cfg, lora=lcfg)
  params = _base_params(family)
  adapters = lora.init_adapters(model, params, jax.random.PRNGKey(1))
  return cfg, lcfg, model, params, adapters


def _apply(model, *args, **kwargs):
  return jax.jit(model.apply)(*args, **kwargs)


def _perturb(adapters, seed=3, scale=0.05):
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_changes_nothing_and_off_is_base(family):
  cfg, _, model, params, adapters = _setup(family)
  tokens, mask = _batch(cfg)
  base = _apply(Transformer(cfg), {"params": params}, tokens, mask_BxT=mask)
  with_fresh = _apply(model, {"params": params, "lora": adapters}, tokens, mask_BxT=mask)
  off = _apply(model, {"params": params}, tokens, mask_BxT=mask)
  np.testing.assert_array_equal(np.asarray(with_fresh), np.asarray(base))
  np.testing.assert_array_equal(np.asarray(off), np.asarray(base))
  # B starts at zero, A does not (otherwise no gradient could ever flow).
  for path, ab in lora._adapter_items(adapters):
    assert not np.any(np.asarray(ab["b"])), path
    assert np.std(np.asarray(ab["a"])) > 0, path


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged(family):
  cfg, lcfg, model, params, adapters = _setup(family)
  adapters = _perturb(adapters)
  tokens, mask = _batch(cfg, seed=1)
  unmerged = _apply(model, {"params": params, "lora": adapters}, tokens, mask_BxT=mask)
  merged = _apply(Transformer(cfg), {"params": lora.merge(params, adapters, lcfg)}, tokens,
                                  mask_BxT=mask)
  base = _apply(Transformer(cfg), {"params": params}, tokens, mask_BxT=mask)
  assert float(jnp.abs(unmerged - base).max()) > 1e-3  # the adapters do something
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=TOL, rtol=0)


def test_inference_variables_fold_float32_adapters_and_leave_16_bit_ones():
  cfg, lcfg, model, params, adapters = _setup("llama")
  adapters = _perturb(adapters)
  tokens, mask = _batch(cfg, seed=2)
  variables = {"params": params, "lora": adapters}
  folded = lora.inference_variables(variables, lcfg)
  assert set(folded) == {"params"}  # adapters are inside the kernels now
  np.testing.assert_allclose(
      np.asarray(_apply(model, folded, tokens, mask_BxT=mask)),
      np.asarray(_apply(model, variables, tokens, mask_BxT=mask)), atol=TOL, rtol=0)
  half = {"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), "lora": adapters}
  assert lora.inference_variables(half, lcfg) is half
  assert lora.inference_variables({"params": params}, lcfg)["params"] is params


def test_linear_matches_numpy_formula():
  """y = W x + (alpha / r) B A x on one projection, against NumPy."""
  cfg, lcfg, model, params, adapters = _setup("llama", targets=(r"layers_0/attn/q/kernel$",),
                                              rank=3, alpha=5.0)
  adapters = _perturb(adapters, scale=0.3)
  ab = adapters["layers_0"]["attn"]["q"]
  kernel = np.asarray(params["layers_0"]["attn"]["q"]["kernel"])  # D x N x H
  x = np.random.default_rng(0).normal(size=(2, 5, cfg.embed_dim)).astype(np.float32)
  a, b = np.asarray(ab["a"]), np.asarray(ab["b"])  # D x r, r x N x H
  expected = (np.einsum("btd,dnh->btnh", x, kernel) +
              (5.0 / 3) * np.einsum("btr,rnh->btnh", x @ a, b))
  from perl_jax.models import Linear
  layer = Linear((cfg.num_heads, cfg.head_dim), ("embed",), ("heads", "head_dim"), lora=lcfg)
  got = layer.apply({"params": {"kernel": kernel}, "lora": {"a": a, "b": b}}, x)
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_adapters():
  cfg, lcfg, model, params, adapters = _setup("qwen2")
  tokens, mask = _batch(cfg, seed=2)

  def loss_fn(adapters, params):
    logits = model.apply({"params": params, "lora": adapters}, tokens, mask_BxT=mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()

  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = grad_fn(adapters, params)
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(adapters)
  # With B = 0 the first gradient flows into every B (and none into A yet).
  for path, g in lora._adapter_items(grads):
    assert float(jnp.abs(g["b"]).max()) > 0, path
  opt = optax.adam(1e-2)
  state = opt.init(adapters)  # optimizer state exists for adapters only
  assert lora.count_params(state) == 2 * lora.count_params(adapters) + 1  # mu, nu, count
  base_before = jax.tree_util.tree_map(np.asarray, params)
  fresh = adapters
  for _ in range(3):
    grads = grad_fn(adapters, params)
    updates, state = opt.update(grads, state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  jax.tree_util.tree_map(np.testing.assert_array_equal, base_before,
                         jax.tree_util.tree_map(np.asarray, params))
  loss = jax.jit(loss_fn)
  assert loss(adapters, params) < loss(fresh, params)


def test_targets_select_paths_and_unmatched_pattern_is_an_error():
  _, _, _, _, adapters = _setup("llama", targets=lora.ATTENTION_TARGETS)
  paths = ["/".join(p) for p, _ in lora._adapter_items(adapters)]
  cfg = tiny_config("llama")
  assert sorted(paths) == sorted(f"layers_{i}/attn/{m}" for i in range(cfg.num_layers)
                                 for m in "qkvo")
  _, _, _, _, adapters = _setup("llama", targets=(r"layers_1/mlp/down/kernel$",))
  assert ["/".join(p) for p, _ in lora._adapter_items(adapters)] == ["layers_1/mlp/down"]
  with pytest.raises(ValueError, match=r"attn/qq_proj"):
    _setup("llama", targets=(r"attn/q/kernel", r"attn/qq_proj"))
  with pytest.raises(ValueError, match="not a valid regex"):
    lora.LoraConfig(targets=("attn/(q",))


def test_adapters_without_lora_config_is_an_error():
  cfg, _, _, params, adapters = _setup("llama")
  tokens, mask = _batch(cfg)
  with pytest.raises(ValueError, match="without lora=LoraConfig"):
    _apply(Transformer(cfg), {"params": params, "lora": adapters}, tokens, mask_BxT=mask)


def test_dropout_only_with_rng():
  cfg, _, model, params, adapters = _setup("llama", dropout=0.5)
  adapters = _perturb(adapters)
  tokens, mask = _batch(cfg)
  variables = {"params": params, "lora": adapters}
  plain = _apply(model, variables, tokens, mask_BxT=mask)
  again = _apply(model, variables, tokens, mask_BxT=mask)
  dropped = _apply(model, variables, tokens, mask_BxT=mask,
                        rngs={"lora_dropout": jax.random.PRNGKey(0)})
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(again))
  assert float(jnp.abs(dropped - plain).max()) > 1e-4


def test_counts():
  cfg, lcfg, _, params, adapters = _setup("gemma2", rank=4)
  d, h = cfg.embed_dim, cfg.head_dim
  n, k, f, r = cfg.num_heads, cfg.num_kv_heads, cfg.mlp_dim, 4
  per_layer = (r * (d + n * h) + r * (d + k * h) * 2 + r * (n * h + d) +  # q, k, v, o
               r * (d + f) * 2 + r * (f + d))  # gate, up, down
  assert lora.count_params(adapters) == cfg.num_layers * per_layer
  assert lora.count_params(params) == cfg.num_params()
  frac = lora.trainable_fraction(adapters, params)
  assert frac == pytest.approx(cfg.num_layers * per_layer / (cfg.num_layers * per_layer +
                                                              cfg.num_params()))


def test_adapted_matmul_value_and_gradients_match_numpy():
  rng = np.random.default_rng(4)
  x, w = rng.normal(0, 1, (7, 6)), rng.normal(0, 0.3, (6, 5))
  a, b, dy = rng.normal(0, 0.3, (6, 3)), rng.normal(0, 0.3, (3, 5)), rng.normal(0, 1, (7, 5))
  scale = 1.7
  f32 = lambda *xs: [jnp.asarray(v, jnp.float32) for v in xs]
  y, pull = jax.vjp(lambda *args: lora.adapted_matmul(*args, scale), *f32(x, w, a, b))
  dx, dw, da, db = pull(jnp.asarray(dy, jnp.float32))
  merged = w + scale * a @ b
  expected = dict(y=x @ merged, dx=dy @ merged.T, dw=x.T @ dy, da=scale * x.T @ dy @ b.T,
                  db=scale * (x @ a).T @ dy)
  for name, got in dict(y=y, dx=dx, dw=dw, da=da, db=db).items():
    np.testing.assert_allclose(np.asarray(got), expected[name], rtol=1e-5, atol=1e-5,
                               err_msg=name)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_adapter_gradients_equal_autodiff_through_the_merged_kernels(family):
  # The model's training path (lora.adapted_matmul's own backward pass) against plain autodiff
  # of the base model run on lora.merge(params, adapters).
  cfg, lcfg, model, params, adapters = _setup(family)
  adapters = _perturb(adapters, scale=0.2)
  tokens, mask = _batch(cfg, seed=5)

  def nll(logits):
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]).sum()

  adapted = jax.jit(jax.value_and_grad(
      lambda ad: nll(model.apply({"params": params, "lora": ad}, tokens, mask_BxT=mask))))
  reference = jax.jit(jax.value_and_grad(
      lambda ad: nll(Transformer(cfg).apply({"params": lora.merge(params, ad, lcfg)}, tokens,
                                            mask_BxT=mask))))
  (loss, grads), (ref_loss, ref_grads) = adapted(adapters), reference(adapters)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  for (path, g), (_, r) in zip(lora._adapter_items(grads), lora._adapter_items(ref_grads)):
    for k in ("a", "b"):
      np.testing.assert_allclose(np.asarray(g[k]), np.asarray(r[k]), rtol=1e-4, atol=1e-5,
                                 err_msg=f"{path}/{k}")


def test_adapter_init_is_seeded_and_scaled_by_fan_in():
  cfg, lcfg, model, params, adapters = _setup("llama", rank=16)
  again = lora.init_adapters(model, params, jax.random.PRNGKey(1))
  other = lora.init_adapters(model, params, jax.random.PRNGKey(2))
  jax.tree.map(np.testing.assert_array_equal, adapters, again)  # same key, same adapters
  a_values = []
  for (path, ab), (_, ab_other) in zip(lora._adapter_items(adapters),
                                       lora._adapter_items(other)):
    a = np.asarray(ab["a"])
    assert not np.array_equal(a, np.asarray(ab_other["a"])), path
    fan_in = int(np.prod(a.shape[:-1]))
    # N(0, 1/fan_in): the sample std of >= 512 draws is within 15% of fan_in ** -0.5.
    assert a.size >= 512 and abs(a.std() * fan_in ** 0.5 - 1) < 0.15, path
    a_values.append(a.ravel()[:8])
  assert len({v.tobytes() for v in a_values}) == len(a_values)  # adapters are not copies


def test_adapter_init_under_a_trace_and_an_active_mesh():
  """The planner evaluates model loading abstractly, and sharded trainers create adapters
  inside an active mesh: both must give the eager call's shapes, dtypes and distribution."""
  from perl_jax import sharding

  cfg, lcfg, model, params, adapters = _setup("llama", rank=16)
  expected = jax.tree.map(lambda x: (x.shape, x.dtype), adapters)
  abstract = jax.eval_shape(lambda r: lora.init_adapters(model, params, r), jax.random.PRNGKey(1))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == expected
  traced = jax.jit(lambda r: lora.init_adapters(model, params, r))(jax.random.PRNGKey(1))
  for (path, ab), (_, ab_eager) in zip(lora._adapter_items(traced),
                                       lora._adapter_items(adapters)):
    a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
    fan_in = int(np.prod(a.shape[:-1]))
    assert abs(a.std() * fan_in ** 0.5 - 1) < 0.15, path  # N(0, 1/fan_in), as eagerly
    np.testing.assert_array_equal(b, np.zeros_like(ab_eager["b"]))
  with sharding.activate(sharding.make_mesh(data=1)):
    shapes = lora.adapter_shapes(model, params, jax.random.PRNGKey(1))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == expected
