"""RL math against plain NumPy references (float64) on random inputs with ragged masks.

Every jitted function is compared with a loop-level NumPy reference written here, on random
data with ragged response lengths (including empty and full rows), garbage (even -inf/NaN) in
padding slots and fractional scores. Tolerance: float32 against float64, TOL = 1e-5 relative
and absolute unless a test says otherwise. Functions are jitted once at module level and
shapes are shared, so compilation stays cheap.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import rl

TOL = dict(rtol=1e-5, atol=1e-5)
B, T, V, N = 8, 11, 7, 4  # batch, response length, vocab, samples per prompt (B = 2 * N)


def _rng(seed):
  return np.random.default_rng(seed)


def _ragged_mask(rng, b=B, t=T):
  """Prefix masks with random lengths; row 0 empty, row 1 full, row 2 a single token."""
  lengths = rng.integers(1, t + 1, b)
  lengths[:3] = (0, t, 1)
  return np.arange(t)[None, :] < lengths[:, None]


def _holey_mask(rng, b=B, t=T):
  """Non-prefix masks (holes, leading padding) to check masked slots are skipped, not ends."""
  m = rng.random((b, t)) < 0.6
  m[0] = False
  m[1] = True
  return m


def _garbage(x, mask, value=np.nan):
  """x with `value` in the padding slots, to prove they never leak."""
  return np.where(mask, x, value).astype(np.float32)


def _close(actual, expected, **tol):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, **(tol or TOL))


# ------------------------------------------------------------------------------- NumPy refs


def np_masked_mean(x, m):
  m = np.asarray(m, np.float64)
  x = np.where(m != 0, x, 0.0)
  return float((x * m).sum() / m.sum()) if m.sum() > 0 else 0.0


def np_gae(rewards, values, mask, gamma, lam):
  """Textbook GAE on each row's real tokens only (compressed), scattered back."""
  adv = np.zeros(rewards.shape)
  ret = np.zeros(rewards.shape)
  for i in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[i])
    r, v = rewards[i, idx].astype(np.float64), values[i, idx].astype(np.float64)
    a, last = np.zeros(len(idx)), 0.0
    for k in reversed(range(len(idx))):
      next_v = v[k + 1] if k + 1 < len(idx) else 0.0
      last = r[k] + gamma * next_v - v[k] + gamma * lam * last
      a[k] = last
    adv[i, idx], ret[i, idx] = a, a + v
  return adv, ret


# ---------------------------------------------------------------------------------------- KL

_kl_penalty = jax.jit(rl.kl_penalty, static_argnames="kind")


@pytest.mark.parametrize("kind", rl.KL_KINDS)
def test_kl_estimators_match_numpy(kind):
  rng = _rng(0)
  mask = _ragged_mask(rng)
  lp = np.log(rng.uniform(0.01, 1, (B, T)))
  lr = np.log(rng.uniform(0.01, 1, (B, T)))
  log_r = lr - lp
  want = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}[kind]
  got = _kl_penalty(_garbage(lp, mask, -np.inf), _garbage(lr, mask, -np.inf), kind, mask)
  assert got.dtype == jnp.float32
  _close(got, np.where(mask, want, 0.0))
  unmasked = _kl_penalty(lp.astype(np.float32), lr.astype(np.float32), kind)
  _close(unmasked, want, rtol=1e-5, atol=2e-5)
  if kind != "k1":
    assert np.all(np.asarray(unmasked) >= 0)


def test_kl_estimators_are_unbiased_where_claimed():
  """Monte-Carlo: E_pi[k1] = E_pi[k3] = KL(pi || ref) for tokens drawn from pi."""
  rng = _rng(1)
  pi = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
  ref = np.array([0.2, 0.3, 0.2, 0.2, 0.1])
  exact = float(np.sum(pi * np.log(pi / ref)))
  tokens = rng.choice(5, size=(1, 200_000), p=pi)
  lp, lr = np.log(pi)[tokens].astype(np.float32), np.log(ref)[tokens].astype(np.float32)
  for kind in ("k1", "k3"):
    est = float(np.mean(np.asarray(_kl_penalty(lp, lr, kind))))
    assert abs(est - exact) < 0.01, (kind, est, exact)


