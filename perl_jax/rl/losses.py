"""Losses of the RLHF stages: PPO policy and value, entropy, reward model, SFT; masked reductions.

Design
------
Every function is pure jax.numpy (jit-able, no Python branching on traced values) and
computes in float32 whatever the dtype of its inputs (bf16 logits and log-probs are upcast
first). Every loss returns ``(loss, metrics)`` with a scalar loss and a dict of scalar
metrics whose keys do not depend on the arguments' values, so a trainer can jit, average
and log them without branching.

Conventions
-----------
* Token tensors are ``[B, T]``, aligned with the RESPONSE tokens: position t of
  ``logprobs_BxT`` is the log-prob of response token t. Masks ``mask_BxT`` are bool or float
  ``[B, T]``: non-zero marks a real response token, float values act as weights. Masked
  positions may hold anything (even -inf or NaN); they are selected away with ``where``
  before any arithmetic, so they never reach a loss, a metric or a gradient.
* A masked mean over an empty mask is 0 (not NaN), so an all-padding microbatch is harmless.
* PPO follows the "N implementation details of RLHF with PPO" and TRL: per-token clipped
  surrogate averaged over all response tokens of the batch; value loss
  ``0.5 * max(unclipped, clipped)`` squared error; ``approxkl = 0.5 * mean(logratio^2)``.
  Metric names map onto TRL's: ``approxkl`` -> policy/approxkl_avg, ``clipfrac`` ->
  policy/clipfrac_avg (value: val/clipfrac_avg), ``ratio`` -> val/ratio, ``ratio_var`` ->
  val/ratio_var (here the token-level variance within the batch), entropy ->
  objective/entropy.
* Reward-model losses take one scalar score per sequence ``[B]`` (read at the last real
  token by the model, as the N-details prescribe).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
Axis = Any  # None, an int or a tuple of ints


def _f32(x: Any) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _weights(mask: jax.Array) -> jax.Array:
  """The mask as float32 weights (True -> 1)."""
  return _f32(mask)


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
  """sum(x * mask) over `axis`, ignoring whatever x holds where the mask is 0."""
  w = _weights(mask)
  return jnp.sum(jnp.where(w != 0, _f32(x), 0.0) * w, axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
  """Weighted mean of x over `axis`; 0 where the mask has no weight."""
  w = _weights(mask)
  count = jnp.sum(jnp.broadcast_to(w, jnp.shape(x)), axis=axis)
  total = masked_sum(x, w, axis=axis)
  # The double where keeps both the value and its gradient finite for an empty mask.
  safe = jnp.where(count > 0, count, 1.0)
  return jnp.where(count > 0, total / safe, 0.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
  """Variance of the masked elements (scalar). `unbiased` applies Bessel's n / (n - 1), as TRL.

  With weights the correction uses n = sum of weights; n <= 1 gives the biased variance.
  """
  w = _weights(mask)
  mean = masked_mean(x, w)
  var = masked_mean(jnp.square(_f32(x) - mean), w)
  if unbiased:
    n = jnp.sum(jnp.broadcast_to(w, jnp.shape(x)))
    var = jnp.where(n > 1, var * n / jnp.where(n > 1, n - 1, 1.0), var)
  return var


def sequence_logprob(logprobs_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """log pi(response) [B]: the token log-probs summed over response tokens."""
  return masked_sum(logprobs_BxT, mask_BxT, axis=-1)


# ----------------------------------------------------------------------------------- PPO


def policy_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array,
                mask_BxT: jax.Array, clip_eps: float | jax.Array = 0.2,
                dual_clip: float | jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """PPO clipped surrogate, masked mean over response tokens.

  Per token, with ratio = exp(logp - old_logp):
  ``loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))``. With `dual_clip` c > 1
  (Ye et al. 2020, dual-clip PPO), tokens with A < 0 have their loss bounded by ``-c * A``,
  so a huge ratio on a bad token cannot dominate the batch. `old_logp_BxT` and the
  advantages are treated as constants (stop_gradient).

  Metrics: approxkl (0.5 * mean(logratio^2)), clipfrac (fraction of tokens where the
  clipped branch is the active one), dual_clipfrac (0 without dual clip), ratio and
  ratio_var (masked mean and variance of the token ratios).
  """
  if isinstance(dual_clip, (int, float)) and dual_clip <= 1.0:
    raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
  w = _weights(mask_BxT)
  on = w != 0
  old = jax.lax.stop_gradient(_f32(old_logp_BxT))
  adv = jax.lax.stop_gradient(_f32(advantages_BxT))
  # Zero the log-ratio on padding before exp: padding log-probs may be -inf.
  logratio = jnp.where(on, _f32(logp_BxT) - old, 0.0)
  ratio = jnp.exp(logratio)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  per_token = jnp.maximum(unclipped, clipped)
  if dual_clip is not None:
    bound = -adv * dual_clip
    dual_active = (adv < 0) & (per_token > bound)
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, bound), per_token)
    dual_clipfrac = masked_mean(dual_active, w)
  else:
    dual_clipfrac = jnp.zeros((), jnp.float32)
  loss = masked_mean(per_token, w)
  ratio_mean = masked_mean(ratio, w)
  metrics = {
      "approxkl": 0.5 * masked_mean(jnp.square(logratio), w),
      "clipfrac": masked_mean(clipped > unclipped, w),
      "dual_clipfrac": dual_clipfrac,
      "ratio": ratio_mean,
      "ratio_var": masked_mean(jnp.square(ratio - ratio_mean), w),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def value_loss(values_BxT: jax.Array, old_values_BxT: jax.Array, returns_BxT: jax.Array,
               mask_BxT: jax.Array,
               clip_eps: float | jax.Array = 0.2) -> tuple[jax.Array, Metrics]:
  """Clipped value loss: ``0.5 * max((v - R)^2, (v_clip - R)^2)``, masked mean.

  ``v_clip = old_v + clip(v - old_v, -eps, eps)``. Metrics: clipfrac, the fraction of tokens
  where the clipped error is the larger one (TRL's val/clipfrac_avg).
  """
  w = _weights(mask_BxT)
  v = _f32(values_BxT)
  old = jax.lax.stop_gradient(_f32(old_values_BxT))
  ret = jax.lax.stop_gradient(_f32(returns_BxT))
  # clip(v, old - eps, old + eps), not old + clip(v - old, ...): equal in exact arithmetic, but
  # this form is bit-identical to v when unclipped, so clipfrac counts real clips only.
  v_clipped = jnp.clip(v, old - clip_eps, old + clip_eps)
  err_unclipped = jnp.square(v - ret)
  err_clipped = jnp.square(v_clipped - ret)
  loss = 0.5 * masked_mean(jnp.maximum(err_unclipped, err_clipped), w)
  clipfrac = jax.lax.stop_gradient(masked_mean(err_clipped > err_unclipped, w))
  return loss, {"clipfrac": clipfrac}


def token_entropy(logits_BxTxV: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
  """Entropy [B, T] of softmax(logits / temperature) over the last axis, in float32.

  Logits of -inf (filtered tokens) contribute 0, not NaN.
  """
  z = _f32(logits_BxTxV) / temperature
  lse = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  logp = z - lse
  p = jnp.exp(logp)
  # Zero the -inf log-probs BEFORE the product: 0 * -inf would be NaN in the gradient.
  return -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)


def entropy_from_logits(logits_BxTxV: jax.Array, mask_BxT: jax.Array,
                        temperature: float | jax.Array = 1.0) -> jax.Array:
  """Mean per-token entropy over response tokens (scalar; TRL's objective/entropy per token)."""
  return masked_mean(token_entropy(logits_BxTxV, temperature), mask_BxT)


# --------------------------------------------------------------------- reward model, SFT


def bt_loss(chosen_B: jax.Array, rejected_B: jax.Array, margin: jax.Array | None = None,
            center_coef: float | jax.Array = 0.0) -> tuple[jax.Array, Metrics]:
  """Bradley-Terry pairwise loss ``mean(-log sigmoid(c - r - margin))`` + centering.

  The centering term ``center_coef * mean((c + r)^2)`` (TRL's
  center_rewards_coefficient, 1e-2 there) pins the reward's free offset near 0. Metrics:
  accuracy (c > r; ties count 1/2, so an untrained constant model scores 0.5), margin
  (mean c - r), bt (the loss without the centering term).
  """
  c, r = _f32(chosen_B), _f32(rejected_B)
  diff = c - r
  shifted = diff if margin is None else diff - _f32(margin)
  bt = jnp.mean(-jax.nn.log_sigmoid(shifted))
  loss = bt + center_coef * jnp.mean(jnp.square(c + r))
  accuracy = jnp.mean((diff > 0).astype(jnp.float32) + 0.5 * (diff == 0).astype(jnp.float32))
  metrics = {"accuracy": accuracy, "margin": jnp.mean(diff), "bt": bt}
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)


def pointwise_loss(scores_B: jax.Array, labels_B: jax.Array) -> tuple[jax.Array, Metrics]:
  """Binary cross-entropy of sigmoid(score) against thumbs-up (1) / thumbs-down (0) labels.

  Labels may be soft (in [0, 1]). Metrics: accuracy (score > 0 agrees with label > 0.5).
  """
  s, y = _f32(scores_B), _f32(labels_B)
  # -[y log sig(s) + (1 - y) log sig(-s)], the stable form.
  loss = jnp.mean(-y * jax.nn.log_sigmoid(s) - (1.0 - y) * jax.nn.log_sigmoid(-s))
  accuracy = jnp.mean(((s > 0) == (y > 0.5)).astype(jnp.float32))
  return loss, {"accuracy": jax.lax.stop_gradient(accuracy)}


def sft_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array,
             loss_mask_BxT: jax.Array) -> tuple[jax.Array, Metrics]:
  """Next-token NLL on response tokens, masked mean.

  `logits_BxTxV` come from one forward pass over `tokens_BxT` (prompt + response), so the
  logits at t predict token t + 1. `loss_mask_BxT` is aligned with the TOKENS: non-zero
  marks a token to be predicted (the response, including its EOS); position 0 can never be
  a target. Metrics: perplexity (exp of the loss) and accuracy (argmax hits).
  """
  logits = _f32(logits_BxTxV[:, :-1])
  targets = tokens_BxT[:, 1:]
  w = _weights(loss_mask_BxT)[:, 1:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  target_logp = jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  loss = masked_mean(-target_logp, w)
  hits = jnp.argmax(logits, axis=-1) == targets
  metrics = {"perplexity": jnp.exp(loss), "accuracy": masked_mean(hits, w)}
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, metrics)
