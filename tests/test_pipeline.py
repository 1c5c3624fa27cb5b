"""The embedded default at reduced size: SFT, LoRA reward model, PPO; gold reward must rise."""

import json

import pytest

from perl_jax import config, train
from tests.helpers import one_device


def _reduced_config():
  c = one_device(config.ppo_config())  # what configs/ppo_lora.py returns, on one device
  c.synthetic.sft_steps, c.synthetic.reward_steps = 100, 60
  c.total_iterations, c.eval_every, c.progress = 12, 100, False
  c.ppo.batch_size = 16
  return c


def test_default_pipeline_gold_reward_rises_and_prerequisites_are_cached(tmp_path, monkeypatch):
  summary = train.run(_reduced_config(), str(tmp_path))
  on_disk = json.loads((tmp_path / "summary.json").read_text())
  assert on_disk == pytest.approx(summary)
  for key in ("gold_reward_before", "gold_reward_after", "reward_model_accuracy", "kl_to_sft"):
    assert key in summary, key
  # Measured at this size: accuracy ~0.97, gold 0.19 -> 0.36, KL ~8 nats per response.
  assert summary["reward_model_accuracy"] >= 0.85
  assert summary["gold_reward_after"] > summary["gold_reward_before"] + 0.08
  assert 0 < summary["kl_to_sft"] < 30
  assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "tb").is_dir()

  # A second run goes straight to PPO: the SFT and reward stages must not train again.
  from perl_jax.trainers import reward, sft

  def no_training(*args, **kwargs):
    raise AssertionError("a cached prerequisite was retrained")

  monkeypatch.setattr(sft, "train", no_training)
  monkeypatch.setattr(reward, "train", no_training)
  c = _reduced_config()
  c.total_iterations = 1
  again = train.run(c, str(tmp_path))
  assert again["reward_model_accuracy"] == summary["reward_model_accuracy"]