def test_kl_penalty_rejects_unknown_kind():
  with pytest.raises(ValueError, match="k1"):
    rl.kl_penalty(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "k4")


def test_sequence_kl_sums_real_tokens():
  rng = _rng(2)
  mask = _ragged_mask(rng)
  kl = rng.normal(size=(B, T))
  _close(jax.jit(rl.sequence_kl)(_garbage(kl, mask), mask), np.where(mask, kl, 0).sum(1))


def np_adaptive(coef, kl, n_steps, target, horizon):
  error = np.clip(kl / target - 1, -0.2, 0.2)
  return coef * (1 + error * n_steps / horizon)


@jax.jit
def _kl_update(ctl, coef, kl, n_steps):  # the controller is a (leafless) pytree argument
  return ctl.update(coef, kl, n_steps)


def test_adaptive_kl_matches_formula_under_jit_and_scan():
  ctl = rl.AdaptiveKL(init=0.15, target=6.0, horizon=10_000)
  kls = np.array([0.0, 3.0, 5.7, 6.0, 6.6, 7.1, 50.0], np.float32)
  coef, want = ctl.init_state(), 0.15
  assert coef.dtype == jnp.float32 and coef.shape == ()
  for kl in kls:
    coef, want = _kl_update(ctl, coef, kl, 512), np_adaptive(want, float(kl), 512, 6.0, 10_000)
    _close(coef, want, rtol=1e-6)

  def body(c, kl):
    c = ctl.update(c, kl, 512)
    return c, c

  final, _ = jax.jit(lambda c, k: jax.lax.scan(body, c, k))(ctl.init_state(), kls)
  _close(final, want, rtol=1e-6)
  assert jax.tree_util.tree_leaves(ctl) == []  # hyperparameters are static metadata


def test_adaptive_kl_direction_and_clip():
  ctl = rl.AdaptiveKL(init=0.2, target=6.0, horizon=100)
  c0 = ctl.init_state()
  up = float(_kl_update(ctl, c0, 6.6, 10))  # error +0.1
  _close(up, 0.2 * (1 + 0.1 * 10 / 100), rtol=1e-6)
  down = float(_kl_update(ctl, c0, 5.4, 10))  # error -0.1
  _close(down, 0.2 * (1 - 0.1 * 10 / 100), rtol=1e-6)
  # Far above / below target: the error saturates at +-20%.
  _close(_kl_update(ctl, c0, 600.0, 10), 0.2 * (1 + 0.2 * 10 / 100), rtol=1e-6)
  _close(_kl_update(ctl, c0, 0.0, 10), 0.2 * (1 - 0.2 * 10 / 100), rtol=1e-6)
  _close(_kl_update(ctl, c0, 6.0, 10), 0.2, rtol=1e-6)  # on target: unchanged


def test_fixed_kl_never_moves():
  ctl = rl.FixedKL(0.05)
  coef = ctl.init_state()
  for kl in (0.0, 100.0):
    coef = _kl_update(ctl, coef, kl, 64)
  _close(coef, 0.05, rtol=1e-7)


# ------------------------------------------------------------------------------ advantages

_rewards = jax.jit(rl.per_token_rewards)


def np_per_token_rewards(score, kl, mask, coef):
  out = np.where(mask, -coef * kl, 0.0)
  for i in range(mask.shape[0]):
    idx = np.flatnonzero(mask[i])
    if len(idx):
      out[i, idx[-1]] += score[i]
  return out


@pytest.mark.parametrize("holey", [False, True])
def test_per_token_rewards_match_numpy(holey):
  rng = _rng(3)
  mask = _holey_mask(rng) if holey else _ragged_mask(rng)
  score = rng.uniform(-1, 1, B).round(2)  # fractional: 0.37, -0.81, ...
  kl = rng.normal(size=(B, T))
  got = _rewards(score.astype(np.float32), _garbage(kl, mask), mask, 0.05)
  assert got.dtype == jnp.float32
  _close(got, np_per_token_rewards(score, kl, mask, 0.05))


