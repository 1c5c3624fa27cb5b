"""Sampler: log-probs equal a full forward pass, filters match NumPy, EOS, padding, fan-out, HF parity.

Compilation dominates the runtime on CPU, so tests share models, shapes and sampling configs
(the compiled sampler is then reused) and build params without compiling (`helpers`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_adapters, random_params, tiny_hf_model
from perl_jax import lora
from perl_jax.models import Transformer, tiny_config
from perl_jax.sampling import SamplingConfig, draw, sample, sampling_logprobs, token_logprobs

EOS, PAD = 2, 0


@functools.lru_cache(maxsize=None)  # shared read-only across tests
def _setup(family, use_lora=False):
  """A tiny model with a sharpened output layer, so distributions are far from uniform
  (filters then cut real mass, and argmax margins are large)."""
  cfg = tiny_config(family)
  params = random_params(Transformer(cfg), seed=0, head_scale=8.0)
  if not use_lora:
    return cfg, Transformer(cfg), {"params": params}
  # Non-zero A and B on every projection, so the adapters must reach prefill and decode.
  model = Transformer(cfg, lora=lora.LoraConfig(rank=4, targets=lora.ALL_TARGETS))
  return cfg, model, {"params": params, "lora": random_adapters(model, params, std=0.3)}


def _prompts(cfg, b=3, p=7, pad=(0, 3, 0), seed=1):
  """Left-padded prompts: row i has pad[i] leading pad slots."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (b, p)).astype(np.int32)
  mask = np.ones((b, p), bool)
  for i, n in enumerate(pad):
    tokens[i, :n], mask[i, :n] = PAD, False
  return jnp.asarray(tokens), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, tokens_BxT, mask_BxT):
  return model.apply(variables, tokens_BxT, mask_BxT=mask_BxT)


def _full_forward_logprobs(model, variables, out, scfg):
  """Log-probs of the sampled responses from ONE forward pass over prompt + response."""
  tokens = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
  mask = jnp.concatenate([out.prompt_mask, out.mask], axis=1)
  logits = _forward(model, variables, tokens, mask)
  p, t = out.prompt_tokens.shape[1], out.tokens.shape[1]
  lp = token_logprobs(logits[:, p - 1:p + t - 1], out.tokens, scfg.temperature, scfg.top_k,
                      scfg.top_p)
  return np.where(np.asarray(out.mask), np.asarray(lp), 0.0)


def _greedy(max_new_tokens=8, **kw):
  return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


# Shared by several tests so that the compiled sampler is reused.
SAMPLED = SamplingConfig(max_new_tokens=8, temperature=0.7, num_samples=3)
GREEDY_LONG = SamplingConfig(max_new_tokens=10, temperature=0.0)


@pytest.mark.parametrize("family,scfg,use_lora", [
    ("llama", SAMPLED, True),
    ("gemma2", GREEDY_LONG, False),  # 7 prompt slots + 10 new tokens > its window of 8
    ("qwen2", SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.8), False),
    ("gpt2", SamplingConfig(max_new_tokens=8, temperature=3.0, top_k=5), False),
])
def test_logprobs_equal_full_forward(family, scfg, use_lora):
  cfg, model, variables = _setup(family, use_lora)
  prompt, mask = _prompts(cfg)
  out = sample(model, variables, prompt, mask, jax.random.PRNGKey(2), scfg, eos_ids=(EOS,),
               pad_id=PAD)
  n = scfg.num_samples * prompt.shape[0]
  assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (n, scfg.max_new_tokens)
  assert out.tokens.dtype == jnp.int32 and out.logprobs.dtype == jnp.float32
  assert out.mask.any(axis=1).all() and np.isfinite(np.asarray(out.logprobs)).all()
  np.testing.assert_allclose(np.asarray(out.logprobs),
                             _full_forward_logprobs(model, variables, out, scfg), atol=1e-4)
  if use_lora:  # the adapters changed the distribution
    base = _full_forward_logprobs(Transformer(cfg), {"params": variables["params"]}, out, scfg)
    assert np.abs(base - np.asarray(out.logprobs)).max() > 1e-2
  if scfg.top_k or scfg.top_p < 1:  # the filters cut real mass: kept tokens gained probability
    unfiltered = _full_forward_logprobs(model, variables, out,
                                        dataclasses.replace(scfg, top_k=0, top_p=1.0))
    gain = np.asarray(out.logprobs) - unfiltered
    assert gain.min() > -1e-5 and gain.max() > 0.05


