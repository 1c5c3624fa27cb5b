"""PPO's three phases as stand-alone runs on any layout, for `layout_cost` (``layouts=auto``).

Each probe runs the trainer's own phase function (`ppo.rollout`, `ppo.make_score_fn`,
`ppo.make_update_fn`) on the real models, with a batch of random prompt tokens of the
configured shapes (random tokens cost what real ones do). The update donates its state, so
its probe runs on fresh copies of the trainable trees and a fresh optimizer state (included
in its time: a few small device copies next to the update itself).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax.sampling import SamplingConfig
from perl_jax.trainers import common, phases, ppo
from perl_jax.trainers.layout import Layout


def batch_rows(c: Any) -> tuple[int, ...]:
  """The leading sizes the phases split over data x fsdp: prompts, responses, microbatches."""
  p = c.ppo
  responses = p.batch_size * c.rollout.num_samples
  return (p.batch_size, responses, responses // (p.num_minibatches * p.grad_accum))


def build(c: Any, main: Layout) -> tuple[dict, Callable]:
  """({'generate', 'score', 'train': probe, 'heads': int}, move(layout, trees=None)), where
  probe(layout) -> (thunk, lower or None) as `layout_cost.measure` wants, and `move` places the
  trainable trees (policy, value) on a layout: the per-iteration reallocation."""
  from perl_jax.tokenizers import eos_ids

  rng = jax.random.PRNGKey(c.seed)
  tokenizer = common.checked_tokenizer(c.policy.init)
  with main.activate():
    models = ppo.load_models(c, common.BaseCache(c.dtype, main), rng)
  policy, reward, value = models.policy, models.reward, models.value
  eos, pad = eos_ids(tokenizer, policy.cfg), int(tokenizer.pad_token_id)
  b, length = c.ppo.batch_size, c.data.max_prompt_len
  high = min(len(tokenizer), policy.cfg.vocab_size)
  prompts = (np.random.default_rng(c.seed).integers(3, high, (b, length)).astype(np.int32),
             np.ones((b, length), bool))
  r = c.rollout
  scfg = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                        top_k=r.top_k, top_p=r.top_p, num_samples=r.num_samples,
                        stop_at_eos=r.stop_at_eos)
  realloc = phases.Reallocator()
  affine = np.asarray([reward.reward_gain, reward.reward_bias], np.float32)
  score_fn = ppo.make_score_fn(policy.module, reward.module, value and value.module,
                               r.temperature, c.ppo.missing_eos_penalty,
                               ppo.recompute_logprobs(r))
  policy_opt = common.make_optimizer(c.optimizer)
  value_opt = common.make_optimizer(c.optimizer, lr=c.ppo.value_lr or None)
  update_fn = ppo.make_update_fn(c, policy.module, value and value.module, policy_opt, value_opt)

  def policy_vars(layout):
    return realloc.variables(policy.module, policy.frozen, policy.trainable, layout)

  def rollout_on(layout):
    return ppo.rollout(policy.module, policy_vars(layout), *layout.shard_batch(prompts),
                       layout.replicate(rng), scfg, eos, pad)

  with main.activate():
    sampled = jax.device_get(rollout_on(main))  # the batch scoring and the update read

  def generate(layout):
    return (lambda: rollout_on(layout)[0]), None

  def score(layout):
    args = (policy_vars(layout),
            realloc.frozen(policy.module, {"params": models.reference_params}, layout),
            realloc.frozen(reward.module, reward.variables(), layout),
            layout.replicate(affine),
            value and realloc.variables(value.module, value.frozen, value.trainable, layout),
            *layout.shard_batch(sampled))
    return (lambda: score_fn(*args)), (lambda: score_fn.lower(*args))

  tokens, mask, resp_mask = sampled[:3]
  noise = np.random.default_rng(1).normal(size=resp_mask.shape).astype(np.float32)
  data_host = dict(tokens=tokens, mask=mask, response_mask=resp_mask, logp=noise - 2.0,
                   values=noise, adv=noise, returns=noise)
  if c.ppo.ptx_coef:  # PPO-ptx batches: the rollout's own tokens stand in for SFT data
    data_host.update(ptx_tokens=tokens, ptx_mask=mask, ptx_loss_mask=mask)
  policy_keys = ("tokens", "mask", "response_mask", "logp", "adv") + (
      ("ptx_tokens", "ptx_mask", "ptx_loss_mask") if c.ppo.ptx_coef else ())

  def fresh(model, opt, layout):
    if model is None:
      return None
    trainable = jax.tree.map(jnp.copy, realloc.trainable(model.module, model.trainable, layout))
    return ppo.TrainState(trainable, layout.init_opt_state(opt, trainable))

  def train(layout):
    frozen = {"policy": realloc.frozen(policy.module, policy.frozen, layout),
              "value": value and realloc.frozen(value.module, value.frozen, layout)}
    data = layout.shard_batch(data_host)
    key = layout.replicate(rng)

    def thunk():
      return update_fn(fresh(policy, policy_opt, layout), fresh(value, value_opt, layout),
                       frozen, data, key)[2]

    def lower():  # the policy's program (the value's is the same shape of work, smaller)
      state = fresh(policy, policy_opt, layout)
      return update_fn.programs["policy"].lower(state, frozen["policy"],
                                                {k: data[k] for k in policy_keys}, key)

    return thunk, lower

  def move(layout, trees=None):
    trees = trees or {"policy": policy.trainable, "value": value and value.trainable}
    return {"policy": realloc.trainable(policy.module, trees["policy"], layout),
            "value": value and realloc.trainable(value.module, trees["value"], layout)}

  probes = {"generate": generate, "score": score, "train": train, "heads": policy.cfg.num_heads}
  return probes, move