def test_per_token_rewards_keep_fractional_scores_with_integer_inputs():
  """The peer bug: a reward array in the token ids' int dtype truncates 0.3 to 0."""
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)  # int mask
  kl = np.zeros((2, 4), np.int32)  # int KL (as if built like the token ids)
  got = rl.per_token_rewards(np.array([0.3, -0.7]), kl, mask, 0.1)
  assert got.dtype == jnp.float32
  _close(got, [[0, 0, 0.3, 0], [0, -0.7, 0, 0]], rtol=1e-7)
  # Integer scores are promoted too, and the KL term stays fractional.
  got = rl.per_token_rewards(np.array([1, 0], np.int32), np.ones((2, 4), np.int32), mask, 0.25)
  _close(got, [[-0.25, -0.25, 0.75, 0], [-0.25, -0.25, 0, 0]], rtol=1e-7)


_gae = jax.jit(rl.gae)


@pytest.mark.parametrize("holey", [False, True])
def test_gae_matches_numpy(holey):
  rng = _rng(4)
  mask = _holey_mask(rng) if holey else _ragged_mask(rng)
  rewards = rng.normal(size=(B, T)) * 0.3
  values = rng.normal(size=(B, T))
  adv, ret = _gae(_garbage(rewards, mask), _garbage(values, mask, 1e6), mask, 0.99, 0.95)
  want_adv, want_ret = np_gae(rewards, values, mask, 0.99, 0.95)
  assert adv.dtype == ret.dtype == jnp.float32
  _close(adv, want_adv)
  _close(ret, want_ret)


def test_gae_lambda1_gamma1_is_reward_to_go_minus_value():
  rng = _rng(5)
  mask = _ragged_mask(rng)
  rewards = np.where(mask, rng.normal(size=(B, T)), 0.0)
  values = np.where(mask, rng.normal(size=(B, T)), 0.0)
  adv, ret = _gae(rewards.astype(np.float32), values.astype(np.float32), mask, 1.0, 1.0)
  to_go = np.cumsum(rewards[:, ::-1], axis=1)[:, ::-1]
  _close(adv, np.where(mask, to_go - values, 0.0))
  _close(ret, np.where(mask, to_go, 0.0))


def test_gae_lambda0_is_one_step_td():
  rng = _rng(6)
  mask = np.ones((B, T), bool)
  rewards, values = rng.normal(size=(2, B, T))
  adv, _ = _gae(rewards.astype(np.float32), values.astype(np.float32), mask, 0.9, 0.0)
  next_v = np.concatenate([values[:, 1:], np.zeros((B, 1))], axis=1)
  _close(adv, rewards + 0.9 * next_v - values)


_whiten = jax.jit(rl.whiten, static_argnames="shift_mean")


