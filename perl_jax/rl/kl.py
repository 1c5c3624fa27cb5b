"""KL to the reference policy: per-token estimators and the KL-coefficient controllers.

Design
------
PPO in RLHF keeps the policy near the anchor (SFT) policy with a per-token KL penalty added
to the reward (`perl_jax.rl.advantages.per_token_rewards`). With LoRA the reference
log-probs come from the same network with the adapters left out (see `perl_jax.lora`).

Estimators. Tokens are sampled from the policy pi, so with ``log r = log pi_ref - log pi``
each of these is a single-sample estimate of KL(pi || pi_ref) at one token:

* ``k1 = log pi - log pi_ref = -log r``: unbiased, high variance, can be negative per token.
* ``k2 = 0.5 * (log r)^2``: biased, low variance, always >= 0.
* ``k3 = (r - 1) - log r``: unbiased and always >= 0 ("low variance", Schulman's k3).

Conventions: inputs are log-probs of the SAMPLED tokens, ``[B, T]``, aligned with the
response tokens; outputs are float32 ``[B, T]``. Positions outside the optional mask are 0
(padding log-probs may be anything, even -inf, and never leak into the result).

Controllers. The KL coefficient is a small piece of training state. A controller is a
frozen dataclass of static hyperparameters registered as a pytree with NO leaves, so it can
be passed into (or closed over by) `jax.jit` and `lax.scan`; its state is a float32 scalar
array, the current coefficient::

  ctl = AdaptiveKL(init=0.15, target=6.0, horizon=10_000)
  coef = ctl.init_state()
  coef = ctl.update(coef, current_kl, n_steps)  # jit-able; current_kl may be traced

`AdaptiveKL` follows Ziegler et al. (2019) and TRL: the proportional error
``clip(kl / target - 1, -0.2, 0.2)`` scales the coefficient by
``1 + error * n_steps / horizon``, where ``kl`` is the mean per-SEQUENCE KL (summed over
tokens, TRL's ``objective/kl``) and ``n_steps`` the number of episodes since the last update
(the rollout batch size).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


def _log_ratio(logp_BxT: jax.Array, logp_ref_BxT: jax.Array) -> jax.Array:
  """log r = log pi_ref - log pi in float32 (bf16 log-probs would round the tiny differences)."""
  return logp_ref_BxT.astype(jnp.float32) - logp_BxT.astype(jnp.float32)


def kl_k1(logp_BxT: jax.Array, logp_ref_BxT: jax.Array) -> jax.Array:
  """k1 = log pi - log pi_ref per token."""
  return -_log_ratio(logp_BxT, logp_ref_BxT)


def kl_k2(logp_BxT: jax.Array, logp_ref_BxT: jax.Array) -> jax.Array:
  """k2 = 0.5 * (log r)^2 per token."""
  return 0.5 * jnp.square(_log_ratio(logp_BxT, logp_ref_BxT))


def kl_k3(logp_BxT: jax.Array, logp_ref_BxT: jax.Array) -> jax.Array:
  """k3 = (r - 1) - log r per token, r = pi_ref / pi."""
  log_r = _log_ratio(logp_BxT, logp_ref_BxT)
  # expm1 keeps precision when r ~ 1, where (r - 1) and log r nearly cancel.
  return jnp.expm1(log_r) - log_r


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp_BxT: jax.Array, logp_ref_BxT: jax.Array, kind: str = "k1",
               mask_BxT: jax.Array | None = None) -> jax.Array:
  """Per-token KL estimate (float32 [B, T]); `kind` in ('k1', 'k2', 'k3') is static.

  Positions where `mask_BxT` is false/0 are 0.
  """
  if kind not in _ESTIMATORS:
    raise ValueError(f"kl kind must be one of {KL_KINDS}, got {kind!r}")
  if mask_BxT is None:
    return _ESTIMATORS[kind](logp_BxT, logp_ref_BxT)
  on = jnp.asarray(mask_BxT) != 0
  # Mask the inputs before the estimator, so -inf padding log-probs cannot make NaNs.
  logp = jnp.where(on, logp_BxT, 0.0)
  logp_ref = jnp.where(on, logp_ref_BxT, 0.0)
  return jnp.where(on, _ESTIMATORS[kind](logp, logp_ref), 0.0)


def sequence_kl(kl_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Per-sequence KL [B]: the per-token estimates summed over response tokens."""
  m = jnp.asarray(mask_BxT).astype(jnp.float32)
  return jnp.sum(jnp.where(m != 0, kl_BxT.astype(jnp.float32), 0.0) * m, axis=-1)


def _static_pytree(cls):
  """Registers a dataclass as a pytree whose fields are all static metadata (no leaves)."""
  fields = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=fields)


@_static_pytree
@dataclasses.dataclass(frozen=True)
class FixedKL:
  """A constant KL coefficient (TRL's default 0.05; PPO-max found 0.05 stable, 0.001 inert)."""

  coef: float = 0.05

  def init_state(self) -> jax.Array:
    return jnp.asarray(self.coef, jnp.float32)

  def update(self, state: jax.Array, current_kl: jax.Array, n_steps: jax.Array | int) -> jax.Array:
    del current_kl, n_steps  # the same signature as AdaptiveKL, so trainers need no branch
    return jnp.asarray(state, jnp.float32)


@_static_pytree
@dataclasses.dataclass(frozen=True)
class AdaptiveKL:
  """Proportional controller driving the per-sequence KL toward `target` (Ziegler et al.)."""

  init: float = 0.15
  target: float = 6.0
  horizon: float = 10_000.0
  max_error: float = 0.2  # the clip on the proportional error

  def __post_init__(self):
    if self.target <= 0 or self.horizon <= 0:
      raise ValueError(f"AdaptiveKL needs target > 0 and horizon > 0, got {self.target}, "
                       f"{self.horizon}")

  def init_state(self) -> jax.Array:
    return jnp.asarray(self.init, jnp.float32)

  def update(self, state: jax.Array, current_kl: jax.Array, n_steps: jax.Array | int) -> jax.Array:
    """The next coefficient: ``state * (1 + clip(kl / target - 1) * n_steps / horizon)``."""
    kl = jnp.asarray(current_kl, jnp.float32)
    error = jnp.clip(kl / self.target - 1.0, -self.max_error, self.max_error)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / self.horizon
    return jnp.asarray(state, jnp.float32) * mult
