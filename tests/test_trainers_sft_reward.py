"""SFT and reward-model trainers: their jitted steps against NumPy references, and end to end
on the synthetic task (SFT -> HF checkpoint -> LoRA reward model -> normalisation -> reload)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from perl_jax import config, lora, rl
from perl_jax.models import Transformer, load_hf_checkpoint, tiny_config
from perl_jax.trainers import common, reward, sft
from tests.helpers import one_device, random_params

VOCAB = 32


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)


@pytest.fixture(scope="module")
def models() -> dict[str, common.Model]:
  """Tiny LoRA models with a causal-LM head and a scalar head (built once: compiles)."""
  out = {}
  for head in ("lm", "scalar"):
    cfg = tiny_config("llama", vocab_size=VOCAB, head=head, num_layers=1)
    params = random_params(Transformer(cfg), seed=1)
    out[head] = common._assemble(cfg, params, LORA, None, None, jax.random.PRNGKey(2))
  return out


def _with_dropout(model: common.Model, dropout: float) -> common.Model:
  lcfg = dataclasses.replace(LORA, dropout=dropout)
  return dataclasses.replace(model, module=model.module.clone(lora=lcfg))


def _sft_batch(seed: int = 0, b: int = 4, p: int = 5, r: int = 6) -> dict[str, np.ndarray]:
  """[left-padded prompt | response | pad] rows, as `jsonl.encode_sft` lays them out."""
  rng = np.random.default_rng(seed)
  t = p + r
  tokens = rng.integers(3, VOCAB, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  loss_mask = np.zeros((b, t), bool)
  for i in range(b):
    pad_left, resp = i % 3, 2 + i % (r - 1)
    mask[i, :pad_left] = False
    tokens[i, :pad_left] = 0
    loss_mask[i, p:p + resp] = True
    mask[i, p + resp:] = False
    tokens[i, p + resp:] = 0
  return {"tokens_BxT": tokens, "mask_BxT": mask, "loss_mask_BxT": loss_mask}


# --- SFT step -------------------------------------------------------------------------------


def test_sft_loss_counts_response_tokens_only(models):
  model = models["lm"]
  batch = _sft_batch()
  loss_fn = jax.jit(sft.make_loss_fn(model.module))
  loss, metrics = loss_fn(model.trainable, model.frozen, batch, jax.random.PRNGKey(0))
  # NumPy reference from the same logits: NLL of token t+1 under the logits at t, averaged
  # over the response tokens (loss_mask) only.
  logits = np.asarray(jax.jit(model.module.apply)(model.variables(), batch["tokens_BxT"],
                                                  mask_BxT=batch["mask_BxT"]), np.float64)
  logp = _log_softmax(logits[:, :-1])
  targets = batch["tokens_BxT"][:, 1:]
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  w = batch["loss_mask_BxT"][:, 1:]
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["perplexity"]), np.exp(float(loss)), rtol=1e-5)

  # With the logits fixed, a target outside the response (prompt or padding) never counts.
  random_logits = np.random.default_rng(3).normal(size=logits.shape).astype(np.float32)
  tokens = batch["tokens_BxT"].copy()
  base, _ = jax.jit(rl.sft_loss)(random_logits, tokens, batch["loss_mask_BxT"])
  ref = -np.take_along_axis(_log_softmax(random_logits[:, :-1].astype(np.float64)),
                            tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(float(base), (ref * w).sum() / w.sum(), rtol=1e-5)
  tokens[:, 1:4] = (tokens[:, 1:4] + 7) % VOCAB  # prompt targets (slots < P = 5)
  tokens[batch["mask_BxT"] == 0] = 5  # padding
  assert not (batch["loss_mask_BxT"][:, 1:4]).any()
  changed, _ = jax.jit(rl.sft_loss)(random_logits, tokens, batch["loss_mask_BxT"])
  assert float(changed) == float(base)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sft_step_learns_and_never_touches_frozen(models, dropout):
  model = _with_dropout(models["lm"], dropout)
  frozen_before = jax.tree.map(np.array, model.frozen)
  optimizer = optax.adam(1e-2)
  trainable = jax.tree.map(jnp.copy, model.trainable)
  opt_state = optimizer.init(trainable)
  step = sft.make_train_step(model.module, optimizer)
  batch = _sft_batch(seed=1)
  # Dropout is drawn from the step's rng (and only when there is dropout).
  nonzero = jax.tree.map(lambda x: x + 0.05, trainable)
  loss_fn = jax.jit(sft.make_loss_fn(model.module))
  l1, l2 = (float(loss_fn(nonzero, model.frozen, batch, jax.random.PRNGKey(k))[0]) for k in (0, 1))
  assert (l1 != l2) == (dropout > 0)
  losses = []
  for i in range(8):
    trainable, opt_state, metrics = step(trainable, opt_state, model.frozen, batch,
                                         jax.random.PRNGKey(0), i)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
  assert set(metrics) >= {"loss", "perplexity", "accuracy", "grad_norm"}
  # Frozen weights: the same values bit for bit, and only adapters in the trainable tree.
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, model.frozen))
  assert set(trainable) == {"lora"}
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       trainable["lora"], model.trainable["lora"])
  assert any(jax.tree.leaves(moved))


# --- Reward step ----------------------------------------------------------------------------


def _pair_batch(seed: int = 0) -> dict[str, np.ndarray]:
  a, b = _sft_batch(seed), _sft_batch(seed + 10)
  return {"chosen_tokens_BxT": a["tokens_BxT"], "chosen_mask_BxT": a["mask_BxT"],
          "rejected_tokens_BxT": b["tokens_BxT"], "rejected_mask_BxT": b["mask_BxT"]}


def test_score_is_read_at_the_last_real_token(models):
  model = models["scalar"]
  variables = model.variables()
  scores = reward.score_fn(model.module)
  tokens = np.array([[1, 7, 8, 9, 2]], np.int32)
  mask = np.ones_like(tokens, bool)
  base = scores(variables, tokens, mask)
  values = jax.jit(model.module.apply)(variables, tokens, mask_BxT=mask)
  np.testing.assert_allclose(base, values[:, -1], rtol=1e-6)
  # The same sequence right-padded, left-padded and both: the same score.
  padded = np.array([[1, 7, 8, 9, 2, 0, 0, 0], [0, 0, 0, 1, 7, 8, 9, 2],
                     [0, 0, 1, 7, 8, 9, 2, 0]], np.int32)
  padded_mask = padded != 0
  np.testing.assert_allclose(scores(variables, padded, padded_mask), np.repeat(base, 3),
                             rtol=1e-5, atol=1e-6)
  # Gain and bias apply affinely (and are traced, not baked in).
  np.testing.assert_allclose(scores(variables, tokens, mask, 2.0, -0.5), 2.0 * base - 0.5,
                             rtol=1e-6)


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.3, 0.01)])
def test_reward_bt_loss_matches_numpy(models, margin, center):
  model = models["scalar"]
  # Non-zero adapters and a larger head, so the scores differ clearly between sequences.
  trainable = jax.tree.map(lambda x: x * 30.0, model.trainable)
  trainable["lora"] = jax.tree.map(
      lambda x: jnp.asarray(np.random.default_rng(0).normal(0, 0.1, x.shape), x.dtype),
      trainable["lora"])
  batch = _pair_batch()
  loss_fn = jax.jit(reward.make_loss_fn(model.module, "pairwise", margin, center))
  loss, metrics = loss_fn(trainable, model.frozen, batch, jax.random.PRNGKey(0))
  variables = common.variables(model.frozen, trainable)
  scores = reward.score_fn(model.module)
  c = np.asarray(scores(variables, batch["chosen_tokens_BxT"], batch["chosen_mask_BxT"]),
                 np.float64)
  r = np.asarray(scores(variables, batch["rejected_tokens_BxT"], batch["rejected_mask_BxT"]),
                 np.float64)
  assert np.std(c - r) > 0.05  # a meaningful comparison
  expected = np.mean(np.logaddexp(0.0, -(c - r - margin))) + center * np.mean((c + r) ** 2)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(c > r), rtol=1e-6)


def test_reward_step_learns_pointwise_and_keeps_frozen(models):
  model = models["scalar"]
  frozen_before = jax.tree.map(np.array, model.frozen)
  optimizer = optax.adam(1e-2)
  trainable = jax.tree.map(jnp.copy, model.trainable)
  opt_state = optimizer.init(trainable)
  step = reward.make_train_step(model.module, optimizer, "pointwise")
  base = _sft_batch(seed=2, b=8)
  batch = {"tokens_BxT": base["tokens_BxT"], "mask_BxT": base["mask_BxT"],
           "labels_B": np.array([1, 0] * 4, np.float32)}
  losses = []
  for i in range(10):
    trainable, opt_state, metrics = step(trainable, opt_state, model.frozen, batch,
                                         jax.random.PRNGKey(0), i)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
  assert set(trainable) == {"lora", "params"} and set(trainable["params"]) == {"score"}
  jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.array, model.frozen))


# --- End to end on the synthetic task -------------------------------------------------------

SFT_STEPS, REWARD_STEPS = 40, 30
# Measured: 0.88 / 0.93 / 0.94 held-out accuracy after 10 / 20 / 30 steps on a 40-step SFT
# policy (chance: 0.5).
REWARD_ACCURACY_BOUND = 0.8
NORM_SAMPLES = 64


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  c = one_device(config.sft_config())
  c.total_iterations, c.log_every, c.eval_every, c.progress = SFT_STEPS, 20, SFT_STEPS, False
  sft_out = sft.train(c, str(root / "sft"))
  r = one_device(config.reward_config())
  r.total_iterations, r.log_every, r.eval_every, r.progress = REWARD_STEPS, 10, 15, False
  r.policy.init = sft_out["hf_dir"]
  r.reward.num_samples_for_norm = NORM_SAMPLES
  config.validate(r)
  rm_out = reward.train(r, str(root / "reward"))
  return root, sft_out, rm_out


def test_sft_end_to_end_writes_metrics_and_a_loadable_checkpoint(pipeline):
  import torch
  import transformers

  root, out, _ = pipeline
  lines = [json.loads(l) for l in (root / "sft" / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [20, 40]
  assert {"loss", "perplexity", "accuracy", "lr", "grad_norm"} <= set(train_lines[-1])
  assert any("params/trainable_fraction" in l for l in lines)
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  assert out["eval_loss"] == pytest.approx([l for l in lines if "eval/loss" in l][-1]["eval/loss"])
  assert out["eval_loss"] < 2.5  # a random 39-token model starts at ~ln(39) = 3.66
  samples = json.loads((root / "sft" / "samples.jsonl").read_text().splitlines()[-1])
  assert samples["step"] == SFT_STEPS and samples["samples"][0]["response"]

  # hf/ loads in perl_jax and in transformers, with the same logits.
  cfg, params = load_hf_checkpoint(out["hf_dir"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(out["hf_dir"])
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out["hf_dir"]).eval()
  ids = tokenizer(["describe the fox"])["input_ids"]
  ours = Transformer(cfg).apply({"params": params}, jnp.asarray(ids))
  with torch.no_grad():
    theirs = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def test_reward_end_to_end_accuracy_reload_and_normalisation(pipeline):
  from perl_jax.data import jsonl
  from perl_jax.tokenizers import load_tokenizer

  root, sft_out, out = pipeline
  assert out["kind"] == "pairwise"
  assert out["accuracy"] > REWARD_ACCURACY_BOUND, out  # gold-labelled held-out pairs
  # Normalisation: re-scored reference samples have mean ~0 and std ~1 (tolerance 1e-3).
  assert abs(out["norm/mean"]) < 1e-3 and abs(out["norm/std"] - 1) < 1e-3, out
  assert out["gain"] == pytest.approx(1 / out["norm/raw_std"])

  # The saved directory holds adapters + head only, and reloads with identical scores.
  saved = (root / "reward" / "model")
  meta = json.loads((saved / common.META_FILE).read_text())
  assert meta["base"] == str(Path(sft_out["hf_dir"]).resolve()) and meta["lora"]["rank"] == 8
  assert meta["reward_gain"] == pytest.approx(out["gain"])
  model = common.load_model(out["model_dir"], head="scalar", lora=None,
                            cache=common.BaseCache(), rng=jax.random.PRNGKey(9))
  assert set(model.trainable) == {"lora", "params"}
  # Held-out accuracy, loss and mean margin recomputed with the reloaded model (same batch
  # shape as in training, so the same program) equal what training reported.
  tokenizer = load_tokenizer(model.tokenizer_dir)
  records = jsonl.read_jsonl(root / "reward" / "data" / "pref_eval.jsonl", "pairwise")
  data = jsonl.encode_pairs(tokenizer, records, 16, 16)
  again = reward.evaluate(reward.score_fn(model.module), model.variables(),
                          {k: data[k] for k in reward.PAIR_KEYS}, "pairwise", 32)
  assert again["eval/accuracy"] == out["accuracy"]
  np.testing.assert_allclose(again["eval/loss"], out["eval_loss"], rtol=1e-6)
  # Fresh reference-policy samples (another key), scored by the RELOADED model with its
  # gain and bias: mean ~0, std ~1 up to sampling error (128 samples: tolerance 0.4).
  ref_module, ref_vars = reward.reference_policy(sft_out["hf_dir"], common.BaseCache())
  prompts = jsonl.read_jsonl(root / "reward" / "data" / "prompts.jsonl", "prompts")
  prompt_BxP, prompt_mask_BxP, _ = jsonl.encode_prompt_batch(tokenizer, prompts, 16)
  tokens, mask = reward.reference_samples(ref_module, ref_vars, prompt_BxP, prompt_mask_BxP, 128,
                                          17, jax.random.PRNGKey(123), (2,), 0)
  fresh = np.asarray(reward.score_fn(model.module)(model.variables(), tokens, mask,
                                                   model.reward_gain, model.reward_bias))
  assert abs(fresh.mean()) < 0.4 and 0.6 < fresh.std() < 1.4, (fresh.mean(), fresh.std())

  lines = [json.loads(l) for l in (root / "reward" / "metrics.jsonl").read_text().splitlines()]
  evals = [l for l in lines if "eval/accuracy" in l]
  assert [l["step"] for l in evals] == [15, 30]
  assert evals[-1]["eval/accuracy"] == pytest.approx(out["accuracy"])
  assert any("norm/gain" in l for l in lines)


def test_scratch_tokenizer_is_the_synthetic_one_for_synthetic_text(tmp_path):
  from perl_jax.data import synthetic

  records = synthetic.make_sft_records(8, seed=0)
  words = sft.scratch_tokenizer(records, None, str(tmp_path / "a"))
  assert len(words) == len(synthetic.VOCAB)
  other = sft.scratch_tokenizer(records + [{"prompt": "zebra?", "response": "Zürich"}], None,
                                str(tmp_path / "b"))
  assert 259 <= len(other) <= sft.BPE_VOCAB  # bytes + specials, then merges (few here)
  assert other.decode(other("Zürich", add_special_tokens=False)["input_ids"]) == "Zürich"
