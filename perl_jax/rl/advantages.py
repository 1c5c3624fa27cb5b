"""Per-token rewards and advantage estimators: GAE for PPO, critic-free REINFORCE/RLOO/GRPO.

Design
------
* Shapes: ``[B, T]`` tensors are aligned with the RESPONSE tokens; ``mask_BxT`` (bool or
  float) is non-zero on real response tokens. Masks are usually a prefix per row (responses
  are right-padded after EOS) but nothing here needs that: masked positions are simply not
  steps of the trajectory. Per-sequence scores are ``[B]``.
* Dtypes: every output is float32 whatever the inputs. A JAX peer built its reward array
  with the dtype of the token ids, so every score below 1 became 0 and only the KL term
  trained the policy; here scores are cast to float32 before anything else.
* Outputs are exactly 0 at masked positions, so they can be summed or averaged over ``[B, T]``
  without another mask.

Rewards (N implementation details of RLHF with PPO, TRL): ``-kl_coef * kl`` on every response
token, plus the reward-model score at the LAST real response token. Any missing-EOS penalty
is applied to the score before it gets here.

GAE (Schulman et al. 2016) runs as a `lax.scan` in reverse over time. The value after the
last real token is 0 (episodes end with the response); masked positions are skipped: their
rewards and values are ignored and the recursion passes over them. Returns are
``advantages + values`` on real tokens (the critic's regression target). Defaults follow TRL:
gamma 1, lambda 0.95.

Whitening (TRL): rewards are whitened WITHOUT shifting the mean (``shift_mean=False``: only
their scale changes, so the sign of the reward signal is kept); advantages WITH the shift.
Statistics are the masked mean and the unbiased masked variance over the whole batch.

Critic-free estimators turn per-sequence scores into one advantage per sequence and
broadcast it over the response tokens (every token of a response shares its return; with
no per-token KL in the reward these are the usual REINFORCE-style estimators). Groups are
prompt-major, as `perl_jax.sampling` fans out: row ``i * n + j`` is sample j of prompt i.
* REINFORCE with baseline: ``score - baseline`` (the batch mean by default).
* RLOO (Ahmadian et al. 2024): ``s_j - mean_{k != j} s_k``, which equals
  ``n / (n - 1) * (s_j - mean_k s_k)``; a group's advantages sum to 0.
* GRPO (Shao et al. 2024): ``(s_j - mean) / (std + eps)`` within each group, std with
  Bessel's correction as TRL (``scale_by_std=False`` gives the Dr. GRPO variant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from perl_jax.rl.losses import masked_mean, masked_var


def _f32(x) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def last_token_mask(mask_BxT: jax.Array) -> jax.Array:
  """Bool [B, T]: True at the last real (non-zero) position of each row; all False if none."""
  on = jnp.asarray(mask_BxT) != 0
  t = on.shape[-1]
  last = t - 1 - jnp.argmax(on[:, ::-1], axis=-1)  # argmax finds the first True from the end
  return (jnp.arange(t)[None, :] == last[:, None]) & jnp.any(on, axis=-1, keepdims=True)


def per_token_rewards(score_B: jax.Array, kl_BxT: jax.Array, mask_BxT: jax.Array,
                      kl_coef: float | jax.Array) -> jax.Array:
  """float32 [B, T]: ``-kl_coef * kl`` on response tokens, plus the score at the last one.

  Rows with an empty mask get all zeros (their score has no token to land on).
  """
  on = jnp.asarray(mask_BxT) != 0
  score = _f32(score_B)  # BEFORE anything else: int scores would truncate fractional ones
  non_score = jnp.where(on, -_f32(kl_coef) * _f32(kl_BxT), 0.0)
  return non_score + jnp.where(last_token_mask(mask_BxT), score[:, None], 0.0)


def gae(rewards_BxT: jax.Array, values_BxT: jax.Array, mask_BxT: jax.Array,
        gamma: float | jax.Array = 1.0,
        lam: float | jax.Array = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation -> (advantages_BxT, returns_BxT), float32, 0 off-mask.

  ``delta_t = r_t + gamma * V_next - V_t``; ``A_t = delta_t + gamma * lam * A_next``, where
  "next" is the next REAL token (V_next = A_next = 0 after the last one).
  """
  on = jnp.asarray(mask_BxT) != 0
  r = jnp.where(on, _f32(rewards_BxT), 0.0)
  v = jnp.where(on, _f32(values_BxT), 0.0)
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, x):
    next_v, next_adv = carry
    r_t, v_t, on_t = x
    adv_t = r_t + gamma * next_v - v_t + gamma * lam * next_adv
    # A masked step leaves the carry untouched, so the recursion skips it.
    carry = (jnp.where(on_t, v_t, next_v), jnp.where(on_t, adv_t, next_adv))
    return carry, jnp.where(on_t, adv_t, 0.0)

  zeros_B = jnp.zeros(r.shape[:1], jnp.float32)
  _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (r.T, v.T, on.T), reverse=True)
  adv = adv_TxB.T
  return adv, jnp.where(on, adv + v, 0.0)


