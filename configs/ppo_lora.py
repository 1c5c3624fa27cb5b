"""PPO with LoRA on policy and value (PERL), PPO-max defaults. Keys: perl_jax/config.py.

  python -m perl_jax.train --config=configs/ppo_lora.py [--workdir=DIR]

With no paths this runs the built-in task end to end: it trains a tiny SFT policy and a LoRA
reward model on a synthetic language (cached in the workdir), then PPO against the learned
reward, and writes WORKDIR/summary.json with the gold reward before and after.
Point it at real models with --config.policy.init, --config.reward.init, --config.data.prompts.
"""

from perl_jax import config


def get_config():
  return config.ppo_config()