def np_whiten(x, mask, shift_mean):
  sel = x[mask]
  mean, var = sel.mean(), sel.var(ddof=1)
  out = (x - mean) / np.sqrt(var + 1e-8)
  return np.where(mask, out if shift_mean else out + mean, 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(shift_mean):
  rng = _rng(7)
  mask = _ragged_mask(rng)
  x = rng.normal(2.5, 3.0, (B, T))  # non-zero mean, so the shift matters
  got = _whiten(_garbage(x, mask), mask, shift_mean=shift_mean)
  _close(got, np_whiten(x, mask, shift_mean))
  out = np.asarray(got, np.float64)[mask]
  _close(out.std(ddof=1), 1.0)
  # TRL whitens rewards without shifting: their mean (the sign of the signal) survives.
  _close(out.mean(), 0.0 if shift_mean else x[mask].mean())


def test_clip_advantages():
  rng = _rng(8)
  mask = _ragged_mask(rng)
  a = rng.normal(size=(B, T))
  _close(rl.clip_advantages(a, 0.5), np.clip(a, -0.5, 0.5))
  _close(rl.clip_advantages(_garbage(a, mask), 0.5, mask), np.where(mask, np.clip(a, -.5, .5), 0))


def _per_seq(adv_BxT, mask):
  """Reads the per-sequence advantage back: constant over each row's real tokens."""
  adv = np.asarray(adv_BxT)
  for i in range(adv.shape[0]):
    assert np.all(adv[i, ~mask[i]] == 0)
    if mask[i].any():
      np.testing.assert_array_equal(adv[i, mask[i]], adv[i, mask[i]][0])
  return np.where(mask.any(1), adv.max(1, where=mask, initial=-np.inf), np.nan)


def test_reinforce_baseline():
  rng = _rng(9)
  mask = _ragged_mask(rng)
  score = rng.uniform(-1, 1, B)
  got = jax.jit(rl.reinforce_baseline_advantages)(score, mask)
  want = np.where(mask, (score - score.mean())[:, None], 0.0)
  _close(got, want)
  _per_seq(got, mask)
  baseline = rng.uniform(-1, 1, B)
  got = jax.jit(rl.reinforce_baseline_advantages)(score, mask, baseline)
  _close(got, np.where(mask, (score - baseline)[:, None], 0.0))


def np_rloo(score, n):
  out = np.zeros_like(score)
  for i in range(len(score) // n):
    g = score[i * n:(i + 1) * n]  # prompt-major rows
    for j in range(n):
      out[i * n + j] = g[j] - (g.sum() - g[j]) / (n - 1)
  return out


def test_rloo_matches_numpy_and_groups_sum_to_zero():
  rng = _rng(10)
  mask = np.ones((B, T), bool)
  mask[0, 5:] = mask[5, 2:] = False  # ragged but non-empty, to read every row back
  score = rng.uniform(-1, 1, B).round(3)
  got = jax.jit(rl.rloo_advantages, static_argnums=1)(score, N, mask)
  _close(got, np.where(mask, np_rloo(score, N)[:, None], 0.0))
  per_seq = _per_seq(got, mask)
  _close(per_seq.reshape(-1, N).sum(1), np.zeros(B // N))


def np_grpo(score, n, eps, scale):
  g = score.reshape(-1, n)
  out = g - g.mean(1, keepdims=True)
  if scale:
    out = out / (g.std(1, ddof=1, keepdims=True) + eps)
  return out.reshape(-1)


@pytest.mark.parametrize("scale", [True, False])
def test_grpo_matches_numpy(scale):
  rng = _rng(11)
  mask = _ragged_mask(rng)
  score = rng.uniform(0, 1, B).round(2)
  score[N:] = 0.4  # a group with identical scores gets 0, not NaN
  fn = jax.jit(rl.grpo_advantages, static_argnames=("n", "scale_by_std"))
  got = fn(score, n=N, mask_BxT=mask, scale_by_std=scale)
  want = np_grpo(score, N, 1e-4, scale)
  _close(got, np.where(mask, want[:, None], 0.0))
  assert np.all(np.asarray(got)[N:] == 0)


def test_group_estimators_check_group_size():
  mask = np.ones((6, 3), bool)
  with pytest.raises(ValueError, match="divide"):
    rl.rloo_advantages(np.zeros(6), 4, mask)
  with pytest.raises(ValueError, match=">= 2"):
    rl.grpo_advantages(np.zeros(6), 1, mask)


# ---------------------------------------------------------------------------------- losses


def test_masked_reductions():
  rng = _rng(12)
  mask = _ragged_mask(rng)
  x = rng.normal(size=(B, T))
  xg = _garbage(x, mask)  # NaN padding must not leak
  _close(rl.masked_mean(xg, mask), x[mask].mean())
  _close(rl.masked_sum(xg, mask, axis=-1), np.where(mask, x, 0).sum(1))
  rows = np.asarray(rl.masked_mean(xg, mask, axis=-1))
  _close(rows[1:], [x[i, mask[i]].mean() for i in range(1, B)])
  assert rows[0] == 0.0  # empty row: 0, not NaN
  _close(rl.masked_var(xg, mask), x[mask].var(ddof=1))
  _close(rl.masked_var(xg, mask, unbiased=False), x[mask].var())
  w = rng.uniform(0, 1, (B, T)) * mask  # float weights
  _close(rl.masked_mean(xg, w), np.average(x, weights=w))
  assert float(rl.masked_mean(xg, np.zeros((B, T)))) == 0.0
  g = jax.grad(lambda v: rl.masked_mean(v, np.zeros((B, T))))(jnp.ones((B, T)))
  assert np.all(np.isfinite(g))
  _close(rl.sequence_logprob(xg, mask), np.where(mask, x, 0).sum(1))


_policy_loss = jax.jit(rl.policy_loss)


def np_policy_loss(lp, old, adv, mask, eps, dual=None):
  logratio = lp - old
  ratio = np.exp(logratio)
  pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
  pg = np.maximum(pg1, pg2)
  if dual is not None:
    pg = np.where(adv < 0, np.minimum(pg, -dual * adv), pg)
  m = mask.astype(bool)
  r = ratio[m]
  return pg[m].mean(), {
      "approxkl": 0.5 * (logratio[m]**2).mean(), "clipfrac": (pg2 > pg1)[m].mean(),
      "ratio": r.mean(), "ratio_var": r.var()}


@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_matches_numpy(dual):
  rng = _rng(13)
  mask = _ragged_mask(rng)
  old = np.log(rng.uniform(0.05, 1, (B, T)))
  lp = old + rng.normal(0, 0.6, (B, T))  # ratios well outside [0.8, 1.2] for many tokens
  adv = rng.normal(size=(B, T))
  loss, metrics = _policy_loss(_garbage(lp, mask, -np.inf), _garbage(old, mask, -np.inf),
                               _garbage(adv, mask), mask, 0.2, dual)
  want, want_metrics = np_policy_loss(lp, old, adv, mask, 0.2, dual)
  _close(loss, want)
  for k, v in want_metrics.items():
    _close(metrics[k], v)
  assert 0.05 < float(metrics["clipfrac"]) < 0.95  # the test exercises both branches
  if dual is None:
    assert float(metrics["dual_clipfrac"]) == 0.0
  else:
    assert float(metrics["dual_clipfrac"]) > 0.0  # and the dual clip bites somewhere


def test_policy_loss_gradient_vanishes_only_where_clipping_helps():
  """PPO's clip stops the push only in the direction the advantage wants to move the ratio."""
  log_ratio = np.log([1.5, 0.5, 0.5, 1.5, 1.1, 0.9, 5.0])
  adv = np.array([1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0])
  # ratio > 1+eps, A > 0: clipped (no further increase) -> 0 gradient
  # ratio < 1-eps, A > 0: unclipped (should still go up) -> gradient
  # ratio < 1-eps, A < 0: clipped -> 0;   ratio > 1+eps, A < 0: unclipped -> gradient
  # inside the trust region: gradient;    with dual clip c=3, ratio 5, A < 0: bounded -> 0
  old = np.log(np.full((1, 7), 0.1))
  mask = np.ones((1, 7), bool)

  def grads(dual):
    f = lambda lp: _policy_loss(lp, old, adv[None], mask, 0.2, dual)[0]
    return np.asarray(jax.grad(f)(jnp.asarray(old + log_ratio[None], jnp.float32)))[0]

  g = grads(None)
  # -inf log-probs in padding slots give a finite gradient (0 there).
  pad = np.concatenate([old + log_ratio[None], [[-np.inf]]], 1).astype(np.float32)
  f = lambda lp: _policy_loss(lp, np.concatenate([old, [[-np.inf]]], 1), np.append(adv, 1)[None],
                              np.append(mask, False)[None], 0.2, None)[0]
  g_pad = np.asarray(jax.grad(f)(jnp.asarray(pad)))[0]
  assert np.all(np.isfinite(g_pad)) and g_pad[-1] == 0
  _close(g_pad[:-1], g, rtol=1e-6)
  np.testing.assert_array_equal(g[[0, 2]], 0.0)
  assert np.all(g[[1, 3, 4, 5, 6]] != 0)
  # d loss / d logp = -A * ratio / n on unclipped tokens: descent moves logp along A.
  _close(g[[1, 3, 4, 5, 6]], (-adv * np.exp(log_ratio) / 7)[[1, 3, 4, 5, 6]], rtol=1e-5)
  g_dual = grads(3.0)
  np.testing.assert_array_equal(g_dual[[0, 2, 6]], 0.0)
  _close(g_dual[[1, 3, 4, 5]], g[[1, 3, 4, 5]], rtol=1e-6)


def test_policy_loss_rejects_bad_dual_clip():
  with pytest.raises(ValueError, match="dual_clip"):
    rl.policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.ones((1, 2)),
                   0.2, dual_clip=0.9)


_value_loss = jax.jit(rl.value_loss)


def np_value_loss(v, old, ret, mask, eps):
  vc = old + np.clip(v - old, -eps, eps)
  e1, e2 = (v - ret)**2, (vc - ret)**2
  m = mask.astype(bool)
  return 0.5 * np.maximum(e1, e2)[m].mean(), (e2 > e1)[m].mean()


def test_value_loss_matches_numpy_and_large_clip_is_unclipped():
  rng = _rng(14)
  mask = _ragged_mask(rng)
  old = rng.normal(size=(B, T))
  v = old + rng.normal(0, 0.4, (B, T))
  ret = rng.normal(size=(B, T))
  args = (_garbage(v, mask), _garbage(old, mask), _garbage(ret, mask), mask)
  loss, metrics = _value_loss(*args, 0.2)
  want, want_clipfrac = np_value_loss(v, old, ret, mask, 0.2)
  _close(loss, want)
  _close(metrics["clipfrac"], want_clipfrac)
  assert 0 < want_clipfrac < 1
  loss, metrics = _value_loss(*args, 1e6)
  _close(loss, 0.5 * ((v - ret)**2)[mask].mean())
  assert float(metrics["clipfrac"]) == 0.0


_entropy = jax.jit(rl.entropy_from_logits)


def test_entropy_matches_numpy():
  rng = _rng(15)
  mask = _ragged_mask(rng)
  logits = rng.normal(0, 2, (B, T, V))
  logits[0, 0, :3] = -np.inf  # filtered tokens (top-k) contribute 0, not NaN
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), -1)
  _close(rl.token_entropy(logits.astype(np.float32)), h)
  _close(_entropy(logits.astype(np.float32), mask), h[mask].mean())
  _close(_entropy(np.zeros((1, 2, V), np.float32), np.ones((1, 2))), np.log(V))
  # An entropy bonus over top-k-filtered logits must have a finite gradient.
  g = jax.grad(lambda z: _entropy(z, mask))(jnp.asarray(logits, jnp.float32))
  assert np.all(np.isfinite(np.asarray(g)))


def np_log_sigmoid(x):
  return -np.logaddexp(0, -x)


def test_bt_loss_matches_numpy():
  rng = _rng(16)
  c, r = rng.normal(size=(2, B))
  r[0] = c[0]  # a tie counts 1/2
  margin = rng.uniform(0, 1, B)
  loss, metrics = jax.jit(rl.bt_loss)(c, r, margin, 0.01)
  bt = -np_log_sigmoid(c - r - margin).mean()
  _close(loss, bt + 0.01 * ((c + r)**2).mean())
  _close(metrics["bt"], bt)
  _close(metrics["accuracy"], ((c > r).sum() + 0.5) / B)
  _close(metrics["margin"], (c - r).mean())
  loss, _ = rl.bt_loss(c, r)
  _close(loss, -np_log_sigmoid(c - r).mean())
  big = rl.bt_loss(jnp.array([-100.0]), jnp.array([100.0]))[0]  # stable: no inf
  _close(big, 200.0)


def test_pointwise_loss_matches_numpy():
  rng = _rng(17)
  s = rng.normal(0, 3, B)
  y = np.array([1, 0, 1, 1, 0, 0.3, 0.8, 1])  # hard and soft labels
  loss, metrics = jax.jit(rl.pointwise_loss)(s, y)
  _close(loss, (-y * np_log_sigmoid(s) - (1 - y) * np_log_sigmoid(-s)).mean())
  _close(metrics["accuracy"], ((s > 0) == (y > 0.5)).mean())
  _close(rl.pointwise_loss(jnp.array([100.0]), jnp.array([0.0]))[0], 100.0)


def test_sft_loss_matches_numpy():
  rng = _rng(18)
  logits = rng.normal(0, 2, (B, T, V))
  tokens = rng.integers(0, V, (B, T))
  loss_mask = _ragged_mask(rng)[:, ::-1].copy()  # response at the end, prompt first
  loss, metrics = jax.jit(rl.sft_loss)(logits.astype(np.float32), tokens, loss_mask)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll, hits, n = 0.0, 0, 0
  for i in range(B):
    for t in range(1, T):  # logits at t - 1 predict token t
      if loss_mask[i, t]:
        nll -= logp[i, t - 1, tokens[i, t]]
        hits += int(np.argmax(logits[i, t - 1]) == tokens[i, t])
        n += 1
  _close(loss, nll / n)
  _close(metrics["perplexity"], np.exp(nll / n))
  _close(metrics["accuracy"], hits / n)


# ------------------------------------------------------------------------------- normalize

_update = jax.jit(lambda s, x, m: s.update(x, m))


def test_running_mean_std_matches_numpy_over_concatenated_batches():
  rng = _rng(19)
  stats, seen = rl.RunningMeanStd.create(), []
  for k in range(5):
    x = rng.normal(3.0, 2.0, (B, T))
    mask = _ragged_mask(rng)
    stats = _update(stats, _garbage(x, mask, np.inf), mask)
    seen.append(x[mask])
  allx = np.concatenate(seen)
  _close(stats.count, len(allx))
  _close(stats.mean, allx.mean())
  _close(stats.var, allx.var())
  _close(stats.std, allx.std())
  # An all-masked batch changes nothing.
  same = _update(stats, np.full((B, T), np.nan, np.float32), np.zeros((B, T), bool))
  for a, b in zip(same, stats):
    np.testing.assert_array_equal(a, b)


def test_running_mean_std_weights_vectors_and_unmasked():
  rng = _rng(20)
  # Float weights: the weighted mean/variance of everything seen.
  stats, xs, ws = rl.RunningMeanStd.create(), [], []
  for _ in range(3):
    x, w = rng.normal(size=B), rng.uniform(0, 2, B)
    stats = stats.update(x, w)
    xs.append(x), ws.append(w)
  x, w = np.concatenate(xs), np.concatenate(ws)
  mean = np.average(x, weights=w)
  _close(stats.mean, mean)
  _close(stats.var, np.average((x - mean)**2, weights=w))
  # Vector statistics over leading axes, no mask.
  stats, xs = rl.RunningMeanStd.create((3,)), []
  for n in (4, 1, 7):
    x = rng.normal(size=(n, 2, 3)) * [1, 5, 0.1]
    stats, _ = stats.update(x), xs.append(x.reshape(-1, 3))
  allx = np.concatenate(xs)
  _close(stats.mean, allx.mean(0))
  _close(stats.var, allx.var(0))
  with pytest.raises(ValueError, match="shape"):
    stats.update(np.zeros((4, 2)))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_normalize_and_clip(shift_mean):
  rng = _rng(21)
  x = rng.normal(4.0, 30.0, 64)
  stats = rl.RunningMeanStd.create().update(x)
  fn = jax.jit(rl.normalize_and_clip, static_argnames="shift_mean")
  got = fn(x, stats, 1.5, shift_mean=shift_mean)
  want = ((x - x.mean()) if shift_mean else x) / np.sqrt(x.var() + 1e-8)
  _close(got, np.clip(want, -1.5, 1.5))
  assert float(jnp.max(jnp.abs(got))) == pytest.approx(1.5)
  _close(fn(x, stats, None, shift_mean=shift_mean), want)
  # A fresh state is the identity.
  _close(rl.normalize_and_clip(x, rl.RunningMeanStd.create()), x)
