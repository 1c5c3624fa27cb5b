"""Reward model with LoRA adapters and a scalar head (PERL). Keys: perl_jax/config.py.

  python -m perl_jax.train --config=configs/reward_lora.py --config.policy.init=HF_DIR \
      --config.data.train=pairs.jsonl --config.data.eval=pairs_eval.jsonl

Pairwise data ({"prompt","chosen","rejected"}) trains a Bradley-Terry model; pointwise
thumbs-up/down data ({"prompt","response","label"}) a binary classifier. The score is read at
the last real token. With no paths: the built-in task (noisy gold-labelled pairs).
"""

from perl_jax import config


def get_config():
  c = config.reward_config()
  c.lora.rank = 8
  return c
