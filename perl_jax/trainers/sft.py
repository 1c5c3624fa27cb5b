"""Supervised fine-tuning (SFT): next-token loss on the response tokens of demonstrations.

Design
------
* One pure jitted step, ``step(trainable, opt_state, frozen, batch, rng, step) ->
  (trainable, opt_state, metrics)`` (`make_train_step`), testable on its own. The frozen tree is an
  argument, never closed over: a closed-over array is baked into the compiled program as a
  constant (a second copy of the weights, and a recompile whenever it changes).
* Rows are ``[left-padded prompt | response + EOS | pad]`` (`perl_jax.data.jsonl.encode_sft`);
  the loss counts response tokens only (``loss_mask_BxT``), so the model is never trained to
  produce prompts, and EOS is a target, so it learns to stop.
* LoRA or full: `common.load_model` splits the weights; only ``trainable`` gets gradients and
  optimizer state. LoRA dropout draws from a per-step ``lora_dropout`` RNG, active in training
  only (evaluation and sampling pass none).
* With no checkpoint (``policy.init == ""``) a `config.model`-shaped network is trained from
  scratch, with the synthetic task's word-level tokenizer (or, for text it cannot encode, a
  small byte-level BPE fitted to the data).
* At the end the model is written as a Hugging Face checkpoint with the adapters merged, plus
  its tokenizer, to ``workdir/hf``: later stages load it with ``policy.init=workdir/hf``. A LoRA
  run on a checkpoint also saves its adapters (`common.save_model`) to ``workdir/model``, for
  ``python -m perl_jax.export --format=peft``.

* Data comes from JSONL files, a published dataset (``data.tfds``, read lazily), or the
  synthetic task (`data_records`); prompts are formatted (`perl_jax.data.formatting`) and
  batches encoded on the fly by the input pipeline (`perl_jax.data.pipeline`), which also
  resumes at the checkpoint's data position.

The helpers `padded_batches` and `sft_data_paths` are shared with the reward trainer.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from perl_jax import rl
from perl_jax.sampling import SamplingConfig, sample
from perl_jax.trainers import common, loop
from perl_jax.trainers.layout import Layout

Params = Any
Batch = dict[str, jax.Array]
SFT_KEYS = ("tokens_BxT", "mask_BxT", "loss_mask_BxT")
NUM_LOGGED_SAMPLES = 4  # greedy eval samples decoded at each evaluation
BPE_VOCAB = 512  # tokenizer trained for your own data when no checkpoint is given


# --- Steps ----------------------------------------------------------------------------------


def dropout_rngs(module: Any, rng: jax.Array) -> dict[str, jax.Array]:
  """The `rngs` of a training forward pass: LoRA dropout only when there is some."""
  if module.lora is not None and module.lora.dropout > 0:
    return {"lora_dropout": rng}
  return {}


def make_loss_fn(module: Any) -> Callable[..., tuple[jax.Array, dict]]:
  """loss_fn(trainable, frozen, batch, rng) -> (sft_loss, metrics); differentiable in trainable."""

  def loss_fn(trainable: Params, frozen: Params, batch: Batch, rng: jax.Array):
    logits_BxTxV = module.apply(common.variables(frozen, trainable), batch["tokens_BxT"],
                                mask_BxT=batch["mask_BxT"], rngs=dropout_rngs(module, rng))
    return rl.sft_loss(logits_BxTxV, batch["tokens_BxT"], batch["loss_mask_BxT"])

  return loss_fn


def make_train_step(module: Any, optimizer: optax.GradientTransformation) -> Callable:
  """The jitted pure step ``(trainable, opt_state, frozen, batch, rng, step) -> (trainable,
  opt_state, metrics)``; metrics: loss, perplexity, accuracy, grad_norm (before clipping) and
  the non-finite flags of `common.make_train_step`.

  `trainable` and `opt_state` are donated (updated in place): do not reuse the arrays passed in.
  """
  return common.make_train_step(make_loss_fn(module), optimizer)


def make_eval_fn(module: Any) -> Callable:
  """Jitted ``(trainable, frozen, batch) -> (nll_sum_B, tokens_B, hits_B)`` per row, so eval
  sets of any size reduce exactly (padding rows are dropped by the caller)."""

  def per_row(trainable, frozen, batch):
    logits_BxTxV = module.apply(common.variables(frozen, trainable), batch["tokens_BxT"],
                                mask_BxT=batch["mask_BxT"])
    one = lambda logits, tokens, mask: rl.sft_loss(logits[None], tokens[None], mask[None])
    loss_B, metrics = jax.vmap(one)(logits_BxTxV, batch["tokens_BxT"], batch["loss_mask_BxT"])
    tokens_B = batch["loss_mask_BxT"][:, 1:].astype(jnp.float32).sum(-1)
    return loss_B * tokens_B, tokens_B, metrics["accuracy"] * tokens_B

  return jax.jit(per_row)


def evaluate(eval_fn: Callable, trainable: Params, frozen: Params, data: dict[str, np.ndarray],
             batch_size: int) -> dict[str, float]:
  """Token-weighted eval loss / perplexity / accuracy over every row of `data`."""
  nll = tokens = hits = 0.0
  for idx, valid in padded_batches(len(data["tokens_BxT"]), batch_size):
    out = eval_fn(trainable, frozen, {k: data[k][idx] for k in SFT_KEYS})
    n, t, h = (np.asarray(x)[valid] for x in out)
    nll, tokens, hits = nll + n.sum(), tokens + t.sum(), hits + h.sum()
  loss = nll / max(tokens, 1.0)
  return {"eval/loss": loss, "eval/perplexity": float(np.exp(loss)),
          "eval/accuracy": hits / max(tokens, 1.0)}


# --- Shared helpers -------------------------------------------------------------------------


def padded_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(indices [batch_size], valid [batch_size]) covering rows 0..n-1 in order; the last batch
  is filled with row 0 and marked invalid, so every call has one shape (one compile)."""
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = idx < n
    yield np.where(valid, idx, 0), valid