def test_one_token_prompts():
  # P = 1: nothing to prefill, decode step 0 feeds the only prompt token.
  cfg, model, variables = _setup("llama", use_lora=True)
  prompt, mask = jnp.asarray([[1], [7]], jnp.int32), jnp.ones((2, 1), bool)
  out = sample(model, variables, prompt, mask, jax.random.PRNGKey(4), SAMPLED, eos_ids=(EOS,),
               pad_id=PAD)
  assert out.tokens.shape == (6, 8) and out.mask[:, 0].all()
  np.testing.assert_allclose(np.asarray(out.logprobs),
                             _full_forward_logprobs(model, variables, out, SAMPLED), atol=1e-4)


def _numpy_sampling_logprobs(logits, temperature, top_k, top_p):
  out = np.full(logits.shape, -np.inf)
  for r, row in enumerate(logits.astype(np.float64)):
    if temperature == 0:
      out[r] = row - row.max() - np.log(np.exp(row - row.max()).sum())
      continue
    row = row / temperature
    order = np.argsort(-row, kind="stable")
    keep = order[:top_k] if top_k else order
    probs = np.exp(row[keep] - row[keep].max())
    probs /= probs.sum()
    n = int(np.searchsorted(np.cumsum(probs), top_p)) + 1 if top_p < 1 else len(keep)
    keep = keep[:n]
    z = row[keep] - row[keep].max()
    out[r, keep] = z - np.log(np.exp(z).sum())
  return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (0.0, 0, 1.0), (1.0, 5, 1.0), (0.5, 0, 0.9), (1.3, 10, 0.5),
    (1.0, 1, 1.0), (1.0, 0, 1e-6)])
def test_sampling_logprobs_match_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(0).normal(0, 3, (6, 50)).astype(np.float32)
  got = np.asarray(sampling_logprobs(jnp.asarray(logits), temperature, top_k, top_p))
  want = _numpy_sampling_logprobs(logits, temperature, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=1e-5)
  if top_k or top_p < 1:
    assert np.isfinite(got).sum(-1).min() >= 1  # the top token is always kept


def test_token_logprobs_gradients_are_finite():
  # PPO differentiates the recomputed log-probs; filtered (-inf) entries must not leak NaNs.
  logits = jnp.asarray(np.random.default_rng(1).normal(0, 3, (2, 3, 40)), jnp.float32)
  tokens = jnp.argmax(logits, -1)
  grad = jax.jit(jax.grad(lambda x: token_logprobs(x, tokens, 0.8, 5, 0.7).sum()))(logits)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0


def test_samples_follow_the_filtered_distribution():
  cfg, model, variables = _setup("llama", use_lora=True)
  prompt, mask = _prompts(cfg, b=1, pad=(2,))
  scfg = SamplingConfig(max_new_tokens=1, temperature=1.5, top_k=6, num_samples=4000)
  out = sample(model, variables, prompt, mask, jax.random.PRNGKey(0), scfg, eos_ids=(),
               pad_id=PAD)
  logits = _forward(model, variables, prompt, mask)[0, -1]
  probs = np.exp(np.asarray(sampling_logprobs(logits, 1.5, 6)))
  freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=cfg.vocab_size) / scfg.num_samples
  assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs))
  np.testing.assert_allclose(freq, probs, atol=0.03)  # ~4 standard errors at 4000 draws


