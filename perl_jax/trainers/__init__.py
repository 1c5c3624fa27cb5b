"""Trainers of the RLHF stages: supervised fine-tuning (`sft`), reward models (`reward`) and
PPO-style RL (`ppo`), sharing model loading and optimizers (`common`)."""
