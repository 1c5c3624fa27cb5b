"""PPO (and critic-free REINFORCE / RLOO / GRPO) with LoRA on policy and value, after PERL.

One iteration reads top to bottom as four functions:

1. `rollout`     - the policy samples responses with the compiled KV-cache sampler;
2. `score`       - reward model, reference policy and value model read the batch (and the
                   policy's own log-probs are recomputed when the sampler's cannot be used);
3. `advantages`  - per-token KL penalty + score at the last token, running reward
                   normalisation, then GAE (or a critic-free estimator), whitening, clipping;
4. `update`      - epochs x minibatches x microbatches of clipped-surrogate policy loss,
                   clipped value loss, entropy bonus and optional PPO-ptx loss.

Memory (PERL): when policy, reference, value and reward are built on one base checkpoint,
`BaseCache` loads it once; the reference is the policy with its adapters left out, and value
and reward differ only in their adapters and heads. Frozen trees are passed to the jitted
functions as arguments, never closed over.

Log-probs for the PPO ratio and the KL are computed at the sampling temperature (logits /
T) without top-k/top-p filtering, identically for old, new and reference log-probs. Without
filtering that is exactly the distribution the sampler drew from, so by default
(``rollout.logprobs = "auto"``) the old log-probs are the ones the sampler recorded and scoring
skips the policy's forward pass; with top-k/top-p, or ``"recompute"``, a forward pass
recomputes them (as TRL does). Forward-only passes fold LoRA adapters into float32 kernels
first (`lora.inference_variables`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perl_jax import checkpoint, distributed, host, rl
from perl_jax import lora as lora_lib
from perl_jax.sampling import SamplingConfig, sample, token_logprobs
from perl_jax.trainers import common, flat_state, phases
from perl_jax.trainers.layout import Layout, to_host
from perl_jax.trainers.reward import last_token

Params = Any


class Rollout(NamedTuple):
  """One batch of experience; response tensors are [B, N] aligned with the response tokens."""

  tokens_BxT: jax.Array  # prompt (left-padded, P) + response (N)
  mask_BxT: jax.Array  # real tokens
  response_mask_BxN: jax.Array
  ended_B: jax.Array  # emitted EOS
  logp_BxN: jax.Array  # policy log-probs at sampling time (the sampler's, or recomputed)
  ref_logp_BxN: jax.Array
  values_BxN: jax.Array  # zeros without a value model
  scores_B: jax.Array  # reward-model scores (gain/bias applied, EOS penalty included)


class TrainState(NamedTuple):
  trainable: Params
  opt_state: Any


# --- 1. Rollout -----------------------------------------------------------------------------


def rollout(policy, policy_vars: dict, prompt_BxP, prompt_mask_BxP, rng, scfg: SamplingConfig,
            eos_ids: tuple[int, ...], pad_id: int):
  """Samples scfg.num_samples responses per prompt.

  Returns (tokens_BxT, mask_BxT, response_mask_BxN, ended_B, sampler_logp_BxN).
  """
  out = sample(policy, policy_vars, prompt_BxP, prompt_mask_BxP, rng, scfg, eos_ids=eos_ids,
               pad_id=pad_id)
  return _join(out.prompt_tokens, out.prompt_mask, out.tokens, out.mask) + (out.ended,
                                                                             out.logprobs)


@jax.jit
def _join(prompt_BxP, prompt_mask_BxP, response_BxN, response_mask_BxN):
  tokens = jnp.concatenate([prompt_BxP, response_BxN], axis=1)
  mask = jnp.concatenate([prompt_mask_BxP, response_mask_BxN], axis=1)
  return tokens, mask, response_mask_BxN


# --- 2. Scoring -----------------------------------------------------------------------------


def response_logprobs(module, variables: dict, tokens_BxT, mask_BxT, n: int,
                      temperature: float, rngs: dict | None = None):
  """Log-probs of the last n tokens (the response) and the logits that gave them."""
  p = tokens_BxT.shape[1] - n
  # Position t predicts token t + 1: logits of positions P-1 .. T-2, none for the prompt.
  logits = module.apply(variables, tokens_BxT, mask_BxT=mask_BxT, rngs=rngs or {},
                        outputs_from=p - 1)
  logits_BxNxV = logits[:, :-1]
  return token_logprobs(logits_BxNxV, tokens_BxT[:, p:], temperature), logits_BxNxV


def response_values(module, variables: dict, tokens_BxT, mask_BxT, n: int, rngs=None):
  """Value of the state before each response token (the same shift as the log-probs)."""
  values = module.apply(variables, tokens_BxT, mask_BxT=mask_BxT, rngs=rngs or {},
                        outputs_from=tokens_BxT.shape[1] - n - 1)
  return values[:, :-1]


def make_score_fn(policy, reward, value, temperature: float, missing_eos_penalty: float,
                  recompute_logprobs: bool = True):
  """The jitted scoring phase: reward, reference, value (and old policy) log-probs in one program.

  Without `recompute_logprobs` the old log-probs are the sampler's (`sampler_logp_BxN`), valid
  when it sampled from the unfiltered softmax(logits / T) (see the module docstring).
  """
  merged = lambda module, variables: lora_lib.inference_variables(variables, module.lora)

  @jax.jit
  def score(policy_vars, ref_vars, reward_vars, reward_affine, value_vars, tokens_BxT, mask_BxT,
            response_mask_BxN, ended_B, sampler_logp_BxN):
    n = response_mask_BxN.shape[1]
    if recompute_logprobs:
      logp, _ = response_logprobs(policy, merged(policy, policy_vars), tokens_BxT, mask_BxT, n,
                                  temperature)
    else:
      logp = sampler_logp_BxN
    ref_logp, _ = response_logprobs(policy, ref_vars, tokens_BxT, mask_BxT, n, temperature)
    # Every row's last real token is in the response or is the prompt's last token, so the
    # reward model's last block runs for those positions only.
    start = tokens_BxT.shape[1] - n - 1
    raw = last_token(reward.apply(merged(reward, reward_vars), tokens_BxT, mask_BxT=mask_BxT,
                                  outputs_from=start), mask_BxT[:, start:])
    scores = reward_affine[0] * raw + reward_affine[1]  # gain, bias from reward training
    scores = scores - missing_eos_penalty * (~ended_B)
    if value is None:
      values = jnp.zeros_like(logp)
    else:
      values = response_values(value, merged(value, value_vars), tokens_BxT, mask_BxT, n)
    on = response_mask_BxN
    return (jnp.where(on, logp, 0.0), jnp.where(on, ref_logp, 0.0),
            jnp.where(on, values, 0.0), scores)

  return score


# --- 3. Advantages --------------------------------------------------------------------------


def advantages(c, batch: Rollout, kl_coef, reward_stats: rl.RunningMeanStd):
  """(advantages_BxN, returns_BxN, new reward_stats, metrics) for one rollout; pure and jit-able."""
  p = c.ppo
  mask = batch.response_mask_BxN
  kl = rl.kl_penalty(batch.logp_BxN, batch.ref_logp_BxN, p.kl_estimator, mask)
  scores = batch.scores_B
  if p.reward_norm:
    reward_stats = reward_stats.update(scores)
    scores = rl.normalize_and_clip(scores, reward_stats, p.reward_clip or None)
  elif p.reward_clip:
    scores = jnp.clip(scores, -p.reward_clip, p.reward_clip)
  seq_kl = rl.sequence_kl(kl, mask)
  if p.estimator == "gae":
    rewards = rl.per_token_rewards(scores, kl, mask, kl_coef)
    adv, returns = rl.gae(rewards, batch.values_BxN, mask, p.gamma, p.lam)
  else:  # critic-free: the KL penalty joins the sequence return
    seq_return = scores - kl_coef * seq_kl
    n = c.rollout.num_samples
    if p.estimator == "reinforce":
      adv = rl.reinforce_baseline_advantages(seq_return, mask)
    elif p.estimator == "rloo":
      adv = rl.rloo_advantages(seq_return, n, mask)
    else:
      adv = rl.grpo_advantages(seq_return, n, mask)
    returns = jnp.zeros_like(adv)
  if p.whiten_advantages:
    adv = rl.whiten(adv, mask, shift_mean=True)
  if p.adv_clip:
    adv = rl.clip_advantages(adv, p.adv_clip, mask)
  non_score = -kl_coef * seq_kl
  metrics = {
      "objective/kl": seq_kl.mean(),
      "objective/entropy": rl.masked_sum(-batch.logp_BxN, mask, axis=-1).mean(),  # as TRL
      "objective/non_score_reward": non_score.mean(),
      "objective/scores": batch.scores_B.mean(),
      "objective/rlhf_reward": (batch.scores_B + non_score).mean(),
      "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
      "val/num_eos_tokens": batch.ended_B.sum().astype(jnp.float32),
      "warn/response_length": mask.sum(-1).mean().astype(jnp.float32),
      "warn/perplexity": jnp.exp(-rl.masked_mean(batch.logp_BxN, mask)),
      "warn/kl_to_sft": seq_kl.mean(),
  }
  return adv, returns, reward_stats, metrics


# --- 4. Update ------------------------------------------------------------------------------


def make_update_fn(c, policy, value, policy_opt, value_opt) -> Callable:
  """One epoch of minibatch updates over a rollout -> (policy state, value state, metrics).

  Policy and value are updated by two separately jitted programs over the same minibatches
  (one permutation, drawn from the same key). Their parameters and optimizers are disjoint,
  so this is the math of one joint loss ``policy + vf_coef * value``; two half-size programs
  compile in about half the peak host memory of one (BUILD_NOTES: PPO iteration speed and
  memory), and critic warm-up iterations run the value program alone.

  Metrics are means over the applied minibatches, plus per-minibatch ``nonfinite/*`` flags
  ([num_minibatches], the max over both models) for `common.SkipCounter`: a minibatch with a
  non-finite loss or gradient leaves the model it was computed for unchanged.
  """
  p = c.ppo
  temperature = c.rollout.temperature
  dropout = policy.lora is not None and policy.lora.dropout > 0

  def policy_loss(trainable, frozen, mb, rng):
    rngs = {"lora_dropout": rng} if dropout else None
    mask = mb["response_mask"]
    variables = common.variables(frozen, trainable)
    logp, logits = response_logprobs(policy, variables, mb["tokens"], mb["mask"], mask.shape[1],
                                     temperature, rngs)
    pg, pg_metrics = rl.policy_loss(logp, mb["logp"], mb["adv"], mask, p.clip_eps,
                                    p.dual_clip or None)
    # Without an entropy bonus the entropy is a metric only: no backward pass through it.
    entropy = rl.entropy_from_logits(logits if p.entropy_coef else jax.lax.stop_gradient(logits),
                                     mask, temperature)
    loss = pg - p.entropy_coef * entropy if p.entropy_coef else pg
    metrics = {"loss/policy_avg": pg, "policy/entropy_avg": entropy,
               "policy/approxkl_avg": pg_metrics["approxkl"],
               "policy/clipfrac_avg": pg_metrics["clipfrac"], "val/ratio": pg_metrics["ratio"],
               "val/ratio_var": pg_metrics["ratio_var"]}
    if p.ptx_coef:
      ptx_logits = policy.apply(variables, mb["ptx_tokens"], mask_BxT=mb["ptx_mask"],
                                rngs=rngs or {})
      ptx, _ = rl.sft_loss(ptx_logits, mb["ptx_tokens"], mb["ptx_loss_mask"])
      loss = loss + p.ptx_coef * ptx
      metrics["loss/ptx_avg"] = ptx
    return loss, metrics

  def value_loss(trainable, frozen, mb, rng):
    del rng  # the value model has no dropout
    mask = mb["response_mask"]
    values = response_values(value, common.variables(frozen, trainable), mb["tokens"],
                             mb["mask"], mask.shape[1])
    vl, v_metrics = rl.value_loss(values, mb["values"], mb["returns"], mask, p.value_clip_eps)
    return p.vf_coef * vl, {"loss/value_avg": vl, "val/clipfrac_avg": v_metrics["clipfrac"]}

  policy_keys = ("tokens", "mask", "response_mask", "logp", "adv") + (
      ("ptx_tokens", "ptx_mask", "ptx_loss_mask") if p.ptx_coef else ())
  value_keys = ("tokens", "mask", "response_mask", "values", "returns")
  policy_epoch = _minibatch_epoch(policy_loss, policy_opt, p, "policy/grad_norm")
  value_epoch = None if value is None else _minibatch_epoch(value_loss, value_opt, p,
                                                           "val/grad_norm")

  def update(pol_state, val_state, frozen, data, rng, train_policy: bool = True):
    metrics, flags = {}, []
    if train_policy:
      pol_state, m, f = policy_epoch(pol_state, frozen["policy"],
                                     {k: data[k] for k in policy_keys}, rng)
      metrics.update(m)
      flags.append(f)
    if value_epoch is not None:
      val_state, m, f = value_epoch(val_state, frozen["value"],
                                    {k: data[k] for k in value_keys}, rng)
      metrics.update(m)
      flags.append(f)
    metrics.update(jax.tree.map(lambda *f_M: functools.reduce(jnp.maximum, f_M), *flags))
    return pol_state, val_state, metrics

  update.programs = {"policy": policy_epoch, "value": value_epoch}  # for cost analysis
  return update


def _minibatch_epoch(loss_fn: Callable, optimizer: optax.GradientTransformation, p,
                     grad_norm_key: str) -> Callable:
  """Jitted (state, frozen, data, rng) -> (state, mean metrics, per-minibatch flags) for one
  model: data shuffled by a permutation drawn from `rng`, split into ``p.num_minibatches``
  optimizer steps of ``p.grad_accum`` accumulated microbatches each.

  With ``flat=True`` the trainable tree and its optimizer state are flat vectors inside
  (`flat_state`): one vector instead of a leaf per adapter, so the optimizer, the finiteness
  checks and the scan carry are a handful of instructions rather than a group per leaf.
  Unless told, calls (and ``.lower``) choose ``flat = flat_state.on_one_device(trainable)``:
  under a multi-device mesh the tree form keeps every leaf's own sharding."""
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def minibatch_step(state, mb_and_rng, frozen, layout):
    mb, rng = mb_and_rng
    micro = jax.tree.map(lambda x: x.reshape((p.grad_accum, -1) + x.shape[1:]), mb)
    trainable = state.trainable if layout is None else layout.unravel(state.trainable)
    add = lambda a, b: jax.tree.map(jnp.add, a, b)

    def accumulate(acc, m_and_key):  # gradient accumulation over microbatches
      m, key = m_and_key
      grads, metrics = grad_fn(trainable, frozen, m, key)
      return add(acc, (grads if layout is None else layout.ravel(grads), metrics)), None

    _, met_shape = jax.eval_shape(loss_fn, trainable, frozen,
                                  jax.tree.map(lambda x: x[0], micro), rng)
    init = (jax.tree.map(jnp.zeros_like, state.trainable),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), met_shape))
    (grads, met), _ = jax.lax.scan(accumulate, init, (micro, jax.random.split(rng, p.grad_accum)))
    grads, met = jax.tree.map(lambda x: x / p.grad_accum, (grads, met))
    losses = jnp.stack([v for k, v in met.items() if k.startswith("loss/")])
    flags = common.nonfinite_flags(losses, grads)
    met[grad_norm_key] = optax.tree_utils.tree_norm(grads)
    state = common.apply_if(flags["nonfinite/any"] == 0, optimizer, state, grads)
    return state, (met, flags)

  @functools.partial(jax.jit, donate_argnums=(0,),
                     static_argnames=("flat",), compiler_options=host.gradient_compiler_options())
  def epoch(state, frozen, data, rng, flat: bool = True):
    packed = flat_state.flatten(optimizer, state.trainable, state.opt_state) if flat else None
    layout = None
    if packed is not None:
      layout, vector, flat_opt, unflatten = packed
      state = TrainState(vector, flat_opt)
    perm_rng, step_rng = jax.random.split(rng)
    perm = jax.random.permutation(perm_rng, data["tokens"].shape[0])
    mbs = jax.tree.map(lambda x: x[perm].reshape((p.num_minibatches, -1) + x.shape[1:]), data)
    keys = jax.random.split(step_rng, p.num_minibatches)
    state, (metrics, flags_M) = jax.lax.scan(
        functools.partial(minibatch_step, frozen=frozen, layout=layout), state, (mbs, keys))
    if layout is not None:
      state = TrainState(*unflatten(state.trainable, state.opt_state))
    # Means over the minibatches that were applied; the per-minibatch flags go to the host.
    ok_M = flags_M["nonfinite/any"] == 0
    mean = lambda x_M: jnp.where(ok_M.any(), jnp.where(ok_M, x_M, 0.0).sum()
                                 / jnp.maximum(ok_M.sum(), 1), jnp.nan)
    return state, jax.tree.map(mean, metrics), flags_M

  return _FlatWhereItFits(epoch)


class _FlatWhereItFits:
  """A jitted epoch whose static ``flat`` defaults to: is the trainable tree on one device?"""

  def __init__(self, jitted: Callable):
    self.jitted = jitted

  @staticmethod
  def _static(state, flat: bool | None) -> dict:
    return {"flat": flat_state.on_one_device(state.trainable) if flat is None else flat}

  def __call__(self, state, frozen, data, rng, flat: bool | None = None):
    return self.jitted(state, frozen, data, rng, **self._static(state, flat))

  def lower(self, state, frozen, data, rng, flat: bool | None = None):
    return self.jitted.lower(state, frozen, data, rng, **self._static(state, flat))


# --- The loop -------------------------------------------------------------------------------


class Models(NamedTuple):
  policy: common.Model
  reference_params: Params  # the policy's frozen base (LoRA) or its initial weights (full)
  reward: common.Model
  value: common.Model | None


def load_models(c, cache: common.BaseCache, rng) -> Models:
  """Policy, reference, reward and value; shared bases are loaded once (see BaseCache)."""
  r_pol, r_rew, r_val = jax.random.split(rng, 3)
  lcfg = common.lora_from_config(c.lora)
  policy = common.load_model(c.policy.init, head="lm", lora=lcfg, cache=cache, rng=r_pol)
  if policy.lora is not None:
    reference = policy.frozen["params"]
  else:
    reference = cache.get(c.policy.init)[1]
  reward = common.load_model(c.reward.init, head="scalar", lora=lcfg, cache=cache, rng=r_rew)
  value = None
  if c.ppo.estimator == "gae":
    value = common.load_model(c.value.init or c.reward.init, head="scalar", lora=lcfg,
                              cache=cache, rng=r_val)
  return Models(policy, reference, reward, value)


def recompute_logprobs(r) -> bool:
  """Whether old log-probs need a forward pass: the sampler's are of a filtered distribution."""
  return r.logprobs == "recompute" or r.top_k > 0 or r.top_p < 1.0


def rollout_arrays(batch: Rollout, adv, returns) -> dict:
  return dict(tokens=batch.tokens_BxT, mask=batch.mask_BxT, response_mask=batch.response_mask_BxN,
              logp=batch.logp_BxN, values=batch.values_BxN, adv=adv, returns=returns)


def ptx_batch(ptx_data: dict | None, rows: int, rng: np.random.Generator) -> dict:
  if ptx_data is None:
    return {}
  idx = rng.integers(ptx_data["tokens_BxT"].shape[0], size=rows)
  return dict(ptx_tokens=ptx_data["tokens_BxT"][idx], ptx_mask=ptx_data["mask_BxT"][idx],
              ptx_loss_mask=ptx_data["loss_mask_BxT"][idx])


def prompt_records(c) -> Any:
  """The RL prompts: ``data.prompts`` JSONL, or the train split of ``data.tfds`` (lazy)."""
  from perl_jax.data import jsonl, sources

  if c.data.tfds:
    return sources.tfds_split(c, "train", "prompts")
  return jsonl.read_jsonl(c.data.prompts, "prompts")


def train(c, workdir: str, gold_fn: Callable[[list[str]], np.ndarray] | None = None,
          prompts_cut: int | None = None) -> dict:
  """Runs c.total_iterations PPO iterations on the mesh of `config.mesh` (`trainers.layout`);
  returns a summary (gold reward when `gold_fn`).

  `prompts_cut`: the prompts longer than ``data.max_prompt_len``, when
  `perl_jax.train.check_inputs` has counted them already; None counts them here (one pass).
  """
  layout = Layout.from_config(c)
  if c.layouts == "auto":  # measures candidate meshes per phase (trainers/layout_cost.py)
    from perl_jax.trainers import layout_cost

    phase_layouts = layout_cost.choose_layouts(c, layout)
  else:
    phase_layouts = phases.PhaseLayouts.from_config(c, layout)
  with phase_layouts.train.activate():
    return _train(c, workdir, gold_fn, phase_layouts.train, prompts_cut, phase_layouts)


def _train(c, workdir: str, gold_fn: Callable[[list[str]], np.ndarray] | None,
           layout: Layout, prompts_cut: int | None,
           phase_layouts: phases.PhaseLayouts | None = None) -> dict:
  """The PPO loop; models load (and the update runs) on `layout`, rollout and scoring on
  `phase_layouts` (default: all on `layout`), with the weights moved by `phases.Reallocator`."""
  from perl_jax.data import jsonl, sources
  from perl_jax.data.pipeline import Batches
  from perl_jax.metrics import MetricsWriter
  from perl_jax.tokenizers import eos_ids

  # --- Setup: models, tokenizer, prompts, optimizers --------------------------------------
  host.fix_mmap_threshold()  # rollout, scoring and update buffers never fragment the heap
  rng = jax.random.PRNGKey(c.seed)
  rng, model_rng = jax.random.split(rng)
  np_rng = np.random.default_rng(c.seed)
  tokenizer = common.checked_tokenizer(c.policy.init)  # before anything compiles
  cache = common.BaseCache(c.dtype, layout)  # every model placed on the mesh as it loads
  models = load_models(c, cache, model_rng)
  policy, value = models.policy, models.value
  eos, pad = eos_ids(tokenizer, policy.cfg), int(tokenizer.pad_token_id)
  prompts = prompt_records(c)
  if len(prompts) < c.ppo.batch_size:
    raise ValueError(f"config.ppo.batch_size={c.ppo.batch_size} exceeds the {len(prompts)} "
                     f"prompts in {sources.name(c, 'train', c.data.prompts)}")
  fmt = sources.formatter(c, tokenizer)
  encode_prompts = lambda records: jsonl.encode_prompt_batch(
      tokenizer, fmt.records(records, "prompts"), c.data.max_prompt_len, c.data.truncate)[:2]
  n_cut = prompts_cut if prompts_cut is not None else sources.prompt_cuts(
      tokenizer, fmt, prompts, "prompts", c.data.max_prompt_len, c.data.truncate)
  # The prompts of each iteration come from the input pipeline (epochs of shuffled prompts,
  # resumable at the checkpoint's data position); evaluation uses a fixed set. Multi-host:
  # each process encodes only the rows its devices hold (`Layout.global_batch` joins them).
  shard_index, shard_count = layout.process_shard()
  prompt_batches = Batches(prompts, lambda records: dict(zip(("tokens", "mask"),
                                                             encode_prompts(records))),
                           c.ppo.batch_size, c.seed, process_index=shard_index,
                           process_count=shard_count)
  shards = layout.batch_shards  # divides ppo.batch_size <= len(prompts)
  n_eval = max(min(64, len(prompts)) // shards, 1) * shards
  eval_rows = np_rng.choice(len(prompts), n_eval, replace=False)
  eval_prompts = fmt.records(prompt_batches.fetch(eval_rows), "prompts")
  eval_tokens, eval_mask = encode_prompts(eval_prompts)
  ptx_data = None
  if c.ppo.ptx_coef:
    ptx_data = jsonl.encode_sft(tokenizer, fmt.records(jsonl.read_jsonl(c.data.train, "sft"),
                                                       "sft"),
                                c.data.max_prompt_len, c.data.max_response_len, c.data.truncate)
  scfg = SamplingConfig(max_new_tokens=c.rollout.max_new_tokens,
                        temperature=c.rollout.temperature, top_k=c.rollout.top_k,
                        top_p=c.rollout.top_p, num_samples=c.rollout.num_samples,
                        stop_at_eos=c.rollout.stop_at_eos)
  eval_scfg = dataclasses.replace(scfg, num_samples=1)
  policy_opt = common.make_optimizer(c.optimizer)
  value_opt = common.make_optimizer(c.optimizer, lr=c.ppo.value_lr or None)
  pol_state = TrainState(policy.trainable, layout.init_opt_state(policy_opt, policy.trainable))
  val_state = None if value is None else TrainState(
      value.trainable, layout.init_opt_state(value_opt, value.trainable))
  frozen = {"policy": policy.frozen, "value": None if value is None else value.frozen}
  reward_vars = models.reward.variables()
  reward_affine = jnp.asarray([models.reward.reward_gain, models.reward.reward_bias], jnp.float32)
  kl_ctl = (rl.AdaptiveKL(c.ppo.kl_coef, c.ppo.kl_target, c.ppo.kl_horizon) if c.ppo.adaptive_kl
            else rl.FixedKL(c.ppo.kl_coef))
  kl_state = kl_ctl.init_state()
  reward_stats = rl.RunningMeanStd.create()
  score_fn = make_score_fn(policy.module, models.reward.module,
                           None if value is None else value.module, c.rollout.temperature,
                           c.ppo.missing_eos_penalty, recompute_logprobs(c.rollout))
  advantages_fn = jax.jit(functools.partial(advantages, c))
  update_fn = make_update_fn(c, policy.module, None if value is None else value.module,
                             policy_opt, value_opt)

  ph = phase_layouts or phases.PhaseLayouts.uniform(layout)
  realloc = phases.Reallocator()

  def placed(phase: str) -> dict:
    """The variables `phase` reads, on its layout: frozen trees placed once per layout, the
    trainable trees (current adapters and heads) moved on every call."""
    on = getattr(ph, phase)
    out = {"policy": realloc.variables(policy.module, policy.frozen, pol_state.trainable, on)}
    if phase == "score":
      out["ref"] = realloc.frozen(policy.module, {"params": models.reference_params}, on)
      out["reward"] = realloc.frozen(models.reward.module, reward_vars, on)
      out["value"] = None if value is None else realloc.variables(
          value.module, value.frozen, val_state.trainable, on)
    return out

  def generate_and_score(gen_vars, score_vars, prompts, rng, sampling):
    """Rollout on the generate layout, its outputs re-split onto the score layout, scoring;
    returns (the rollout and its scores on the train layout, the time the rollout was done).
    Small replicated state moves along: eager ops need all inputs on the active mesh."""
    with ph.generate.activate():
      out = rollout(policy.module, gen_vars["policy"], *ph.generate.shard_batch(prompts),
                    ph.generate.replicate(rng), sampling, eos, pad)
    jax.block_until_ready(out[0])
    t_generated = time.perf_counter()
    with ph.score.activate():
      tokens, mask, resp_mask, ended, sampler_logp = ph.score.shard_batch(out)
      scored = score_fn(score_vars["policy"], score_vars["ref"], score_vars["reward"],
                        ph.score.replicate(reward_affine), score_vars["value"], tokens, mask,
                        resp_mask, ended, sampler_logp)
    realloc.offload(models.reward.module, reward_vars, ph.score, keep=[
        gen_vars, score_vars["policy"], score_vars["ref"], score_vars["value"]])
    return layout.shard_batch((tokens, mask, resp_mask, ended) + tuple(scored)), t_generated

  def evaluate(it: int, rng) -> dict:
    """Reward score, KL to the reference and (synthetic task) gold reward of fresh samples."""
    (tokens, mask, resp_mask, ended, logp, ref_logp, _, scores), _ = generate_and_score(
        placed("generate"), placed("score"), (eval_tokens, eval_mask), rng, eval_scfg)
    kl = rl.sequence_kl(rl.kl_k1(logp, ref_logp), resp_mask)
    # Multi-host: every process gathers all rows (the gold reward and samples need them).
    resp_mask_h, response_h, scores_h = to_host((resp_mask, tokens[:, -resp_mask.shape[1]:],
                                                 scores))
    texts = tokenizer.batch_decode(np.where(resp_mask_h, response_h, pad),
                                   skip_special_tokens=True)
    out = {"eval/score": float(scores.mean()), "eval/kl_to_sft": float(kl.mean()),
           "eval/response_length": float(resp_mask.sum(-1).mean())}
    if gold_fn is not None:
      out["eval/gold_reward"] = float(np.mean(gold_fn(texts)))
    writer.write_samples(it, [dict(prompt=r["prompt"], response=t, score=float(s))
                              for r, t, s in zip(eval_prompts[:4], texts, scores_h)])
    return out

  # --- Resume: the latest checkpoint in WORKDIR/checkpoints, if any -----------------------
  def state_tree() -> dict:
    tree = {"policy": pol_state, "rng": rng, "kl": kl_state, "reward_stats": reward_stats}
    return tree if val_state is None else {**tree, "value": val_state}

  ckpt = checkpoint.Checkpointer(workdir, c, bases={
      "policy": policy.base, "reward": models.reward.base,
      "value": None if value is None else value.base})
  skips = common.SkipCounter(c.optimizer.max_consecutive_skips)
  evals, episode, start, position = [], 0, 0, 0
  restored = ckpt.restore(state_tree())
  if restored is not None:
    state, meta = restored
    pol_state, val_state = state["policy"], state.get("value")
    rng, kl_state, reward_stats = state["rng"], state["kl"], state["reward_stats"]
    np_rng.bit_generator.state = meta["numpy_rng"]  # PPO-ptx batches (PCG64 state: JSON ints)
    start, episode, skips.total = meta["step"], meta["episode"], meta["skipped_steps"]
    position = meta["data_position"]
    evals = [(it, e) for it, e in meta["evals"]]
  # Iteration `it` logs at step `it`: a resumed run drops what iterations >= start had written.
  writer = MetricsWriter(workdir, c.total_iterations, progress=c.progress, keep_below=start,
                         progress_keys=("objective/scores", "objective/kl", "eval/gold_reward"))
  if not start:
    n_train = common.count(pol_state.trainable)
    writer.write(0, {"params/policy_trainable": n_train, "params/prompts_truncated": n_cut,
                     "params/policy_trainable_fraction": n_train / (
                         n_train + common.count(policy.frozen))})

  # --- Loop: rollout, scoring, advantages, update -----------------------------------------
  stream = prompt_batches.iterate(start=position)
  with checkpoint.PreemptionGuard() as guard, ckpt:
    for it in range(start, c.total_iterations):
      if it % c.eval_every == 0:
        rng, key = jax.random.split(rng)
        evals.append((it, evaluate(it, key)))
        writer.write(it, evals[-1][1])
      t_realloc = time.perf_counter()  # weights to the generate and score layouts
      gen_vars, score_vars = placed("generate"), placed("score")
      t_realloc = _ready((gen_vars, score_vars), t_realloc)
      t0 = time.perf_counter()
      rng, k_roll, k_update = jax.random.split(rng, 3)
      prompt_batch = next(stream)
      position = prompt_batch.position + 1
      # Each process encoded its own rows of the batch; global_batch joins them (multi-host).
      prompts = layout.global_batch((prompt_batch.arrays["tokens"], prompt_batch.arrays["mask"]))
      (tokens, mask, resp_mask, ended, logp, ref_logp, values, scores), t_generated = (
          generate_and_score(gen_vars, score_vars, prompts, k_roll, scfg))
      t_gen = t_generated - t0
      t_score = _ready(scores, t0 + t_gen)
      batch = Rollout(tokens, mask, resp_mask, ended, logp, ref_logp, values, scores)
      adv, returns, reward_stats, metrics = advantages_fn(batch, kl_state, reward_stats)
      data = layout.shard_batch({**rollout_arrays(batch, adv, returns),
                                 **ptx_batch(ptx_data, tokens.shape[0], np_rng)})
      for epoch in range(c.ppo.epochs):
        pol_state, val_state, update_metrics = update_fn(
            pol_state, val_state, frozen, data, jax.random.fold_in(k_update, epoch),
            train_policy=it >= c.ppo.critic_warmup_iters)
        update_metrics = skips.update(it, update_metrics)  # the host waits for the update here
      kl_state = kl_ctl.update(kl_state, metrics["objective/kl"], tokens.shape[0])
      t_train = _ready(kl_state, t0 + t_gen + t_score)
      episode += tokens.shape[0]
      iter_s = t_realloc + t_gen + t_score + t_train
      if it % c.log_every == 0 or it == c.total_iterations - 1:
        writer.write(it, {**metrics, **update_metrics, "lr": c.optimizer.lr, "episode": episode,
                          "perf/iter_s": iter_s, "perf/generate_s": t_gen,
                          "perf/score_s": t_score, "perf/train_s": t_train,
                          "perf/realloc_s": t_realloc,
                          "perf/tokens_per_s": float(resp_mask.sum()) / iter_s})
      done = it + 1
      if ckpt.due(done) or done == c.total_iterations or guard.requested:
        ckpt.save(done, state_tree(), {"numpy_rng": np_rng.bit_generator.state,
                                       "data_position": position, "episode": episode,
                                       "skipped_steps": skips.total, "evals": evals})
      if guard.requested:
        writer.close()
        raise checkpoint.Preempted(done, ckpt.directory)
  rng, key = jax.random.split(rng)
  evals.append((c.total_iterations, evaluate(c.total_iterations, key)))
  writer.write(c.total_iterations, evals[-1][1])
  writer.close()

  # --- Summary ----------------------------------------------------------------------------
  first, last = evals[0][1], evals[-1][1]
  summary = {"score_before": first["eval/score"], "score_after": last["eval/score"],
             "kl_to_sft": last["eval/kl_to_sft"],
             "response_length_after": last["eval/response_length"]}
  if gold_fn is not None:
    summary.update(gold_reward_before=first["eval/gold_reward"],
                   gold_reward_after=last["eval/gold_reward"])
  final = common.Model(policy.module, policy.frozen, pol_state.trainable, policy.base,
                       policy.tokenizer_dir)
  trainable = to_host(pol_state.trainable)  # every process takes part in the gather
  if distributed.is_primary():  # one writer; the others wait until the model is complete
    common.save_model(f"{workdir}/policy", final, trainable)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ppo: final policy saved")
  return summary


def _ready(tree, since: float) -> float:
  """Seconds from `since` until `tree` is computed (the phases run asynchronously)."""
  jax.block_until_ready(tree)
  return time.perf_counter() - since
