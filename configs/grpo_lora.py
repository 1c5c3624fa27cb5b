"""GRPO with LoRA: no value model; advantages are scores normalised within each prompt's group.

Keys: perl_jax/config.py. Uses rollout.num_samples responses per prompt.
"""

from perl_jax import config


def get_config():
  c = config.ppo_config()
  c.ppo.estimator = "grpo"
  c.rollout.num_samples = 4
  c.ppo.batch_size = 8
  c.ppo.whiten_advantages = False  # the group normalisation already is the whitening
  return c
