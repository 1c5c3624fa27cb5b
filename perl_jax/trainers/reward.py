"""Reward-model training: a scalar head (plus LoRA adapters, PERL) on preferences.

Design
------
* The score of a sequence is the scalar head's output at its LAST REAL token (`last_token`),
  wherever the padding is, so the same text scores the same however it is padded. With the
  data layout ``[left-padded prompt | response + EOS | pad]`` that token is the EOS.
* Pairwise data ({"prompt","chosen","rejected"}) trains a Bradley-Terry model
  (`rl.bt_loss`, with margin and reward centering); pointwise thumbs-up/down data
  ({"prompt","response","label"}) a binary classifier (`rl.pointwise_loss`).
  ``reward_model.loss = "auto"`` reads the format from the training file. Chosen and rejected
  rows go through the network as one 2B batch (one forward, one backward).
* The step is pure and jitted, ``(trainable, opt_state, frozen, batch, rng) -> (trainable,
  opt_state, metrics)``, with the frozen base an argument (never closed over).
* The model starts from ``reward.init`` or ``policy.init``: a causal LM gets a fresh head
  N(0, 1/sqrt(d + 1)); a ForSequenceClassification checkpoint keeps its head, which trains.
  With neither, the synthetic task's SFT policy is trained first (``workdir/sft``).
* Normalisation (``reward_model.normalize``): after training, ``num_samples_for_norm``
  responses are sampled from the REFERENCE policy (``policy.init``, temperature 1), scored,
  and ``gain = 1/std``, ``bias = -mean/std`` are stored on the model, so the scores PPO sees
  start at mean 0, std 1 on what the policy initially writes. Re-scoring those samples with
  gain and bias checks it.
* Saved with `common.save_model` to ``workdir/model``: for LoRA only the adapters and the head
  (the base is ``policy.init``), for full fine-tuning everything.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from perl_jax import rl
from perl_jax.sampling import SamplingConfig, sample
from perl_jax.trainers import common, loop
from perl_jax.trainers.layout import Layout
from perl_jax.trainers.sft import dropout_rngs, padded_batches, pick

Params = Any
Batch = dict[str, jax.Array]
PAIR_KEYS = ("chosen_tokens_BxT", "chosen_mask_BxT", "rejected_tokens_BxT", "rejected_mask_BxT")
POINT_KEYS = ("tokens_BxT", "mask_BxT", "labels_B")
NORM_CHUNK = 64  # reference samples drawn per sampler call (one compiled shape)
NORM_TOLERANCE = 1e-3  # re-scored reference samples must have |mean| and |std - 1| below this


# --- Scores ---------------------------------------------------------------------------------


def last_token(values_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """values_BxT at each row's last real token (mask True), for left or right padding: [B]."""
  t = mask_BxT.shape[1]
  last_B = t - 1 - jnp.argmax(mask_BxT[:, ::-1].astype(jnp.int32), axis=1)
  return jnp.take_along_axis(values_BxT, last_B[:, None], axis=1)[:, 0]


def raw_scores(module: Any, variables: dict, tokens_BxT: jax.Array, mask_BxT: jax.Array,
               rngs: dict | None = None) -> jax.Array:
  """float32 [B]: the scalar head at the last real token (no gain/bias)."""
  values_BxT = module.apply(variables, tokens_BxT, mask_BxT=mask_BxT, rngs=rngs or {})
  return last_token(values_BxT, mask_BxT).astype(jnp.float32)


def score_fn(module: Any) -> Callable:
  """Jitted ``scores(variables, tokens_BxT, mask_BxT, gain=1.0, bias=0.0) -> float32 [B]``.

  ``gain * head(last real token) + bias``; pass a model's ``reward_gain`` / ``reward_bias`` for
  normalised scores. Gain and bias are traced, so changing them does not recompile.
  """

  @jax.jit
  def scores(variables: dict, tokens_BxT: jax.Array, mask_BxT: jax.Array,
             gain: float | jax.Array = 1.0, bias: float | jax.Array = 0.0) -> jax.Array:
    return gain * raw_scores(module, variables, tokens_BxT, mask_BxT) + bias

  return scores


# --- Steps ----------------------------------------------------------------------------------


