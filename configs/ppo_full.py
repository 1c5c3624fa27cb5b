"""PPO with full fine-tuning of policy and value, for the PERL comparison. Keys: perl_jax/config.py.

Same as ppo_lora.py with lora.rank=0; the reference policy is then a separate frozen copy.
"""

from perl_jax import config


def get_config():
  c = config.ppo_config()
  c.lora.rank = 0
  c.optimizer.lr = 2e-4  # full tuning takes a ~10x smaller step than LoRA
  return c