def data_records(c: Any, workdir: str) -> tuple[Sequence, list, str | None, dict[str, str]]:
  """(train records, eval records, synthetic tokenizer dir or None, {config key: name}) from
  ``data.tfds`` (train read lazily), the JSONL files, or the synthetic task."""
  from perl_jax.data import jsonl, sources

  if c.data.tfds:
    train = sources.tfds_split(c, "train", "sft")
    evals = sources.materialize(sources.tfds_split(c, "eval", "sft"))
    return train, evals, None, {"data.train": sources.name(c, "train"),
                                "data.eval": sources.name(c, "eval")}
  train_path, eval_path, synthetic_tokenizer = sft_data_paths(c, workdir)
  return (jsonl.read_jsonl(train_path, "sft"), jsonl.read_jsonl(eval_path, "sft"),
          synthetic_tokenizer, {"data.train": train_path, "data.eval": eval_path})


def pick(arrays: dict, keys: Sequence[str]) -> dict:
  return {k: arrays[k] for k in keys}


def sft_data_paths(c: Any, workdir: str) -> tuple[str, str, str | None]:
  """(train, eval, synthetic tokenizer dir or None): the files given, or the synthetic task."""
  if bool(c.data.train) != bool(c.data.eval):
    missing = "data.eval" if c.data.train else "data.train"
    raise ValueError(f"config.{missing}: give both data.train and data.eval (or neither, for "
                     "the built-in synthetic task)")
  if c.data.train:
    return c.data.train, c.data.eval, None
  from perl_jax.data import synthetic

  paths = synthetic.prepare(os.path.join(workdir, "data"), seed=c.seed)
  return paths["sft_train"], paths["sft_eval"], paths["tokenizer"]