def make_loss_fn(module: Any, kind: str, margin: float = 0.0,
                 center_coef: float = 0.0) -> Callable[..., tuple[jax.Array, dict]]:
  """loss_fn(trainable, frozen, batch, rng) -> (loss, metrics) for "pairwise" or "pointwise"."""
  if kind not in ("pairwise", "pointwise"):
    raise ValueError(f"kind must be 'pairwise' or 'pointwise', got {kind!r}")

  def loss_fn(trainable: Params, frozen: Params, batch: Batch, rng: jax.Array):
    variables = common.variables(frozen, trainable)
    rngs = dropout_rngs(module, rng)
    if kind == "pointwise":
      s_B = raw_scores(module, variables, batch["tokens_BxT"], batch["mask_BxT"], rngs)
      loss, metrics = rl.pointwise_loss(s_B, batch["labels_B"])
      return loss, {**metrics, "score_mean": jnp.mean(s_B), "score_std": jnp.std(s_B)}
    # Chosen and rejected as one 2B batch: one forward and backward pass.
    tokens = jnp.concatenate([batch["chosen_tokens_BxT"], batch["rejected_tokens_BxT"]])
    mask = jnp.concatenate([batch["chosen_mask_BxT"], batch["rejected_mask_BxT"]])
    s_2B = raw_scores(module, variables, tokens, mask, rngs)
    chosen_B, rejected_B = jnp.split(s_2B, 2)
    loss, metrics = rl.bt_loss(chosen_B, rejected_B, margin if margin else None, center_coef)
    return loss, {**metrics, "score_mean": jnp.mean(s_2B), "score_std": jnp.std(s_2B)}

  return loss_fn


def make_train_step(module: Any, optimizer: optax.GradientTransformation, kind: str,
                    margin: float = 0.0, center_coef: float = 0.0) -> Callable:
  """The jitted pure step ``(trainable, opt_state, frozen, batch, rng, step) -> (trainable,
  opt_state, metrics)``; metrics: loss, accuracy, (pairwise) margin and bt, score mean/std,
  grad_norm and the non-finite flags of `common.make_train_step`. `trainable` and `opt_state` are donated: do not reuse the arrays passed in."""
  return common.make_train_step(make_loss_fn(module, kind, margin, center_coef), optimizer)


def evaluate(scores: Callable, variables: dict, data: dict[str, np.ndarray], kind: str,
             batch_size: int) -> dict[str, float]:
  """Held-out accuracy (pairwise: chosen > rejected, ties 1/2; pointwise: sign agrees with the
  label) and mean loss, over every record of `data`."""
  if kind == "pairwise":
    s = {}
    n = len(data["chosen_tokens_BxT"])
    for side in ("chosen", "rejected"):
      parts = [np.asarray(scores(variables, data[f"{side}_tokens_BxT"][idx],
                                 data[f"{side}_mask_BxT"][idx]))[valid]
               for idx, valid in padded_batches(n, batch_size)]
      s[side] = np.concatenate(parts)
    diff = s["chosen"] - s["rejected"]
    accuracy = np.mean((diff > 0) + 0.5 * (diff == 0))
    loss = np.mean(np.logaddexp(0.0, -diff))  # -log sigmoid(diff)
    return {"eval/accuracy": float(accuracy), "eval/loss": float(loss),
            "eval/margin": float(diff.mean())}
  n = len(data["tokens_BxT"])
  s = np.concatenate([np.asarray(scores(variables, data["tokens_BxT"][idx],
                                        data["mask_BxT"][idx]))[valid]
                      for idx, valid in padded_batches(n, batch_size)])
  y = data["labels_B"]
  loss = np.mean(y * np.logaddexp(0.0, -s) + (1 - y) * np.logaddexp(0.0, s))
  return {"eval/accuracy": float(np.mean((s > 0) == (y > 0.5))), "eval/loss": float(loss)}


# --- Normalisation --------------------------------------------------------------------------


def reference_policy(init: str, cache: common.BaseCache) -> tuple[Any, dict]:
  """(module, variables) of the reference policy `init`, sharing the cached base arrays."""
  from perl_jax.models import Transformer

  if os.path.exists(os.path.join(init, common.META_FILE)):  # a perl_jax policy directory
    model = common.load_model(init, head="lm", lora=None, cache=cache, rng=jax.random.PRNGKey(0))
    return model.module, model.variables()
  cfg, params = cache.get(init)
  if cfg.head != "lm":
    raise ValueError(f"config.policy.init: {init!r} is not a causal LM; the reference policy "
                     "samples the responses that set the reward normalisation")
  return Transformer(cfg), {"params": params}


