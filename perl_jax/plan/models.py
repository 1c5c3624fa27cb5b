"""The models a trainer holds, as shapes, built by the trainer's own loaders with no weights read.

`abstract_models(c)` runs the configured task's loading code (`ppo.load_models`, or
`common.load_model` for SFT and reward, then the same copies and optimizer states their
`train` functions make) under `jax.eval_shape`, with a `BaseCache` whose checkpoints are their
config.json alone (`ShapeCache`). Every tree comes out as `jax.ShapeDtypeStruct`s built
exactly as the trainer builds it: which layers get adapters, which head is fresh, what the
reference policy is. A perl_jax model directory's trainable file (adapters and head; every
weight for full fine-tuning) is read as the loader reads it.

Sharing (PERL): models built on one checkpoint share the cache's arrays, so inside the trace
their leaves are the same tracer objects; `Models.repeats` records every leaf that repeats an
earlier one, and memory counts it once.

What is counted is what `train` keeps referenced for the whole run: the cache's bases (the
reference policy, with full fine-tuning), frozen and trainable trees, optimizer states. SFT
and reward trainers train a copy of the loaded trainable tree and keep the loaded one too, so
with full fine-tuning from a checkpoint they hold three copies of the weights (base, loaded,
trained); the plan counts them as the trainers hold them.

The synthetic task (no checkpoint given) trains its own SFT policy, then a LoRA reward model
on it. Here that SFT checkpoint is a stand-in directory that `ShapeCache` knows the config of
(`config.model` with the synthetic vocabulary; writing a real config.json would import
transformers and torch, seconds), and the reward and value models are built on it as the
prerequisite stages build them (LoRA with `config.lora`, or rank 8 for full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from perl_jax import lora as lora_lib
from perl_jax.lora import path_str
from perl_jax.models import ModelConfig, Transformer, init_params
from perl_jax.models.hf import read_hf_config
from perl_jax.trainers import common

# Which resident category each tree belongs to (see `Models.trees`).
CATEGORY = {"bases": "params", "frozen": "params", "reference": "params",
            "trainable": "trainable", "loaded": "trainable", "opt": "optimizer"}


@dataclasses.dataclass
class Models:
  """Modules and abstract trees of one task's models."""

  modules: dict[str, Transformer]  # 'policy', 'reward', 'value' (those the task has)
  # 'bases', '<model>/frozen', '<model>/trainable', '<model>/opt', 'reference', ...
  trees: dict[str, Any]
  repeats: set[tuple[str, str]]  # (tree, leaf path) of leaves already in an earlier tree
  bases: list[ModelConfig]  # the distinct checkpoints loaded (or built from scratch)

  @property
  def lora(self) -> dict[str, lora_lib.LoraConfig | None]:
    return {k: m.lora for k, m in self.modules.items()}


class ShapeCache(common.BaseCache):
  """A `BaseCache` whose checkpoints are shapes: config.json is read, weights never are.

  `stand_ins` maps directories to the config they stand for (the synthetic SFT policy). Use
  inside `jax.eval_shape`: `init_params` is traced, not run.
  """

  def __init__(self, dtype: str, stand_ins: dict[str, ModelConfig] | None = None):
    super().__init__(dtype)
    self.stand_ins = {os.path.realpath(k): v for k, v in (stand_ins or {}).items()}

  def get(self, path: str) -> tuple[ModelConfig, Any]:
    key = os.path.realpath(path)
    if key not in self._loaded:
      cfg = self.stand_ins.get(key) or read_hf_config(path, self.dtype)
      self._loaded[key] = (cfg, init_params(Transformer(cfg), jax.random.PRNGKey(0)))
    return self._loaded[key]

  def loaded(self) -> list[tuple[ModelConfig, Any]]:
    """(config, params) of every checkpoint asked for, in order."""
    return list(self._loaded.values())


def synthetic_policy_config(c: Any) -> ModelConfig:
  """The model SFT trains from scratch: `config.model` with the synthetic task's vocabulary,
  or, for SFT on your own data, the byte-level BPE it may fit instead (an upper bound: the
  synthetic vocabulary is used when it covers the data)."""
  from perl_jax.data import synthetic
  from perl_jax.trainers import sft

  special = {f"{name}_token_id": synthetic.VOCAB.index(f"<{name}>") for name in
             ("pad", "bos", "eos")}
  own_data = c.task == "sft" and (c.data.train or c.data.tfds)
  vocab = sft.BPE_VOCAB if own_data else len(synthetic.VOCAB)
  return common.scratch_config(c, vocab, special, c.dtype)


def _traced(build) -> tuple[dict[str, Any], set[tuple[str, str]]]:
  """eval_shape of build() -> {name: tree}, and the leaves that repeat an earlier one."""
  repeats: set[tuple[str, str]] = set()

  def run():
    trees = build()
    seen: set[int] = set()
    for name, tree in trees.items():
      for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if id(leaf) in seen:
          repeats.add((name, path_str(path)))
        seen.add(id(leaf))
    return trees

  return jax.eval_shape(run), repeats


def optimizers(c: Any) -> dict[str, Any]:
  """{model: optimizer} as the trainers make them (PPO's value model: ``ppo.value_lr``)."""
  if c.task == "ppo":
    return {"policy": common.make_optimizer(c.optimizer),
            "value": common.make_optimizer(c.optimizer, lr=c.ppo.value_lr or None)}
  return {"policy" if c.task == "sft" else "reward": common.make_optimizer(c.optimizer)}