def scratch_tokenizer(records: Sequence[dict], synthetic_dir: str | None, workdir: str) -> Any:
  """The tokenizer of a model trained from scratch: the synthetic task's word-level one when
  it encodes every record without <unk> (the synthetic task, wherever its files are), else a
  byte-level BPE fitted to the records (any text), saved under ``workdir/tokenizer``."""
  from perl_jax.data import synthetic
  from perl_jax.tokenizers import load_tokenizer, train_bpe_tokenizer

  texts = [r[k] for r in records for k in ("prompt", "response")]
  if synthetic_dir is not None:
    return load_tokenizer(synthetic_dir)
  words = synthetic.build_tokenizer(os.path.join(workdir, "tokenizer"))
  if words.unk_token_id not in {i for ids in words(texts)["input_ids"] for i in ids}:
    return words
  logging.warning("SFT from scratch on text outside the synthetic vocabulary: fitting a "
                  "%d-token byte-level BPE to the training data", BPE_VOCAB)
  return train_bpe_tokenizer(texts, BPE_VOCAB, os.path.join(workdir, "tokenizer"))


def _special_ids(tokenizer: Any) -> dict[str, int | None]:
  return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)


def greedy_samples(module: Any, variables: dict, tokenizer: Any, records: list[dict],
                   max_prompt_len: int, max_new_tokens: int, truncate: str) -> list[dict]:
  """Greedy responses of `module` to the records' prompts, decoded, next to the references."""
  from perl_jax.data import jsonl
  from perl_jax.tokenizers import eos_ids

  prompt_BxP, mask_BxP, _ = jsonl.encode_prompt_batch(tokenizer, records, max_prompt_len,
                                                      truncate)
  out = sample(module, variables, jnp.asarray(prompt_BxP), jnp.asarray(mask_BxP),
               jax.random.PRNGKey(0), SamplingConfig(max_new_tokens, temperature=0.0),
               eos_ids=eos_ids(tokenizer, module.cfg), pad_id=tokenizer.pad_token_id)
  tokens = np.where(np.asarray(out.mask), np.asarray(out.tokens), tokenizer.pad_token_id)
  texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
  return [dict(prompt=r["prompt"], response=t, reference=r.get("response", ""),
               ended=bool(e)) for r, t, e in zip(records, texts, np.asarray(out.ended))]


# --- Training -------------------------------------------------------------------------------


def train(c: Any, workdir: str, train_prompts_cut: int | None = None) -> dict:
  """Runs `c.total_iterations` SFT steps (c from `config.sft_config()`); see the module doc.

  `train_prompts_cut`: the training prompts longer than ``data.max_prompt_len``, when
  `perl_jax.train.check_inputs` has counted them already; None counts them here (one pass).

  Runs on the mesh of `config.mesh` (`trainers.layout`). Returns ``{'eval_loss',
  'eval_accuracy', 'hf_dir', 'trainable_params', 'seconds'}``.
  """
  layout = Layout.from_config(c)
  with layout.activate():
    return _train(c, workdir, layout, train_prompts_cut)