def whiten(x_BxT: jax.Array, mask_BxT: jax.Array, shift_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps) over the masked elements; + mean back if not shift_mean.

  Statistics are over the whole batch (masked mean, unbiased masked variance, as TRL's
  ``masked_whiten``). Masked positions are 0. `shift_mean` is static.
  """
  on = jnp.asarray(mask_BxT) != 0
  x = _f32(x_BxT)
  mean, var = masked_mean(x, mask_BxT), masked_var(x, mask_BxT, unbiased=True)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(on, out, 0.0)


def clip_advantages(advantages_BxT: jax.Array, clip: float | jax.Array,
                    mask_BxT: jax.Array | None = None) -> jax.Array:
  """Advantages clipped to [-clip, clip] (PPO-max: 0.5, after whitening); 0 off-mask."""
  out = jnp.clip(_f32(advantages_BxT), -clip, clip)
  return out if mask_BxT is None else jnp.where(jnp.asarray(mask_BxT) != 0, out, 0.0)


def broadcast_to_tokens(adv_B: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """A per-sequence advantage [B] on every response token: float32 [B, T], 0 off-mask."""
  return jnp.where(jnp.asarray(mask_BxT) != 0, _f32(adv_B)[:, None], 0.0)


def reinforce_baseline_advantages(score_B: jax.Array, mask_BxT: jax.Array,
                                  baseline: float | jax.Array | None = None) -> jax.Array:
  """``score - baseline`` per token; the baseline defaults to the batch mean score.

  `baseline` may be a scalar or a per-row [B] array (e.g. a running mean or a value estimate).
  """
  score = _f32(score_B)
  b = jnp.mean(score) if baseline is None else _f32(baseline)
  return broadcast_to_tokens(score - b, mask_BxT)


def _groups(score_B: jax.Array, n: int) -> jax.Array:
  """[B] -> [B / n, n], prompt-major (row i * n + j is sample j of prompt i)."""
  b = score_B.shape[0]
  if n < 2 or b % n:
    raise ValueError(f"group size n must be >= 2 and divide the batch ({b}), got {n}")
  return _f32(score_B).reshape(b // n, n)


def rloo_advantages(score_B: jax.Array, n: int, mask_BxT: jax.Array) -> jax.Array:
  """Leave-one-out advantages ``s_j - mean_{k != j} s_k`` within groups of `n` (static)."""
  s = _groups(score_B, n)
  baseline = (jnp.sum(s, axis=1, keepdims=True) - s) / (n - 1)
  return broadcast_to_tokens((s - baseline).reshape(-1), mask_BxT)


def grpo_advantages(score_B: jax.Array, n: int, mask_BxT: jax.Array, eps: float = 1e-4,
                    scale_by_std: bool = True) -> jax.Array:
  """Group-normalised advantages ``(s - mean) / (std + eps)`` within groups of `n` (static).

  std is the unbiased group std (TRL); a group whose scores are all equal gets 0.
  """
  s = _groups(score_B, n)
  centered = s - jnp.mean(s, axis=1, keepdims=True)
  if scale_by_std:
    std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / (n - 1))
    centered = centered / (std + eps)
  return broadcast_to_tokens(centered.reshape(-1), mask_BxT)