def test_draw_matches_the_distribution_and_never_picks_cut_tokens(monkeypatch):
  # Rows: a spread distribution, one cut by top-k (its last tokens have probability 0, so a
  # draw at the top of [0, total) must not fall on them), and a single certain token.
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, (3, 50)).astype(np.float32)
  logits[2] = -1e9
  logits[2, 7] = 0.0
  logprobs = np.asarray(jnp.stack([sampling_logprobs(jnp.asarray(logits[0]), 1.0),
                                   sampling_logprobs(jnp.asarray(logits[1]), 1.0, top_k=5),
                                   sampling_logprobs(jnp.asarray(logits[2]), 1.0)]))
  n = 20000
  keys = jax.random.split(jax.random.PRNGKey(3), n)
  tokens = np.asarray(jax.jit(jax.vmap(draw, in_axes=(0, None)))(keys, jnp.asarray(logprobs)))
  probs = np.exp(logprobs.astype(np.float64))
  for row in range(3):
    freq = np.bincount(tokens[:, row], minlength=50) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs[row] > 0)), row
    np.testing.assert_allclose(freq, probs[row], atol=4 * np.sqrt(0.25 / n))  # 4 std errors
  # u at the very top of the range still lands on the last token with mass.
  top = jnp.asarray(logprobs[1:2])
  uniform_one = lambda key, shape: jnp.full(shape, 1.0, jnp.float32)  # beyond any real draw
  monkeypatch.setattr(jax.random, "uniform", uniform_one)
  tok = int(draw(jax.random.PRNGKey(0), top)[0])
  assert tok == int(np.flatnonzero(probs[1] > 0).max())


def test_eos_ends_a_row_while_others_continue():
  cfg, model, variables = _setup("llama", use_lora=True)
  prompt, mask = _prompts(cfg)
  free = sample(model, variables, prompt, mask, jax.random.PRNGKey(0), _greedy(), eos_ids=(),
                pad_id=PAD)
  free_tokens = np.asarray(free.tokens)
  # EOS := the first token row 0 emits at step >= 2 that it has not emitted before and that some
  # other row never emits, so row 0 ends mid-way while that row runs to the end.
  step, eos = next((s, int(tok)) for s, tok in enumerate(free_tokens[0]) if 2 <= s < 6
                   and tok not in free_tokens[0, :s] and (free_tokens[1:] != tok).all(1).any())
  continuing = [r for r in (1, 2) if eos not in free_tokens[r]]
  assert free.mask.all() and not free.ended.any()

  out = sample(model, variables, prompt, mask, jax.random.PRNGKey(0), _greedy(), eos_ids=(eos,),
               pad_id=PAD)
  tokens, mask_out, lp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
  end = step + 1
  np.testing.assert_array_equal(tokens[0, :end], free_tokens[0, :end])
  assert (tokens[0, end:] == PAD).all() and not mask_out[0, end:].any()
  assert (lp[0, end:] == 0).all()
  assert mask_out[0, :end].all() and bool(out.ended[0])  # the EOS itself is a response token
  np.testing.assert_allclose(lp[0, :end], np.asarray(free.logprobs)[0, :end], atol=1e-6)
  for r in continuing:
    np.testing.assert_array_equal(tokens[r], free_tokens[r])
    assert mask_out[r].all() and not out.ended[r]

  # Without stopping: exactly max_new_tokens everywhere, ended still records the EOS.
  cont = sample(model, variables, prompt, mask, jax.random.PRNGKey(0),
                _greedy(stop_at_eos=False), eos_ids=(eos,), pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(cont.tokens), free_tokens)
  assert cont.mask.all() and bool(cont.ended[0])
  np.testing.assert_array_equal(np.asarray(cont.ended), [eos in row for row in free_tokens])


