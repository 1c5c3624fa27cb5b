"""Batched autoregressive sampling with a static-shape KV cache, compiled as one function.

Design
------
`sample` is a single `jax.jit` program (model, config, EOS ids and pad id are static), so a
rollout is one dispatch with no host round-trips:

1. Prefill. The left-padded prompts (B x P) run through the model ONCE, writing their keys
   and values into a cache of P + max_new_tokens slots. Prompt positions are
   ``cumsum(mask) - 1``, so padding never shifts the rotary phases or learned positions of real
   tokens; pad slots are masked out of attention for good. Only slots [0, P - 1) are prefilled:
   their logits are unused, so XLA drops the output projection (a B x P x V logits tensor
   would dwarf the cache for large vocabularies). Left padding puts every row's last real
   token in slot P - 1, and the first decode step feeds it.
2. Fan out. For ``num_samples = n`` the prefilled cache is repeated n times along the batch,
   prompt-major: row ``i * n + j`` is sample j of prompt i. The prefix is never recomputed,
   neither per sample nor per step.
3. Decode. A `lax.while_loop` emits one token per row per step: step t runs the model on one
   token per row (the last prompt token for t = 0, else new token t - 1) at slot P - 1 + t and
   position ``(real prompt tokens) - 1 + t``, and draws new token t from the logits. The loop
   stops as soon as every row has emitted an EOS (``stop_at_eos``), so cost grows linearly
   with the tokens actually generated. After its EOS a row emits ``pad_id`` with mask False
   and log-prob 0 (its computation continues, since shapes are static, but is discarded).

Log-probs are those of the distribution the token was drawn from: temperature, then top-k,
then top-p (nucleus) filtering, renormalised (`sampling_logprobs`). PPO's importance ratios
need exactly this behaviour distribution, and `token_logprobs` recomputes it from the logits
of one full forward pass over prompt + response. Greedy decoding (temperature 0) is a point
mass, whose log-prob (0) is useless to a trainer; it reports ``log_softmax`` of the raw logits
instead, i.e. the log-prob under temperature 1 without filtering.

LoRA adapters are folded into float32 kernels once per call (`lora.inference_variables`):
each decode step then runs plain matmuls instead of a base matmul plus two thin adapter ones.

Filters keep every token whose value reaches the cut-off (ties at the boundary are all kept),
so the kept set does not depend on the sort order of equal values and recomputation from a
second forward pass selects the same set.

Nothing here is device specific: the model's logical sharding constraints shard the cache
and activations when params are sharded under a mesh; without a mesh it runs on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from perl_jax.lora import inference_variables
from perl_jax.models.transformer import init_cache

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. Frozen (hashable) because it is a static argument of the compiled sampler."""

  max_new_tokens: int
  temperature: float = 1.0  # 0.0 means greedy
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  num_samples: int = 1  # responses per prompt
  stop_at_eos: bool = True  # False: always generate exactly max_new_tokens

  def __post_init__(self):
    problems = []
    if self.max_new_tokens < 1:
      problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      problems.append(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
    if self.top_k < 0:
      problems.append(f"top_k={self.top_k} must be >= 0 (0 means off)")
    if not 0.0 < self.top_p <= 1.0:
      problems.append(f"top_p={self.top_p} must be in (0, 1] (1 means off)")
    if self.num_samples < 1:
      problems.append(f"num_samples={self.num_samples} must be >= 1")
    if problems:
      raise ValueError("Invalid SamplingConfig: " + "; ".join(problems))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


class SampleOutput(NamedTuple):
  """Sampled responses; row i * n + j is sample j of prompt i (n = num_samples)."""

  tokens: jax.Array  # int32 [B*n, max_new_tokens]; pad_id after a row's end
  mask: jax.Array  # bool [B*n, max_new_tokens]; True for response tokens, EOS included
  logprobs: jax.Array  # float32 [B*n, max_new_tokens]; 0 where mask is False
  prompt_tokens: jax.Array  # [B*n, P] prompts repeated, prompt-major
  prompt_mask: jax.Array  # bool [B*n, P]
  ended: jax.Array  # bool [B*n]: the row emitted EOS


def sampling_logprobs(logits_BxV: jax.Array, temperature: float, top_k: int = 0,
                      top_p: float = 1.0) -> jax.Array:
  """Log-probs of the sampling distribution over the last axis (any leading dims), float32.

  Temperature scaling, then top-k (keep values >= the k-th largest), then top-p (keep the
  smallest set of most likely tokens whose probability reaches p; the top token is always
  kept), renormalised; filtered tokens get -inf. `temperature`, `top_k` and `top_p` are Python
  numbers. Temperature 0 (greedy) returns ``log_softmax`` of the raw logits, no filtering.
  """
  logits = logits_BxV.astype(jnp.float32)
  if temperature == 0.0:
    return jax.nn.log_softmax(logits, axis=-1)
  logits = logits / temperature
  vocab = logits.shape[-1]
  if 0 < top_k < vocab:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth, logits, _NEG_INF)
  if top_p < 1.0:
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_desc = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_desc, axis=-1) - sorted_desc  # exactly 0 for the top token
    kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # a prefix of the sorted order
    cutoff = jnp.take_along_axis(sorted_desc, kept - 1, axis=-1)
    logits = jnp.where(probs >= cutoff, logits, _NEG_INF)
  return jax.nn.log_softmax(logits, axis=-1)


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, temperature: float,
                   top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """float32 [B, T]: log-prob of tokens_BxT[b, t] under the sampling distribution of logits[b, t].

  With the logits of a full forward pass over prompt + response (shifted by one), this
  recomputes the log-probs `sample` reported for the same settings.
  """
  logprobs_BxTxV = sampling_logprobs(logits_BxTxV, temperature, top_k, top_p)
  return jnp.take_along_axis(logprobs_BxTxV, tokens_BxT[..., None].astype(jnp.int32),
                             axis=-1)[..., 0]


