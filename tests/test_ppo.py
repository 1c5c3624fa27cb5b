"""PPO trainer: the phases on their own, every estimator end to end, LoRA base sharing, configs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perl_jax import config, rl
from perl_jax.data import jsonl, synthetic
from perl_jax.sampling import SamplingConfig
from perl_jax.tokenizers import load_tokenizer
from perl_jax.trainers import common, ppo
from tests.helpers import one_device, ppo_prereqs


@pytest.fixture(scope="module")
def prereqs(tmp_path_factory):
  """A random tiny policy (HF dir + tokenizer), an untrained LoRA reward model, prompts."""
  return ppo_prereqs(tmp_path_factory.mktemp("ppo"))


def _config(prereqs, **ppo_overrides):
  c = one_device(config.ppo_config())
  c.policy.init, c.reward.init, c.data.prompts = (prereqs["policy"], prereqs["reward"],
                                                  prereqs["prompts"])
  c.total_iterations, c.eval_every, c.progress = 2, 1, False
  c.ppo.batch_size = 8
  c.rollout.max_new_tokens = 8
  for k, v in ppo_overrides.items():
    section, key = k.split("__")
    c[section][key] = v
  return c


def test_lora_models_share_one_frozen_base(prereqs):
  models = ppo.load_models(_config(prereqs), common.BaseCache(), jax.random.PRNGKey(0))
  q = lambda params: params["layers_0"]["attn"]["q"]["kernel"]
  base = q(models.policy.frozen["params"])
  assert q(models.reference_params) is base
  assert q(models.reward.frozen["params"]) is base
  assert q(models.value.frozen["params"]) is base
  # Only adapters and the value/reward heads train.
  assert set(models.policy.trainable) == {"lora"}
  assert set(models.value.trainable) == {"lora", "params"}
  assert set(models.value.trainable["params"]) == {"score"}


def test_score_reads_last_real_token_and_penalises_missing_eos(prereqs):
  c = _config(prereqs)
  models = ppo.load_models(c, common.BaseCache(), jax.random.PRNGKey(0))
  score_fn = ppo.make_score_fn(models.policy.module, models.reward.module, models.value.module,
                               1.0, missing_eos_penalty=0.7)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, 30, (3, 10)), jnp.int32)
  mask = np.ones((3, 10), bool)
  mask[0, :2] = False  # left padding
  mask[1, 8:] = False  # a response that ended early (right padding)
  mask = jnp.asarray(mask)
  resp_mask = mask[:, 6:]
  ended = jnp.asarray([True, True, False])
  affine = jnp.asarray([2.0, -0.5])
  reward_vars = models.reward.variables()
  *_, scores = score_fn(models.policy.variables(), {"params": models.reference_params},
                        reward_vars, affine, models.value.variables(), tokens, mask, resp_mask,
                        ended, jnp.zeros(resp_mask.shape))
  raw = np.asarray(models.reward.module.apply(reward_vars, tokens, mask_BxT=mask))
  last = [9, 7, 9]
  expected = 2.0 * raw[np.arange(3), last] - 0.5 - 0.7 * np.array([0, 0, 1])
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)


def test_sampler_logprobs_stand_in_for_a_recomputation_only_without_filtering(prereqs):
  """rollout.logprobs="auto": the sampler's log-probs equal a forward pass's (T = 0.7)."""
  c = _config(prereqs)
  models = ppo.load_models(c, common.BaseCache(), jax.random.PRNGKey(0))
  policy = models.policy
  policy.trainable = jax.tree.map(lambda x: x + 0.05, policy.trainable)  # adapters that matter
  tok = load_tokenizer(prereqs["policy"])
  prompts = jsonl.read_jsonl(prereqs["prompts"], "prompts")[:6]
  p_tok, p_mask, _ = jsonl.encode_prompt_batch(tok, prompts, c.data.max_prompt_len)
  scfg = SamplingConfig(max_new_tokens=8, temperature=0.7, num_samples=2)
  tokens, mask, resp_mask, ended, sampler_logp = ppo.rollout(
      policy.module, policy.variables(), p_tok, p_mask, jax.random.PRNGKey(5), scfg, (2,), 0)
  args = (policy.variables(), {"params": models.reference_params}, models.reward.variables(),
          jnp.asarray([1.0, 0.0]), models.value.variables(), tokens, mask, resp_mask, ended,
          sampler_logp)
  score = lambda recompute: ppo.make_score_fn(policy.module, models.reward.module,
                                              models.value.module, 0.7, 0.0, recompute)(*args)
  reused, recomputed = score(False), score(True)
  np.testing.assert_array_equal(np.asarray(reused[0]), np.asarray(sampler_logp))
  np.testing.assert_allclose(np.asarray(reused[0]), np.asarray(recomputed[0]), atol=1e-4)
  for a, b in zip(reused[1:], recomputed[1:]):  # reference, values, scores do not depend on it
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(jnp.abs(recomputed[0] - recomputed[1]).max()) > 1e-3  # policy != reference
  assert not ppo.recompute_logprobs(c.rollout)
  for key, value in (("top_k", 5), ("top_p", 0.9), ("logprobs", "recompute")):
    r = config.rollout()
    r[key] = value
    assert ppo.recompute_logprobs(r), key


def test_update_moves_logprobs_with_the_advantage_sign(prereqs):
  """One update on a fixed rollout raises log-probs of A>0 tokens and lowers those of A<0."""
  c = _config(prereqs, ppo__num_minibatches=1, ppo__clip_eps=10.0)
  c.optimizer.lr = 1e-2
  models = ppo.load_models(c, common.BaseCache(), jax.random.PRNGKey(0))
  policy, value = models.policy, models.value
  tok = load_tokenizer(prereqs["policy"])
  prompts = jsonl.read_jsonl(prereqs["prompts"], "prompts")[:8]
  p_tok, p_mask, _ = jsonl.encode_prompt_batch(tok, prompts, c.data.max_prompt_len)
  scfg = SamplingConfig(max_new_tokens=8, stop_at_eos=False)
  tokens, mask, resp_mask, ended, _ = ppo.rollout(policy.module, policy.variables(), p_tok,
                                                  p_mask, jax.random.PRNGKey(3), scfg, (2,), 0)
  logp, _ = ppo.response_logprobs(policy.module, policy.variables(), tokens, mask, 8, 1.0)
  adv = jnp.where(jnp.arange(8)[None, :] % 2 == 0, 1.0, -1.0) * jnp.ones((8, 1))
  data = dict(tokens=tokens, mask=mask, response_mask=resp_mask, logp=logp,
              values=jnp.zeros_like(logp), adv=adv, returns=jnp.ones_like(logp))
  popt, vopt = common.make_optimizer(c.optimizer), common.make_optimizer(c.optimizer)
  pol = ppo.TrainState(jax.tree.map(jnp.copy, policy.trainable),
                       popt.init(policy.trainable))
  val = ppo.TrainState(jax.tree.map(jnp.copy, value.trainable), vopt.init(value.trainable))
  frozen = {"policy": policy.frozen, "value": value.frozen}
  base_before = jax.tree.map(np.asarray, policy.frozen)
  update = ppo.make_update_fn(c, policy.module, value.module, popt, vopt)
  for i in range(3):
    pol, val, metrics = update(pol, val, frozen, data, jax.random.PRNGKey(i))
  new_logp, _ = ppo.response_logprobs(policy.module, common.variables(policy.frozen,
                                                                      pol.trainable),
                                      tokens, mask, 8, 1.0)
  delta = np.asarray(new_logp - logp)
  assert delta[:, 0::2].mean() > 0.05 and delta[:, 1::2].mean() < -0.05
  jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray,
                                                                        policy.frozen))
  for key in ("loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "val/ratio"):
    assert np.isfinite(float(metrics[key])), key


def test_advantages_gae_matches_numpy_with_kl_in_reward(prereqs):
  """The advantages phase composes KL, reward and GAE as the NumPy reference does."""
  c = _config(prereqs, ppo__reward_norm=False, ppo__whiten_advantages=False, ppo__reward_clip=0.0)
  rng = np.random.default_rng(0)
  b, n = 4, 5
  mask = np.ones((b, n), bool)
  mask[1, 3:] = False
  logp, ref = rng.normal(size=(2, b, n)).astype(np.float32) - 2.0
  values = rng.normal(size=(b, n)).astype(np.float32)
  scores = np.array([0.3, -0.7, 1.25, 0.5], np.float32)  # fractional on purpose
  batch = ppo.Rollout(jnp.zeros((b, 2 + n), jnp.int32), jnp.ones((b, 2 + n), bool),
                      jnp.asarray(mask), jnp.ones(b, bool), jnp.asarray(logp * mask),
                      jnp.asarray(ref * mask), jnp.asarray(values * mask), jnp.asarray(scores))
  adv, returns, _, metrics = ppo.advantages(c, batch, 0.1, rl.RunningMeanStd.create())
  kl = (logp - ref) * mask
  rewards = -0.1 * kl
  for i in range(b):
    rewards[i, mask[i].sum() - 1] += scores[i]
  expected = np.zeros((b, n), np.float32)
  for i in range(b):
    last_adv, next_v = 0.0, 0.0
    for t in reversed(range(mask[i].sum())):
      delta = rewards[i, t] + next_v - values[i, t]
      last_adv = delta + 0.95 * last_adv
      expected[i, t], next_v = last_adv, values[i, t]
  np.testing.assert_allclose(np.asarray(adv), expected, atol=1e-5)
  np.testing.assert_allclose(float(metrics["objective/kl"]), kl.sum(1).mean(), rtol=1e-5)


@pytest.mark.parametrize("estimator,num_samples", [("gae", 1), ("grpo", 4), ("rloo", 2),
                                                   ("reinforce", 1)])
def test_every_estimator_trains(prereqs, tmp_path, estimator, num_samples):
  c = _config(prereqs, ppo__estimator=estimator)
  c.rollout.num_samples = num_samples
  summary = ppo.train(c, str(tmp_path), gold_fn=synthetic.gold_reward)
  assert np.isfinite(summary["kl_to_sft"]) and 0 <= summary["gold_reward_after"] <= 1
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_lines = [l for l in lines if "loss/policy_avg" in l]
  assert len(train_lines) == c.total_iterations
  assert ("loss/value_avg" in train_lines[0]) == (estimator == "gae")
  for key in ("objective/kl", "objective/entropy", "policy/entropy_avg",
              "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg",
              "policy/clipfrac_avg", "val/ratio", "lr", "perf/iter_s", "perf/generate_s",
              "perf/score_s", "perf/train_s", "perf/tokens_per_s", "warn/response_length",
              "warn/perplexity", "warn/kl_to_sft"):
    assert key in train_lines[0], key
  # The saved policy reloads onto the same base.
  reloaded = common.load_model(str(tmp_path / "policy"), head="lm", lora=None,
                               cache=common.BaseCache(), rng=jax.random.PRNGKey(0))
  assert reloaded.base is not None


def test_full_finetuning_keeps_the_reference(prereqs, tmp_path):
  c = _config(prereqs)
  c.lora.rank = 0
  c.optimizer.lr = 1e-3
  cache = common.BaseCache()
  models = ppo.load_models(c, cache, jax.random.PRNGKey(0))
  assert models.policy.base is None and set(models.policy.trainable) == {"params"}
  ref_q = np.asarray(models.reference_params["layers_0"]["attn"]["q"]["kernel"])
  ppo.train(c, str(tmp_path))
  saved = common.load_model(str(tmp_path / "policy"), head="lm", lora=None,
                            cache=common.BaseCache(), rng=jax.random.PRNGKey(0))
  new_q = np.asarray(saved.trainable["params"]["layers_0"]["attn"]["q"]["kernel"])
  np.testing.assert_array_equal(
      np.asarray(cache.get(c.policy.init)[1]["layers_0"]["attn"]["q"]["kernel"]), ref_q)
  assert np.abs(new_q - ref_q).max() > 0


def test_ptx_and_dual_clip_and_adaptive_kl_run(prereqs, tmp_path):
  c = _config(prereqs, ppo__ptx_coef=0.5, ppo__dual_clip=3.0, ppo__adaptive_kl=True,
              ppo__kl_estimator="k3", ppo__critic_warmup_iters=1, ppo__grad_accum=2,
              ppo__missing_eos_penalty=1.0, ppo__adv_clip=0.5)
  c.data.train = prereqs["sft"]
  ppo.train(c, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  train_lines = [l for l in lines if "objective/kl_coef" in l]
  # Iteration 0 is critic warm-up: only the value program runs, so no policy losses.
  assert "loss/value_avg" in train_lines[0] and "loss/policy_avg" not in train_lines[0]
  assert "loss/ptx_avg" in train_lines[1] and "loss/policy_avg" in train_lines[1]
  coefs = [l["objective/kl_coef"] for l in train_lines]
  assert coefs[0] == pytest.approx(0.05) and coefs[1] != coefs[0]


@pytest.mark.parametrize("key,value,message", [
    ("ppo.num_minibatches", 3, "ppo.num_minibatches"),
    ("ppo.estimator", "grpo", "rollout.num_samples"),
    ("data.prompts", "/does/not/exist.jsonl", "data.prompts"),
    ("lora.targets", ("attn/nothing(",), "lora"),
    ("ppo.kl_estimator", "k9", "ppo.kl_estimator"),
])
def test_inconsistent_config_fails_naming_the_key(key, value, message):
  c = config.ppo_config()
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    config.validate(c)


def test_cli_rejects_unknown_key_and_bad_value_before_compiling(tmp_path):
  for flag, expected in [("--config.ppo.not_a_key=1", "not_a_key"),
                         ("--config.ppo.num_minibatches=3", "ppo.num_minibatches")]:
    proc = subprocess.run([sys.executable, "-m", "perl_jax.train", "--config=configs/ppo_lora.py",
                           f"--workdir={tmp_path}", flag], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout


def test_tokenizer_that_does_not_fit_fails_before_loading_or_compiling(prereqs, tmp_path,
                                                                       monkeypatch):
  import shutil

  small = tmp_path / "small_vocab_policy"
  shutil.copytree(prereqs["policy"], small)
  cfg = json.loads((small / "config.json").read_text())
  cfg["vocab_size"] = 8  # the synthetic tokenizer has ~40 tokens
  (small / "config.json").write_text(json.dumps(cfg))
  c = _config(prereqs)
  c.policy.init = str(small)

  def must_not_load(*args, **kwargs):
    raise AssertionError("models were loaded before the tokenizer was checked")

  monkeypatch.setattr(common, "load_model", must_not_load)
  with pytest.raises(ValueError, match=r"vocab_size is 8"):
    ppo.train(c, str(tmp_path / "run"))