def test_left_padding_gives_the_same_continuation():
  # Row 1 of the shared prompts has 3 pad slots; 4 real + 10 new tokens > gemma2's window of 8.
  cfg, model, variables = _setup("gemma2")
  prompt, mask = _prompts(cfg)
  padded = sample(model, variables, prompt, mask, jax.random.PRNGKey(0), GREEDY_LONG, eos_ids=(),
                  pad_id=PAD)
  alone = sample(model, variables, prompt[1:2, 3:], mask[1:2, 3:], jax.random.PRNGKey(0),
                 GREEDY_LONG, eos_ids=(), pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(padded.tokens[1]), np.asarray(alone.tokens[0]))
  np.testing.assert_allclose(np.asarray(padded.logprobs[1]), np.asarray(alone.logprobs[0]),
                             atol=1e-5)


def test_num_samples_are_prompt_major_and_distinct():
  cfg, model, variables = _setup("llama", use_lora=True)
  prompt, mask = _prompts(cfg)
  out = sample(model, variables, prompt, mask, jax.random.PRNGKey(0), SAMPLED,
               eos_ids=(EOS,), pad_id=PAD)
  assert out.tokens.shape == (9, 8) and out.prompt_tokens.shape == (9, 7)
  assert out.ended.shape == (9,) and out.prompt_mask.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(out.prompt_tokens), np.repeat(prompt, 3, axis=0))
  np.testing.assert_array_equal(np.asarray(out.prompt_mask), np.repeat(mask, 3, axis=0))
  tokens = np.asarray(out.tokens)
  for i in range(3):
    group = tokens[3 * i:3 * i + 3]
    assert len({tuple(r) for r in group}) == 3, group  # independent draws per sample

  # top_k=1 is greedy whatever the temperature; every sample of a prompt is the same.
  top1 = sample(model, variables, prompt, mask, jax.random.PRNGKey(1),
                SamplingConfig(max_new_tokens=8, top_k=1, num_samples=3), eos_ids=(),
                pad_id=PAD)
  greedy = sample(model, variables, prompt, mask, jax.random.PRNGKey(2), _greedy(),
                  eos_ids=(), pad_id=PAD)
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.repeat(greedy.tokens, 3, axis=0))
  np.testing.assert_allclose(np.asarray(top1.logprobs), 0.0, atol=1e-6)  # a point mass


def test_invalid_config_is_an_error():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0)
  cfg, model, variables = _setup("gpt2")
  prompt, mask = _prompts(cfg, p=250)
  with pytest.raises(ValueError, match="max_positions"):
    sample(model, variables, prompt, mask, jax.random.PRNGKey(0),
           _greedy(max_new_tokens=10), eos_ids=(EOS,), pad_id=PAD)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_greedy_equals_transformers_generate(kind, tmp_path):
  torch = pytest.importorskip("torch")
  from perl_jax.models import load_hf_checkpoint

  hf_model = tiny_hf_model(kind, tmp_path)
  cfg, params = load_hf_checkpoint(tmp_path)
  # Left-padded batch; 5-6 real + 10 new tokens > gemma2's window of 6.
  prompt, mask = _prompts(cfg, b=2, p=6, pad=(1, 0), seed=4)
  out = sample(Transformer(cfg), {"params": params}, prompt, mask, jax.random.PRNGKey(0),
               GREEDY_LONG, eos_ids=(EOS,), pad_id=PAD)
  with torch.no_grad():
    hf = hf_model.generate(torch.tensor(np.asarray(prompt), dtype=torch.long),
                           attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                           max_new_tokens=10, do_sample=False, eos_token_id=EOS,
                           pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
  hf_tokens = hf.sequences[:, prompt.shape[1]:].numpy()
  steps = hf_tokens.shape[1]  # shorter than 10 only if every row emitted EOS
  np.testing.assert_array_equal(np.asarray(out.tokens[:, :steps]), hf_tokens)
  assert (np.asarray(out.tokens[:, steps:]) == PAD).all()
  hf_logprobs = torch.stack(hf.logits, 1).log_softmax(-1).gather(
      -1, hf.sequences[:, prompt.shape[1]:, None])[..., 0].numpy()
  real = np.asarray(out.mask[:, :steps])
  np.testing.assert_allclose(np.asarray(out.logprobs[:, :steps])[real], hf_logprobs[real],
                             atol=1e-4)
