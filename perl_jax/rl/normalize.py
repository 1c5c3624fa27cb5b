"""Running (historical) mean and variance, and PPO-max reward normalisation and clipping.

Design
------
PPO-max (Zheng et al. 2023) normalises rewards with the mean and variance of ALL rewards
seen so far, not just the current batch, and clips the result (to +-10 there).
`RunningMeanStd` is that statistic as an immutable pytree state (a NamedTuple of float32
arrays: count, mean, var), so it can live in a jitted train state and be updated inside
`jax.jit` or `lax.scan`::

  stats = RunningMeanStd.create()           # scalar statistics
  stats = stats.update(score_B)             # or stats.update(x_BxT, mask_BxT)
  reward_B = normalize_and_clip(score_B, stats, clip=10.0)

Conventions
-----------
* Statistics have a shape S (``()`` by default). An update with ``x`` of shape ``L + S``
  reduces over the leading axes L; an optional ``mask`` of shape L (bool, or float
  weights) selects which elements count.
* A batch is merged with the parallel algorithm of Chan et al. (1979): with batch count
  ``n_b``, mean ``m_b`` and (population) variance ``v_b``, ``delta = m_b - m``,
  ``m' = m + delta * n_b / n'``, ``M2' = v n + v_b n_b + delta^2 n n_b / n'`` with
  ``n' = n + n_b``. The state's variance is the population variance (ddof 0) of everything
  seen, independent of how it was split into batches. An update with nothing selected
  leaves the state unchanged.
* The fresh state is count 0, mean 0, var 1, so normalising before any update is the
  identity. The count is float32 (weights may be fractional): exact up to 2^24 elements,
  and past that its rounding only shifts the weight of new batches by ~1e-7 relatively.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


class RunningMeanStd(NamedTuple):
  """Running count, mean and population variance (float32 arrays; a pytree)."""

  count: jax.Array
  mean: jax.Array
  var: jax.Array

  @classmethod
  def create(cls, shape: Sequence[int] = ()) -> "RunningMeanStd":
    shape = tuple(shape)
    return cls(count=jnp.zeros((), jnp.float32), mean=jnp.zeros(shape, jnp.float32),
               var=jnp.ones(shape, jnp.float32))

  @property
  def std(self) -> jax.Array:
    return jnp.sqrt(self.var)

  def update(self, x: jax.Array, mask: jax.Array | None = None) -> "RunningMeanStd":
    """The state after also seeing the (masked) elements of x; see the module docstring."""
    x = jnp.asarray(x).astype(jnp.float32)
    lead = x.ndim - self.mean.ndim
    if lead < 0 or x.shape[lead:] != self.mean.shape:
      raise ValueError(f"x {x.shape} must end with the statistics' shape {self.mean.shape}")
    axes = tuple(range(lead))
    lead_shape = x.shape[:lead]
    w = (jnp.ones(lead_shape, jnp.float32) if mask is None
         else jnp.broadcast_to(jnp.asarray(mask).astype(jnp.float32), lead_shape))
    w = w.reshape(lead_shape + (1,) * self.mean.ndim)
    x = jnp.where(w != 0, x, 0.0)  # masked slots may hold anything (inf, NaN)
    n_b = jnp.sum(w)
    safe_n_b = jnp.where(n_b > 0, n_b, 1.0)
    mean_b = jnp.sum(x * w, axis=axes) / safe_n_b
    # Two passes within the batch: the variance of deviations, not E[x^2] - E[x]^2.
    var_b = jnp.sum(jnp.square(jnp.where(w != 0, x - mean_b, 0.0)) * w, axis=axes) / safe_n_b
    total = self.count + n_b
    safe_total = jnp.where(total > 0, total, 1.0)
    delta = mean_b - self.mean
    mean = self.mean + delta * n_b / safe_total
    m2 = self.var * self.count + var_b * n_b + jnp.square(delta) * self.count * n_b / safe_total
    var = m2 / safe_total
    seen = n_b > 0
    return RunningMeanStd(count=total, mean=jnp.where(seen, mean, self.mean),
                          var=jnp.where(seen, var, self.var))


def normalize_and_clip(x: jax.Array, stats: RunningMeanStd, clip: float | jax.Array | None = None,
                       shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / sqrt(var + eps), clipped to [-clip, clip]; float32.

  ``shift_mean=False`` only divides by the running std ("reward scaling", which PPO-max
  found did not help on its own); the default shift is PPO-max's reward normalisation.
  `clip` None skips clipping (PPO-max uses 10). `stats` usually already includes x
  (update first, then normalise, as PPO-max does).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  if shift_mean:
    x = x - stats.mean
  x = x * jax.lax.rsqrt(stats.var + eps)
  return x if clip is None else jnp.clip(x, -clip, clip)