def _train(c: Any, workdir: str, layout: Layout, train_prompts_cut: int | None) -> dict:
  from perl_jax.data import jsonl, sources
  from perl_jax.data.pipeline import Batches
  from perl_jax.models import save_hf_checkpoint

  t_start = time.perf_counter()
  rng = jax.random.PRNGKey(c.seed)
  rng, model_rng = jax.random.split(rng)

  # --- Data, tokenizer, model -------------------------------------------------------------
  train_records, eval_records, synthetic_tokenizer, _ = data_records(c, workdir)
  cache = common.BaseCache(c.dtype, layout)
  lcfg = common.lora_from_config(c.lora)
  if c.policy.init:
    tokenizer = common.checked_tokenizer(c.policy.init)  # before anything compiles
    model = common.load_model(c.policy.init, head="lm", lora=lcfg, cache=cache, rng=model_rng)
  else:
    tokenizer = scratch_tokenizer(sources.materialize(train_records) + eval_records,
                                  synthetic_tokenizer, workdir)
    scratch = common.scratch_config(c, vocab_size=len(tokenizer),
                                    special=_special_ids(tokenizer), dtype=c.dtype)
    model = common.load_model("", head="lm", lora=lcfg, cache=cache, rng=model_rng,
                              scratch=scratch)
  fmt = sources.formatter(c, tokenizer)
  logging.info("SFT: prompts formatted with %s", fmt.describe())
  encode = lambda records: jsonl.encode_sft(tokenizer, fmt.records(records, "sft"),
                                            c.data.max_prompt_len, c.data.max_response_len,
                                            c.data.truncate)
  eval_data = encode(eval_records)
  if train_prompts_cut is None:
    train_prompts_cut = sources.prompt_cuts(tokenizer, fmt, train_records, "sft",
                                            c.data.max_prompt_len, c.data.truncate)
  n_cut = int(eval_data["prompt_truncated_B"].sum()) + train_prompts_cut
  eval_data = pick(eval_data, SFT_KEYS)
  train_batches = Batches(train_records, lambda records: pick(encode(records), SFT_KEYS),
                          c.data.batch_size, c.seed)

  # --- Optimizer and compiled functions ---------------------------------------------------
  optimizer = common.make_optimizer(c.optimizer)
  frozen = model.frozen
  trainable = jax.tree.map(jnp.copy, model.trainable)  # donated below: never alias the model's
  opt_state = layout.init_opt_state(optimizer, trainable)
  step_fn = make_train_step(model.module, optimizer)
  per_row = make_eval_fn(model.module)
  eval_fn = lambda trainable, frozen, batch: per_row(trainable, frozen, layout.shard_batch(batch))

  n_train, n_frozen = common.count(trainable), common.count(frozen)
  fraction = n_train / (n_train + n_frozen)
  logging.info("SFT: %d trainable parameters (%.4f%% of %d)%s", n_train, 100 * fraction,
               n_train + n_frozen, f", LoRA rank {lcfg.rank}" if lcfg else ", full fine-tuning")
  shown = fmt.records(eval_records[:NUM_LOGGED_SAMPLES], "sft")

  def log_samples(writer, step: int, trainable: Params) -> None:
    writer.write_samples(step, greedy_samples(
        model.module, common.variables(frozen, trainable), tokenizer, shown,
        c.data.max_prompt_len, c.data.max_response_len + 1, c.data.truncate))

  # --- Loop (resumes from WORKDIR/checkpoints) ---------------------------------------------
  trainable, opt_state, eval_metrics, writer = loop.run(
      c, workdir, step_fn=step_fn, trainable=trainable, opt_state=opt_state, frozen=frozen,
      train_batches=train_batches, rng=rng, bases={"policy": model.base},
      setup_metrics={"params/trainable": n_train, "params/trainable_fraction": fraction,
                     "params/prompts_truncated": n_cut},
      evaluate=lambda t: evaluate(eval_fn, t, frozen, eval_data, c.data.batch_size),
      log_eval=log_samples, progress_keys=("loss", "accuracy", "eval/loss"), layout=layout)
  writer.close()

  # --- Save: merged HF checkpoint + tokenizer ---------------------------------------------
  hf_dir = os.path.join(workdir, "hf")
  merged = common.variables(frozen, trainable)
  lora = (model.lora, merged["lora"]) if "lora" in merged else None
  save_hf_checkpoint(model.cfg, merged["params"], hf_dir, lora=lora)
  tokenizer.save_pretrained(hf_dir)
  if model.lora is not None and model.base is not None:  # the adapters alone, for peft export
    common.save_model(os.path.join(workdir, "model"), model, trainable)
  seconds = time.perf_counter() - t_start
  logging.info("SFT: eval loss %.4f, accuracy %.3f; saved %s (%.1f s)",
               eval_metrics["eval/loss"], eval_metrics["eval/accuracy"], hf_dir, seconds)
  return {"eval_loss": float(eval_metrics["eval/loss"]),
          "eval_accuracy": float(eval_metrics["eval/accuracy"]), "hf_dir": hf_dir,
          "trainable_params": n_train, "seconds": seconds}