def reference_samples(module: Any, variables: dict, prompt_BxP: np.ndarray,
                      prompt_mask_BxP: np.ndarray, n: int, max_new_tokens: int, rng: jax.Array,
                      eos_ids: tuple[int, ...], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` reference responses (temperature 1) to prompts drawn with replacement, joined as
  ``[prompt | response]`` rows: (tokens_NxT, mask_NxT)."""
  scfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0)
  rng, pick = jax.random.split(rng)
  rows = np.asarray(jax.random.randint(pick, (-(-n // NORM_CHUNK) * NORM_CHUNK,), 0,
                                       len(prompt_BxP)))
  tokens, masks = [], []
  for i, start in enumerate(range(0, len(rows), NORM_CHUNK)):
    idx = rows[start:start + NORM_CHUNK]
    out = sample(module, variables, jnp.asarray(prompt_BxP[idx]), jnp.asarray(prompt_mask_BxP[idx]),
                 jax.random.fold_in(rng, i), scfg, eos_ids=eos_ids, pad_id=pad_id)
    tokens.append(np.concatenate([prompt_BxP[idx], np.asarray(out.tokens)], axis=1))
    masks.append(np.concatenate([prompt_mask_BxP[idx], np.asarray(out.mask)], axis=1))
  return np.concatenate(tokens)[:n], np.concatenate(masks)[:n]


def normalization(scores: Callable, variables: dict, tokens_NxT: np.ndarray,
                  mask_NxT: np.ndarray, batch_size: int) -> tuple[float, float, dict]:
  """(gain, bias, check): gain * raw + bias has mean 0, std 1 on these sequences; `check`
  holds the mean and std of the re-scored sequences (raises if they miss by > tolerance)."""

  def all_scores(gain: float, bias: float) -> np.ndarray:
    return np.concatenate([np.asarray(scores(variables, tokens_NxT[idx], mask_NxT[idx],
                                             gain, bias))[valid]
                           for idx, valid in padded_batches(len(tokens_NxT), batch_size)])

  raw = all_scores(1.0, 0.0).astype(np.float64)
  mean, std = float(raw.mean()), float(raw.std())
  if not np.isfinite(std) or std < 1e-6:
    raise FloatingPointError(f"reward scores of the reference samples have std {std}: the "
                             "reward model does not tell them apart, so it cannot be normalised")
  gain, bias = 1.0 / std, -mean / std
  again = all_scores(gain, bias).astype(np.float64)
  check = {"norm/raw_mean": mean, "norm/raw_std": std, "norm/mean": float(again.mean()),
           "norm/std": float(again.std())}
  if abs(check["norm/mean"]) > NORM_TOLERANCE or abs(check["norm/std"] - 1) > NORM_TOLERANCE:
    raise AssertionError(f"normalised reference scores are not ~N(0, 1): {check}")
  return gain, bias, check


# --- Data -----------------------------------------------------------------------------------


def _data(c: Any, workdir: str) -> tuple[str, str, str, str | None]:
  """(train, eval, prompts, synthetic tokenizer or None) paths."""
  if bool(c.data.train) != bool(c.data.eval):
    missing = "data.eval" if c.data.train else "data.train"
    raise ValueError(f"config.{missing}: give both data.train and data.eval (or neither, for "
                     "the built-in synthetic task)")
  if c.data.train:
    return c.data.train, c.data.eval, c.data.prompts, None
  from perl_jax.data import synthetic

  paths = synthetic.prepare(os.path.join(workdir, "data"), seed=c.seed)
  return paths["pref_train"], paths["pref_eval"], c.data.prompts or paths["prompts"], \
      paths["tokenizer"]


def data_records(c: Any, workdir: str) -> tuple[str, Sequence, list, list | None, str | None,
                                                dict[str, str]]:
  """(kind, train records, eval records, prompt records or None, synthetic tokenizer dir or
  None, {config key: name}) from ``data.tfds`` (train read lazily), the JSONL files or the
  synthetic task. Without prompt records, normalisation samples the eval records' prompts."""
  from perl_jax.data import jsonl, published, sources

  kind = c.reward_model.loss
  if c.data.tfds:
    kind = published.DATASETS[c.data.tfds][0]  # validate() checked reward_model.loss against it
    train = sources.tfds_split(c, "train", kind)
    evals = sources.materialize(sources.tfds_split(c, "eval", kind))
    names = {"data.train": sources.name(c, "train"), "data.eval": sources.name(c, "eval")}
    prompts_path, synthetic_tokenizer = c.data.prompts, None
  else:
    train_path, eval_path, prompts_path, synthetic_tokenizer = _data(c, workdir)
    if kind == "auto":
      kind = jsonl.detect_preference_kind(train_path)
    train, evals = jsonl.read_jsonl(train_path, kind), jsonl.read_jsonl(eval_path, kind)
    names = {"data.train": train_path, "data.eval": eval_path}
  prompts = None
  if prompts_path:
    prompts, names["data.prompts"] = jsonl.read_jsonl(prompts_path, "prompts"), prompts_path
  return kind, train, evals, prompts, synthetic_tokenizer, names


def _synthetic_policy(c: Any, workdir: str) -> str:
  """Trains the synthetic task's SFT policy (sft_config defaults, this config's model)."""
  from perl_jax import config as config_lib
  from perl_jax.trainers import sft

  if c.data.train or c.data.tfds:
    raise ValueError("config.policy.init: a reward model on your own data needs a checkpoint to "
                     "start from (policy.init or reward.init); only the built-in synthetic task "
                     "trains its own policy first")
  s = config_lib.sft_config()
  s.seed, s.dtype, s.progress = c.seed, c.dtype, c.progress
  s.model, s.mesh = c.model, c.mesh
  s.data.max_prompt_len, s.data.max_response_len = c.data.max_prompt_len, c.data.max_response_len
  logging.info("reward: no policy.init; training the synthetic SFT policy first")
  return sft.train(s, os.path.join(workdir, "sft"))["hf_dir"]


# --- Training -------------------------------------------------------------------------------


def train(c: Any, workdir: str, train_prompts_cut: int | None = None) -> dict:
  """Trains a reward model (c from `config.reward_config()`); see the module docstring.

  `train_prompts_cut`: as for `sft.train` (None: counted here).

  Runs on the mesh of `config.mesh` (`trainers.layout`). Returns ``{'accuracy' (held-out),
  'model_dir', 'gain', 'bias', 'policy_init', 'kind', 'seconds', ...}`` plus the
  normalisation check (``norm/mean``, ``norm/std``).
  """
  layout = Layout.from_config(c)
  with layout.activate():
    return _train(c, workdir, layout, train_prompts_cut)


def _train(c: Any, workdir: str, layout: Layout, train_prompts_cut: int | None) -> dict:
  from perl_jax.data import jsonl, sources
  from perl_jax.data.pipeline import Batches
  from perl_jax.tokenizers import eos_ids

  t_start = time.perf_counter()
  rng = jax.random.PRNGKey(c.seed)
  rng, model_rng, norm_rng = jax.random.split(rng, 3)

  # --- Data, model, tokenizer -------------------------------------------------------------
  kind, train_records, eval_records, prompt_records, synthetic_tokenizer, _ = data_records(
      c, workdir)
  policy_init = c.policy.init
  if not c.reward.init and not policy_init:
    policy_init = _synthetic_policy(c, workdir)
  if c.reward_model.normalize and not policy_init:
    raise ValueError("config.reward_model.normalize needs config.policy.init: the reference "
                     "policy whose samples set the gain and bias")
  if kind not in ("pairwise", "pointwise"):
    raise ValueError(f"config.reward_model.loss: {kind!r} is not 'pairwise', 'pointwise' or "
                     "'auto'")
  cache = common.BaseCache(c.dtype, layout)
  init = c.reward.init or policy_init
  # The tokenizer is checked against the architecture before anything is loaded or compiled.
  tokenizer = common.checked_tokenizer(
      init, (common.peek(policy_init)[1] if policy_init else None) or synthetic_tokenizer)
  model = common.load_model(init, head="scalar", lora=common.lora_from_config(c.lora),
                            cache=cache, rng=model_rng)
  keys = PAIR_KEYS if kind == "pairwise" else POINT_KEYS
  encoder = jsonl.encode_pairs if kind == "pairwise" else jsonl.encode_pointwise
  fmt = sources.formatter(c, tokenizer)
  logging.info("reward: prompts formatted with %s", fmt.describe())
  encode = lambda records: encoder(tokenizer, fmt.records(records, kind), c.data.max_prompt_len,
                                   c.data.max_response_len, c.data.truncate)
  eval_data = encode(eval_records)
  if train_prompts_cut is None:
    train_prompts_cut = sources.prompt_cuts(tokenizer, fmt, train_records, kind,
                                            c.data.max_prompt_len, c.data.truncate)
  n_cut = int(eval_data["prompt_truncated_B"].sum()) + train_prompts_cut
  eval_data = pick(eval_data, keys)
  train_batches = Batches(train_records, lambda records: pick(encode(records), keys),
                          c.data.batch_size, c.seed)

  # --- Optimizer and compiled functions ---------------------------------------------------
  optimizer = common.make_optimizer(c.optimizer)
  frozen = model.frozen
  trainable = jax.tree.map(jnp.copy, model.trainable)  # donated below; a kept head may be cached
  opt_state = layout.init_opt_state(optimizer, trainable)
  step_fn = make_train_step(model.module, optimizer, kind, c.reward_model.margin,
                            c.reward_model.center_coef)
  scores_of = score_fn(model.module)

  def scores(variables, tokens_BxT, mask_BxT, *affine):  # batches of data.batch_size rows
    return scores_of(variables, *layout.shard_batch((tokens_BxT, mask_BxT)), *affine)

  n_train, n_frozen = common.count(trainable), common.count(frozen)
  fraction = n_train / (n_train + n_frozen)
  logging.info("reward (%s): %d trainable parameters (%.4f%% of %d)", kind, n_train,
               100 * fraction, n_train + n_frozen)

  # --- Loop (resumes from WORKDIR/checkpoints) ---------------------------------------------
  trainable, opt_state, eval_metrics, writer = loop.run(
      c, workdir, step_fn=step_fn, trainable=trainable, opt_state=opt_state, frozen=frozen,
      train_batches=train_batches, rng=rng, bases={"reward": model.base},
      setup_metrics={"params/trainable": n_train, "params/trainable_fraction": fraction,
                     "params/prompts_truncated": n_cut},
      evaluate=lambda t: evaluate(scores, common.variables(frozen, t), eval_data, kind,
                                  c.data.batch_size),
      log_eval=lambda writer, step, t: None, progress_keys=("loss", "accuracy", "eval/accuracy"),
      layout=layout)

  # --- Normalise on reference-policy samples, save ----------------------------------------
  gain, bias, check = 1.0, 0.0, {}
  if c.reward_model.normalize:
    ref_module, ref_vars = reference_policy(policy_init, cache)
    prompt_BxP, prompt_mask_BxP, _ = jsonl.encode_prompt_batch(
        tokenizer, fmt.records(prompt_records or eval_records, "prompts"),
        c.data.max_prompt_len, c.data.truncate)
    tokens_NxT, mask_NxT = reference_samples(
        ref_module, ref_vars, prompt_BxP, prompt_mask_BxP, c.reward.num_samples_for_norm,
        c.data.max_response_len + 1, norm_rng, eos_ids(tokenizer, ref_module.cfg),
        tokenizer.pad_token_id)
    gain, bias, check = normalization(scores, common.variables(frozen, trainable), tokens_NxT,
                                      mask_NxT, c.data.batch_size)
    writer.write(c.total_iterations, {**check, "norm/gain": gain, "norm/bias": bias})
  writer.close()
  model_dir = os.path.join(workdir, "model")
  final = dataclasses.replace(model, trainable=trainable, reward_gain=gain, reward_bias=bias,
                              tokenizer_dir=model.tokenizer_dir or tokenizer.name_or_path)
  common.save_model(model_dir, final)
  seconds = time.perf_counter() - t_start
  logging.info("reward: held-out accuracy %.3f, gain %.4f, bias %.4f; saved %s (%.1f s)",
               eval_metrics["eval/accuracy"], gain, bias, model_dir, seconds)
  return {"accuracy": eval_metrics["eval/accuracy"], "eval_loss": eval_metrics["eval/loss"],
          "model_dir": model_dir, "gain": gain, "bias": bias, "policy_init": policy_init,
          "kind": kind, "trainable_params": n_train, "seconds": seconds, **check}
