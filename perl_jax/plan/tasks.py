"""The phases of each task, built from the trainers' own functions and the models' shapes.

PPO (`perl_jax.trainers.ppo.train`): ``generate`` (the compiled KV-cache sampler: prefill +
decode of ppo.batch_size x rollout.num_samples responses), ``score`` (reward, reference, value
and, when the sampler's log-probs cannot be used, policy forward passes), ``update/policy`` and
``update/value`` (one epoch of minibatch steps each, `ppo.make_update_fn`'s two programs), and
``eval generate`` / ``eval score`` when evaluation (64 prompts rounded to whole batch shards,
one sample each) has more rows than training. SFT and reward: the train step
(`make_train_step`). Batches have the trainers' fixed shapes: prompts of data.max_prompt_len
tokens, rollout.max_new_tokens new ones, SFT and preference rows of max_prompt_len +
max_response_len + 1.

Not compiled: PPO's advantages (a few [rows, N] vectors), evaluation steps of SFT and reward,
and the reward trainer's normalisation sampling after training.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax.numpy as jnp

from perl_jax.plan import phases as ph
from perl_jax.plan.models import Models
from perl_jax.trainers import common
from perl_jax.trainers.layout import Layout

EVAL_PROMPTS = 64  # ppo.train evaluates on min(64, number of prompts) prompts...


def eval_rows(batch_shards: int) -> int:
  """...rounded down to whole batch shards, at least one each (as ppo.train; the prompt file
  is not read, so it is assumed to hold at least 64)."""
  return max(EVAL_PROMPTS // batch_shards, 1) * batch_shards


def placed_trees(models: Models, layout: Layout, optimizers: dict[str, Any]) -> dict[str, Any]:
  """Every tree of `models` with the shardings the trainers give it on `layout`."""
  from perl_jax.models import Transformer

  out = {}
  for name, tree in models.trees.items():
    if name == "bases":
      out[name] = {k: ph.place_model_tree(Transformer(cfg), {"params": base}, layout)
                   for (k, base), cfg in zip(tree.items(), models.bases)}
      continue
    if name == "reference":
      module = models.modules["policy"]
      out[name] = ph.place_model_tree(module, {"params": tree}, layout)["params"]
      continue
    model, kind = name.split("/")
    if kind != "opt":
      out[name] = ph.place_model_tree(models.modules[model], tree, layout)
  for name, tree in models.trees.items():
    if name.endswith("/opt"):
      model = name.split("/")[0]
      out[name] = ph.place_opt_state(optimizers[model], tree, out[f"{model}/trainable"], layout)
  return out


def ppo_phases(c: Any, models: Models, placed: dict, optimizers: dict,
               devices: Sequence[Any] | int, layout=ph.phase_layout) -> list[ph.Phase]:
  """PPO's phases, each on `layout(c, devices, name)`. The held state comes placed (`placed`)
  on the state's layout, which every phase shares today; a phase with a layout of its own would
  take its state resharded, which is not planned yet."""
  from perl_jax import sampling
  from perl_jax.trainers import ppo

  p, r = c.ppo, c.rollout
  policy, reward, value = (models.modules.get(k) for k in ("policy", "reward", "value"))
  prompts, n, plen = p.batch_size, r.max_new_tokens, c.data.max_prompt_len
  rows = prompts * r.num_samples
  scfg = sampling.SamplingConfig(max_new_tokens=n, temperature=r.temperature, top_k=r.top_k,
                                 top_p=r.top_p, num_samples=r.num_samples,
                                 stop_at_eos=r.stop_at_eos)
  policy_vars = common.variables(placed["policy/frozen"], placed["policy/trainable"])
  value_vars = None if value is None else common.variables(placed["value/frozen"],
                                                           placed["value/trainable"])
  score_fn = ppo.make_score_fn(policy, reward, value, r.temperature, p.missing_eos_penalty,
                               ppo.recompute_logprobs(r))
  update_fn = ppo.make_update_fn(c, policy, value, optimizers["policy"], optimizers.get("value"))

  def generate(name, num_prompts, config):
    lay = layout(c, devices, name)
    args = (policy, policy_vars, ph.batch((num_prompts, plen), jnp.int32, lay),
            ph.batch((num_prompts, plen), jnp.bool_, lay), ph.rng(lay))
    static = dict(cfg=config, eos_ids=policy.cfg.eos_token_ids,
                  pad_id=int(policy.cfg.pad_token_id or 0))
    kv = kv_cache_bytes(policy.cfg, num_prompts * config.num_samples, plen + n, lay)
    # The sampler's jitted function itself: `sampling.sample` calls it (and cannot be lowered).
    return ph.Phase(name, sampling._sample_jit, args, static, (1,), lay, kv)

  def score(name, num_rows):
    lay = layout(c, devices, name)
    f32 = lambda *s: ph.batch(s, jnp.float32, lay)
    args = (policy_vars, {"params": placed["reference"]},
            common.variables(placed["reward/frozen"], placed["reward/trainable"]),
            ph.replicated((2,), jnp.float32, lay), value_vars,
            ph.batch((num_rows, plen + n), jnp.int32, lay),
            ph.batch((num_rows, plen + n), jnp.bool_, lay),
            ph.batch((num_rows, n), jnp.bool_, lay), ph.batch((num_rows,), jnp.bool_, lay),
            f32(num_rows, n))
    return ph.Phase(name, score_fn, args, {}, (0, 1, 2, 4), lay)

  def update(model, keys):
    name = f"update/{model}"
    lay = layout(c, devices, name)
    data = {k: _rollout_array(k, rows, plen, n, lay) for k in keys}
    if model == "policy" and p.ptx_coef:
      t = plen + c.data.max_response_len + 1
      data.update(ptx_tokens=ph.batch((rows, t), jnp.int32, lay),
                  ptx_mask=ph.batch((rows, t), jnp.bool_, lay),
                  ptx_loss_mask=ph.batch((rows, t), jnp.bool_, lay))
    state = ppo.TrainState(placed[f"{model}/trainable"], placed[f"{model}/opt"])
    args = (state, placed[f"{model}/frozen"], data, ph.rng(lay))
    return ph.Phase(name, update_fn.programs[model], args, {}, (0, 1), lay)

  out = [generate("generate", prompts, scfg), score("score", rows),
         update("policy", ("tokens", "mask", "response_mask", "logp", "adv"))]
  if value is not None:
    out.append(update("value", ("tokens", "mask", "response_mask", "values", "returns")))
  n_eval = eval_rows(layout(c, devices, "eval").batch_shards)
  if n_eval > rows:
    out += [generate("eval generate", n_eval, dataclasses.replace(scfg, num_samples=1)),
            score("eval score", n_eval)]
  return out


def _rollout_array(key: str, rows: int, plen: int, n: int, layout: Layout):
  if key in ("tokens", "mask"):
    return ph.batch((rows, plen + n), jnp.int32 if key == "tokens" else jnp.bool_, layout)
  return ph.batch((rows, n), jnp.bool_ if key == "response_mask" else jnp.float32, layout)


def kv_cache_bytes(cfg, rows: int, length: int, layout: Layout) -> int:
  """Per-device bytes of the sampler's KV cache: k and v of [rows, length, K, h] per layer,
  laid out by the model's constraint ('batch', 'cache_length', 'kv_heads', 'head_dim'); XLA
  pads a dimension its mesh axes do not divide."""
  import flax.linen as nn

  spec = nn.logical_to_mesh_axes(("batch", "cache_length", "kv_heads", "head_dim"),
                                 layout.rules)
  shape = (rows, length, cfg.num_kv_heads, cfg.head_dim)
  shard = 1
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shard *= -(-dim // math.prod(layout.mesh.shape[a] for a in axes))
  return 2 * cfg.num_layers * shard * jnp.dtype(cfg.compute_dtype).itemsize


def train_phase(c: Any, models: Models, placed: dict, optimizers: dict,
                devices: Sequence[Any] | int, layout=ph.phase_layout) -> list[ph.Phase]:
  """The SFT or reward train step on one data.batch_size batch."""
  from perl_jax.trainers import reward, sft

  name = "train step"
  lay = layout(c, devices, name)
  b, t = c.data.batch_size, c.data.max_prompt_len + c.data.max_response_len + 1
  tokens = lambda: ph.batch((b, t), jnp.int32, lay)
  mask = lambda: ph.batch((b, t), jnp.bool_, lay)
  model = "policy" if c.task == "sft" else "reward"
  module, optimizer = models.modules[model], optimizers[model]
  if c.task == "sft":
    step = sft.make_train_step(module, optimizer)
    data = {"tokens_BxT": tokens(), "mask_BxT": mask(), "loss_mask_BxT": mask()}
  else:
    kind = reward_kind(c)
    step = reward.make_train_step(module, optimizer, kind, c.reward_model.margin,
                                  c.reward_model.center_coef)
    if kind == "pairwise":
      data = {"chosen_tokens_BxT": tokens(), "chosen_mask_BxT": mask(),
              "rejected_tokens_BxT": tokens(), "rejected_mask_BxT": mask()}
    else:
      data = {"tokens_BxT": tokens(), "mask_BxT": mask(),
              "labels_B": ph.batch((b,), jnp.float32, lay)}
  args = (placed[f"{model}/trainable"], placed[f"{model}/opt"], placed[f"{model}/frozen"], data,
          ph.rng(lay), ph.replicated((), jnp.int32, lay))
  return [ph.Phase(name, step, args, {}, (0, 1, 2), lay)]


def reward_kind(c: Any) -> str:
  """'pairwise' or 'pointwise', as the reward trainer decides it (the synthetic task: pairwise)."""
  kind = c.reward_model.loss
  if kind != "auto":
    return kind
  if c.data.tfds:
    from perl_jax.data import published

    return published.DATASETS[c.data.tfds][0]
  if c.data.train:
    from perl_jax.data import jsonl

    return jsonl.detect_preference_kind(c.data.train)
  return "pairwise"
