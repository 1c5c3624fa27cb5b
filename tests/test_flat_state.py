"""Flat trainable/optimizer state (`perl_jax.trainers.flat_state`) and PPO's epoch built on it.

The reference is the tree form: optax applied leaf by leaf to the trainable tree, one
minibatch at a time in plain Python.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax.trainers import common, flat_state, ppo


def _tree(rng: np.random.Generator, dtype=np.float32) -> dict:
  return {"layer_0": {"a": rng.standard_normal((5, 3)).astype(dtype),
                      "b": rng.standard_normal((3, 4)).astype(dtype)},
          "head": {"kernel": rng.standard_normal((4, 1)).astype(dtype),
                   "bias": rng.standard_normal((1,)).astype(np.float32)}}


def _optimizer() -> optax.GradientTransformation:
  c = types.SimpleNamespace(lr=1e-2, warmup_steps=3, b1=0.9, b2=0.99, eps=1e-8,
                            weight_decay=0.1, max_grad_norm=0.5)
  return common.make_optimizer(c)


def _stepped(opt, params, rng: np.random.Generator):
  """An optimizer state two steps in, so Adam's moments are not zero."""
  state = opt.init(params)
  for _ in range(2):
    _, state = opt.update(jax.tree.map(jnp.asarray, _tree(rng)), state, params)
  return state


