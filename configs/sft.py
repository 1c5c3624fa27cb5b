"""Supervised fine-tuning. Keys are documented in perl_jax/config.py.

  python -m perl_jax.train --config=configs/sft.py [--config.policy.init=HF_DIR
      --config.data.train=train.jsonl --config.data.eval=eval.jsonl --config.lora.rank=8]

With no data paths it trains on the built-in synthetic task (responses are imperfect
demonstrations), from a random tiny model unless policy.init names a checkpoint.
"""

from perl_jax import config


def get_config():
  return config.sft_config()