def draw(key: jax.Array, logprobs_NxV: jax.Array) -> jax.Array:
  """int32 [N]: one token per row from the distribution exp(logprobs), by inverse CDF.

  One uniform per row, where `jax.random.categorical` draws Gumbel noise for every vocabulary
  entry: on CPU that noise cost ~0.6 ms of a decode step (16 x 2048), the rest of sampling
  ~0.2 ms. The draw is the first token whose cumulative probability exceeds u in [0, total):
  a token of probability 0 (cut by top-k / top-p) is never the first, and u stays below the
  total even when rounding puts uniform * total on it.
  """
  cdf_NxV = jnp.cumsum(jnp.exp(logprobs_NxV.astype(jnp.float32)), axis=-1)
  total_Nx1 = cdf_NxV[:, -1:]
  u_Nx1 = jax.random.uniform(key, total_Nx1.shape) * total_Nx1
  u_Nx1 = jnp.minimum(u_Nx1, jnp.nextafter(total_Nx1, 0.0))
  return jnp.sum(cdf_NxV <= u_Nx1, axis=-1).astype(jnp.int32)


def _pick(logits_NxV: jax.Array, key: jax.Array, cfg: SamplingConfig):
  """One token per row and its log-prob under the sampling distribution."""
  logprobs_NxV = sampling_logprobs(logits_NxV, cfg.temperature, cfg.top_k, cfg.top_p)
  if cfg.greedy:
    token_N = jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
  else:
    token_N = draw(key, logprobs_NxV)
  return token_N, jnp.take_along_axis(logprobs_NxV, token_N[:, None], axis=-1)[:, 0]


class _State(NamedTuple):
  t: jax.Array  # index of the next token to emit
  cache: Any
  last_N: jax.Array  # fed to the model at step t: new token t - 1, or the last prompt token
  tokens_NxT: jax.Array
  mask_NxT: jax.Array
  logprobs_NxT: jax.Array
  ended_N: jax.Array


def _record(state: _State, token_N, logprob_N, cfg: SamplingConfig, eos_ids, pad_id) -> _State:
  """Writes step t's token; rows that already ended get pad / False / 0 instead."""
  active_N = ~state.ended_N if cfg.stop_at_eos else jnp.ones_like(state.ended_N)
  token_N = jnp.where(active_N, token_N, pad_id).astype(jnp.int32)
  logprob_N = jnp.where(active_N, logprob_N, 0.0).astype(jnp.float32)
  is_eos_N = jnp.isin(token_N, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else False
  column = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, state.t))
  return _State(t=state.t + 1, cache=state.cache, last_N=token_N,
                tokens_NxT=column(state.tokens_NxT, token_N),
                mask_NxT=column(state.mask_NxT, active_N),
                logprobs_NxT=column(state.logprobs_NxT, logprob_N),
                ended_N=state.ended_N | (is_eos_N & active_N))