def _close(a, b, tol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_round_trip_and_steps_match_the_tree_optimizer():
  rng = np.random.default_rng(0)
  opt = _optimizer()
  params = jax.tree.map(jnp.asarray, _tree(rng))
  state = _stepped(opt, params, rng)
  layout, vector, flat_opt, unflatten = flat_state.flatten(opt, params, state)
  assert vector.shape == (5 * 3 + 3 * 4 + 4 + 1,)
  back_params, back_state = unflatten(vector, flat_opt)
  assert jax.tree.structure(back_params) == jax.tree.structure(params)
  assert jax.tree.structure(back_state) == jax.tree.structure(state)
  _close(back_params, params, 0)
  _close(back_state, state, 0)

  tree_p, tree_s = params, state
  for _ in range(5):  # past warm-up, with clipping active (gradients of norm >> 0.5)
    grads = jax.tree.map(jnp.asarray, _tree(rng))
    updates, tree_s = opt.update(grads, tree_s, tree_p)
    tree_p = optax.apply_updates(tree_p, updates)
    updates, flat_opt = opt.update(layout.ravel(grads), flat_opt, vector)
    vector = optax.apply_updates(vector, updates)
  flat_p, flat_s = unflatten(vector, flat_opt)
  _close(flat_p, tree_p)
  _close(flat_s, tree_s)
  assert not np.allclose(np.asarray(flat_p["head"]["bias"]), np.asarray(params["head"]["bias"]))


def test_mixed_dtypes_and_unmappable_states_are_not_flattened():
  rng = np.random.default_rng(1)
  mixed = jax.tree.map(jnp.asarray, _tree(rng))
  mixed["layer_0"]["a"] = mixed["layer_0"]["a"].astype(jnp.bfloat16)
  assert flat_state.flatten(_optimizer(), mixed, _optimizer().init(mixed)) is None
  single = {"w": jnp.ones((3,))}
  assert flat_state.flatten(_optimizer(), single, _optimizer().init(single)) is None
  # Adafactor factors the second moment of each matrix: its state has no flat equivalent.
  params = jax.tree.map(jnp.asarray, _tree(rng))
  fac = optax.adafactor(1e-2, min_dim_size_to_factor=2)
  with pytest.raises(ValueError, match="does not map onto the flat state"):
    flat_state.flatten(fac, params, fac.init(params))


def test_ppo_epoch_equals_minibatch_steps_on_the_tree():
  """`ppo._minibatch_epoch` (flat inside) against optax on the tree, minibatch by minibatch,
  with gradient accumulation, a skipped non-finite minibatch and the mean metrics."""
  rng = np.random.default_rng(2)
  opt = _optimizer()
  p = types.SimpleNamespace(num_minibatches=3, grad_accum=2)
  b = 12
  x = rng.standard_normal((b, 5)).astype(np.float32)
  y = rng.standard_normal((b, 1)).astype(np.float32)

  def loss_fn(trainable, frozen, mb, key):
    h = jnp.tanh(mb["x"] @ trainable["layer_0"]["a"] @ trainable["layer_0"]["b"])
    pred = h @ trainable["head"]["kernel"] * frozen["gain"] + trainable["head"]["bias"]
    noise = 1e-3 * jax.random.normal(key, ())  # the per-microbatch key reaches the loss
    loss = jnp.mean((pred - mb["y"]) ** 2) + noise
    return loss, {"loss/total": loss}

  frozen = {"gain": jnp.float32(1.5)}
  params = jax.tree.map(jnp.asarray, _tree(rng))
  data = {"tokens": jnp.zeros((b, 1), jnp.int32), "x": jnp.asarray(x), "y": jnp.asarray(y)}
  data_bad = dict(data, y=data["y"].at[0, 0].set(jnp.nan))  # one minibatch goes non-finite
  epoch = ppo._minibatch_epoch(loss_fn, opt, p, "grad_norm")
  rng_key = jax.random.PRNGKey(7)

  for d in (data, data_bad):
    state = ppo.TrainState(params, _stepped(opt, params, rng))
    copy = jax.tree.map(jnp.array, state)  # the epoch donates its state
    new, metrics, flags = epoch(copy, frozen, d, rng_key)

    # Reference: the epoch's own recipe, written out on the tree.
    perm_rng, step_rng = jax.random.split(rng_key)
    perm = np.asarray(jax.random.permutation(perm_rng, b))
    keys = jax.random.split(step_rng, p.num_minibatches)
    tp, ts = state
    losses, applied, bad = [], [], []
    for m in range(p.num_minibatches):
      rows = perm[m * 4:(m + 1) * 4]
      micro_keys = jax.random.split(keys[m], p.grad_accum)
      grads, loss = None, 0.0
      for k in range(p.grad_accum):
        mb = {key: d[key][rows[k * 2:(k + 1) * 2]] for key in ("x", "y")}
        (l, _), g = jax.value_and_grad(loss_fn, has_aux=True)(tp, frozen, mb, micro_keys[k])
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        loss += l
      grads = jax.tree.map(lambda v: v / p.grad_accum, grads)
      loss /= p.grad_accum
      finite = bool(np.isfinite(loss)) and all(np.isfinite(np.asarray(v)).all()
                                               for v in jax.tree.leaves(grads))
      bad.append(0.0 if finite else 1.0)
      if finite:
        updates, ts = opt.update(grads, ts, tp)
        tp = optax.apply_updates(tp, updates)
        losses.append(float(loss))
    _close(new.trainable, tp, 1e-5)
    _close(new.opt_state, ts, 1e-5)
    np.testing.assert_array_equal(np.asarray(flags["nonfinite/any"]), bad)
    np.testing.assert_allclose(float(metrics["loss/total"]), np.mean(losses), rtol=1e-5)
  assert sum(bad) == 1  # the second pass did skip exactly one minibatch


def test_only_trees_on_one_device_are_flattened():
  from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

  devices = jax.devices()
  assert len(devices) == 8  # tests/conftest.py: 8 host devices
  one = {"a": jnp.ones((8, 2)), "b": np.ones((2,), np.float32)}
  assert flat_state.on_one_device(one)
  spread = dict(one, c=jax.device_put(one["a"], devices[1]))  # each leaf whole, two devices
  assert not flat_state.on_one_device(spread)
  mesh = Mesh(np.asarray(devices).reshape(8), ("fsdp",))
  sharded = dict(one, a=jax.device_put(one["a"], NamedSharding(mesh, P("fsdp"))))
  assert not flat_state.on_one_device(sharded)
  # The planner's arguments: shapes with shardings over an abstract (device-less) mesh.
  for size, expected in ((1, True), (4, False)):
    abstract = NamedSharding(AbstractMesh((size,), ("fsdp",)), P())
    assert flat_state.on_one_device(
        {"a": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=abstract)}) is expected
