"""The RL math of perl_jax: KL estimators and controllers, rewards and advantages, losses,
running reward normalisation. Pure jax.numpy functions, jit-able, float32 outputs.

Conventions shared by every module: token tensors are ``[B, T]`` aligned with the response
tokens; ``mask_BxT`` is bool or float, non-zero on real response tokens (float values act as
weights in reductions); per-sequence tensors are ``[B]``; groups of n samples per prompt are
prompt-major (row ``i * n + j`` is sample j of prompt i). See each module's docstring.
"""

from perl_jax.rl.advantages import (broadcast_to_tokens, clip_advantages, gae, grpo_advantages,
                                    last_token_mask, per_token_rewards,
                                    reinforce_baseline_advantages, rloo_advantages, whiten)
from perl_jax.rl.kl import (KL_KINDS, AdaptiveKL, FixedKL, kl_k1, kl_k2, kl_k3, kl_penalty,
                            sequence_kl)
from perl_jax.rl.losses import (bt_loss, entropy_from_logits, masked_mean, masked_sum, masked_var,
                                pointwise_loss, policy_loss, sequence_logprob, sft_loss,
                                token_entropy, value_loss)
from perl_jax.rl.normalize import RunningMeanStd, normalize_and_clip

__all__ = [
    "AdaptiveKL", "FixedKL", "KL_KINDS", "RunningMeanStd", "broadcast_to_tokens", "bt_loss",
    "clip_advantages", "entropy_from_logits", "gae", "grpo_advantages", "kl_k1", "kl_k2",
    "kl_k3", "kl_penalty", "last_token_mask", "masked_mean", "masked_sum", "masked_var",
    "normalize_and_clip", "per_token_rewards", "pointwise_loss", "policy_loss",
    "reinforce_baseline_advantages", "rloo_advantages", "sequence_kl", "sequence_logprob",
    "sft_loss", "token_entropy", "value_loss", "whiten",
]