def abstract_models(c: Any, optimizers: dict[str, Any]) -> Models:
  """The models of task `c.task` as shapes (see the module docstring), with the optimizer
  states of `optimizers` (from `optimizers(c)`)."""
  with tempfile.TemporaryDirectory() as scratch_dir:
    c, stand_ins = _with_synthetic_checkpoint(c, scratch_dir)
    cache = ShapeCache(c.dtype, stand_ins)
    modules: dict[str, Transformer] = {}
    build = {"ppo": _ppo, "sft": _sft, "reward": _reward}[c.task]
    trees, repeats = _traced(lambda: build(c, cache, modules, optimizers))
    bases = [cfg for cfg, _ in cache.loaded()]
  if c.task == "sft" and not c.policy.init and c.lora.rank:  # LoRA on a random frozen model
    bases.append(modules["policy"].cfg)
  return Models(modules, trees, repeats, bases)


def _with_synthetic_checkpoint(c: Any, scratch_dir: str) -> tuple[Any, dict[str, ModelConfig]]:
  """(`c` with `scratch_dir` standing in for the synthetic SFT policy where a checkpoint is
  missing, {scratch_dir: its config}). The loaders only check that config.json exists."""
  if c.task == "sft" or c.policy.init or (c.task == "reward" and c.reward.init):
    return c, {}
  cfg = synthetic_policy_config(c)
  with open(os.path.join(scratch_dir, "config.json"), "w") as f:
    f.write('{"_comment": "perl_jax.plan stand-in for the synthetic SFT policy; no weights"}')
  c = c.copy_and_resolve_references()
  c.policy.init = scratch_dir
  return c, {scratch_dir: cfg}


def _rng(i: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(0), i)


def _sft(c, cache, modules, optimizers):
  # From scratch (no policy.init) the SFT trainer builds a random model; nothing is cached.
  scratch = None if c.policy.init else synthetic_policy_config(c)
  model = common.load_model(c.policy.init, head="lm", lora=common.lora_from_config(c.lora),
                            cache=cache, rng=_rng(0), scratch=scratch)
  modules["policy"] = model.module
  return _single("policy", model, cache, optimizers["policy"])


def _reward(c, cache, modules, optimizers):
  model = common.load_model(c.reward.init or c.policy.init, head="scalar",
                            lora=common.lora_from_config(c.lora), cache=cache, rng=_rng(0))
  modules["reward"] = model.module
  return _single("reward", model, cache, optimizers["reward"])


def _single(name: str, model: common.Model, cache: common.BaseCache, optimizer) -> dict:
  """SFT / reward: the loaded trainable tree stays referenced next to the copy that trains."""
  trainable = jax.tree.map(jnp.copy, model.trainable)
  return {"bases": _bases(cache), f"{name}/frozen": model.frozen,
          f"{name}/loaded": model.trainable, f"{name}/trainable": trainable,
          f"{name}/opt": optimizer.init(trainable)}


def _bases(cache: ShapeCache) -> dict:
  return {str(i): params for i, (_, params) in enumerate(cache.loaded())}


def _ppo(c, cache, modules, optimizers):
  from perl_jax.trainers import ppo

  if c.reward.init:
    models = ppo.load_models(c, cache, _rng(0))
  else:  # the synthetic task: reward (and value) are LoRA models trained on the SFT policy
    models = _synthetic_ppo_models(c, cache)
  policy, reward, value = models.policy, models.reward, models.value
  modules.update(policy=policy.module, reward=reward.module)
  trees = {"bases": _bases(cache), "policy/frozen": policy.frozen,
           "policy/trainable": policy.trainable,
           "policy/opt": optimizers["policy"].init(policy.trainable),
           "reference": models.reference_params, "reward/frozen": reward.frozen,
           "reward/trainable": reward.trainable}
  if value is not None:
    modules["value"] = value.module
    trees.update({"value/frozen": value.frozen, "value/trainable": value.trainable,
                  "value/opt": optimizers["value"].init(value.trainable)})
  return trees


def _synthetic_ppo_models(c, cache):
  from perl_jax import config as config_lib
  from perl_jax.trainers import ppo

  lora = c.lora if c.lora.rank else config_lib.reward_config().lora  # as train.py's stage
  reward_lora = common.lora_from_config(lora)
  lcfg = common.lora_from_config(c.lora)
  policy = common.load_model(c.policy.init, head="lm", lora=lcfg, cache=cache, rng=_rng(0))
  reference = policy.frozen["params"] if lcfg is not None else cache.get(c.policy.init)[1]
  reward = common.load_model(c.policy.init, head="scalar", lora=reward_lora, cache=cache,
                             rng=_rng(1))
  value = None
  if c.ppo.estimator == "gae" and c.value.init:
    value = common.load_model(c.value.init, head="scalar", lora=lcfg, cache=cache, rng=_rng(2))
  elif c.ppo.estimator == "gae":  # value.init "" -> the reward model's directory (its LoRA)
    value = common.load_model(c.policy.init, head="scalar", lora=reward_lora, cache=cache,
                              rng=_rng(2))
  return ppo.Models(policy, reference, reward, value)