@functools.partial(jax.jit, static_argnames=("model", "cfg", "eos_ids", "pad_id"))
def _sample_jit(model, variables, prompt_BxP, prompt_mask_BxP, rng, *, cfg: SamplingConfig,
                eos_ids: tuple[int, ...], pad_id: int) -> SampleOutput:
  b, p = prompt_BxP.shape
  n, steps = cfg.num_samples, cfg.max_new_tokens
  prompt_BxP = prompt_BxP.astype(jnp.int32)
  prompt_mask_BxP = prompt_mask_BxP.astype(bool)
  variables = inference_variables(variables, model.lora)  # merged once, not per token
  repeat = lambda x: x if x.ndim == 0 else jnp.repeat(x, n, axis=0)  # prompt-major fan-out

  # Prefill all prompt slots but the last. Its logits are unused, so XLA drops the output
  # projection: a B x P x V logits tensor would dwarf everything else for large vocabularies.
  # Left padding puts every row's last real token in slot P - 1; decode step 0 feeds it.
  cache = init_cache(model.cfg, b, p + steps)
  if p > 1:
    positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1) - 1, 0)
    _, cache = model.apply(variables, prompt_BxP[:, :-1], positions_BxP[:, :-1],
                           prompt_mask_BxP[:, :-1], cache=cache)
  cache = jax.tree.map(repeat, cache)  # the scalar cache index is shared by all rows
  lengths_N = repeat(prompt_mask_BxP.sum(-1).astype(jnp.int32))
  rows = b * n

  def cond(s: _State):
    going = s.t < steps
    return going & ~jnp.all(s.ended_N) if cfg.stop_at_eos else going

  def body(s: _State) -> _State:
    # Feeds the token before new token t (the last prompt token when t = 0) at slot P - 1 + t,
    # position (real prompt tokens) - 1 + t, then draws token t from its logits.
    positions_Nx1 = jnp.maximum(lengths_N + s.t - 1, 0)[:, None]
    logits_Nx1xV, cache = model.apply(variables, s.last_N[:, None], positions_Nx1,
                                      jnp.ones((rows, 1), bool), cache=s.cache)
    token_N, logprob_N = _pick(logits_Nx1xV[:, 0], jax.random.fold_in(rng, s.t), cfg)
    return _record(s._replace(cache=cache), token_N, logprob_N, cfg, eos_ids, pad_id)

  state = _State(t=jnp.zeros((), jnp.int32), cache=cache, last_N=repeat(prompt_BxP[:, -1]),
                 tokens_NxT=jnp.full((rows, steps), pad_id, jnp.int32),
                 mask_NxT=jnp.zeros((rows, steps), bool),
                 logprobs_NxT=jnp.zeros((rows, steps), jnp.float32),
                 ended_N=jnp.zeros((rows,), bool))
  state = jax.lax.while_loop(cond, body, state)
  return SampleOutput(tokens=state.tokens_NxT, mask=state.mask_NxT, logprobs=state.logprobs_NxT,
                      prompt_tokens=repeat(prompt_BxP), prompt_mask=repeat(prompt_mask_BxP),
                      ended=state.ended_N)


def sample(model: Any, variables: dict, prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array,
           rng: jax.Array, cfg: SamplingConfig, *, eos_ids: tuple[int, ...],
           pad_id: int) -> SampleOutput:
  """Samples `cfg.num_samples` responses per LEFT-padded prompt; see the module docstring.

  `model` is a `Transformer` with an 'lm' head; `variables` is ``{'params': ...}`` plus an
  optional ``'lora'`` adapter tree. Recompiles only when the static arguments (model, cfg,
  eos_ids, pad_id) or the input shapes change.
  """
  mcfg = model.cfg
  if mcfg.head != "lm":
    raise ValueError(f"sample needs a model with head='lm', got head={mcfg.head!r}")
  if prompt_BxP.ndim != 2 or prompt_mask_BxP.shape != prompt_BxP.shape:
    raise ValueError(f"prompt_BxP {prompt_BxP.shape} and prompt_mask_BxP "
                     f"{prompt_mask_BxP.shape} must be equal 2-D shapes")
  total = prompt_BxP.shape[1] + cfg.max_new_tokens
  if mcfg.positions == "learned" and total > mcfg.max_positions:
    raise ValueError(f"prompt length {prompt_BxP.shape[1]} + max_new_tokens "
                     f"{cfg.max_new_tokens} = {total} exceeds max_positions={mcfg.max_positions}")
  eos_ids = tuple(int(i) for i in eos_ids)
  return _sample_jit(model, variables, prompt_BxP, prompt_mask_BxP, rng, cfg=cfg,
                     eos_ids=eos_ids, pad_id=int(pad_id))
