"""What every trainer shares: which weights train, where models come from, the optimizer.

Frozen versus trainable
-----------------------
A model's variables are ``{'params': ..., 'lora': ...}``. A trainer holds them as two trees:
``frozen`` (passed to jitted steps as an argument, never differentiated, possibly the very same
arrays for several models) and ``trainable`` (differentiated; the only tree with optimizer
state). `variables(frozen, trainable)` merges them for ``model.apply``. With LoRA the trainable
tree is the adapters plus any scalar head; with full fine-tuning (``lora.rank = 0``) it is every
parameter and the frozen tree is empty.

Model directories
-----------------
An ``init`` key names either a Hugging Face checkpoint directory (``config.json`` +
safetensors, usually with a tokenizer) or a perl_jax model directory written by `save_model`:
``perl_jax_model.json`` (model config, LoRA config, the base checkpoint it builds on, reward
gain/bias) and ``trainable.safetensors`` (only adapters and heads for LoRA; everything for full
fine-tuning). Frozen bases are loaded once per path by `BaseCache`, so a policy, its
reference, a value model and a reward model built on one checkpoint hold one copy (PERL).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perl_jax import lora as lora_lib
from perl_jax.models import ModelConfig, Transformer, init_params, load_hf_checkpoint

Params = Any
META_FILE = "perl_jax_model.json"
TRAINABLE_FILE = "trainable.safetensors"


# --- Trees ----------------------------------------------------------------------------------


def flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
  """{'params/layers_0/attn/q/kernel': array, ...}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: dict[str, Any]) -> Params:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def merge(a: Params, b: Params) -> Params:
  """Union of two trees with disjoint leaves (an overlap is a bug, so it raises)."""
  flat_a, flat_b = flatten(a), flatten(b)
  overlap = sorted(set(flat_a) & set(flat_b))
  if overlap:
    raise ValueError(f"frozen and trainable trees both hold {overlap[:5]}")
  return unflatten({**flat_a, **flat_b})


def variables(frozen: Params, trainable: Params) -> dict:
  """The ``model.apply`` variables of a model held as frozen + trainable trees."""
  merged = merge(frozen, trainable)
  merged.setdefault("params", {})
  return merged


# --- Models ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
  """A network with its weights split into frozen and trainable trees."""

  module: Transformer
  frozen: Params
  trainable: Params
  base: str | None  # the frozen base checkpoint directory (None: nothing is frozen)
  tokenizer_dir: str | None  # where a tokenizer for this model lives, if anywhere
  reward_gain: float = 1.0  # reward models: score = gain * head output + bias
  reward_bias: float = 0.0

  @property
  def cfg(self) -> ModelConfig:
    return self.module.cfg

  @property
  def lora(self) -> lora_lib.LoraConfig | None:
    return self.module.lora

  def variables(self, trainable: Params | None = None) -> dict:
    return variables(self.frozen, self.trainable if trainable is None else trainable)


class BaseCache:
  """Loads each frozen base checkpoint once; models built on the same path share its arrays."""

  def __init__(self, dtype: str = "float32"):
    self.dtype = dtype
    self._loaded: dict[str, tuple[ModelConfig, Params]] = {}

  def get(self, path: str) -> tuple[ModelConfig, Params]:
    key = os.path.realpath(path)
    if key not in self._loaded:
      cfg, params = load_hf_checkpoint(path, dtype=self.dtype)
      self._loaded[key] = (cfg, jax.tree.map(jnp.asarray, params))
    return self._loaded[key]


def peek(init: str) -> tuple[ModelConfig, str | None]:
  """(architecture, tokenizer directory or None) of a model directory, reading no weights.

  Lets trainers check a tokenizer against the model before anything is loaded or compiled.
  """
  from perl_jax.models.hf import config_from_hf

  path = Path(init)
  if (path / META_FILE).exists():
    meta = json.loads((path / META_FILE).read_text())
    tokenizer_dir = meta.get("tokenizer_dir")
    if tokenizer_dir is None and meta["base"] is not None:
      tokenizer_dir = peek(meta["base"])[1]
    return _cfg_from_json(meta["model_config"]), tokenizer_dir
  if (path / "config.json").exists():
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    return cfg, str(path) if (path / "tokenizer_config.json").exists() else None
  raise FileNotFoundError(f"{init!r} is neither a Hugging Face checkpoint (no config.json) nor "
                          f"a perl_jax model directory (no {META_FILE})")


def checked_tokenizer(init: str, fallback_dir: str | None = None) -> Any:
  """The tokenizer stored with checkpoint `init` (else `fallback_dir`), checked to fit it."""
  from perl_jax.tokenizers import check_vocab, load_tokenizer

  cfg, tokenizer_dir = peek(init)
  tokenizer_dir = tokenizer_dir or fallback_dir
  if tokenizer_dir is None:
    raise ValueError(f"{init!r} holds no tokenizer (tokenizer_config.json); save one next to "
                     "the checkpoint")
  tokenizer = load_tokenizer(tokenizer_dir)
  check_vocab(tokenizer, cfg)
  return tokenizer


def fresh_head(cfg: ModelConfig, rng: jax.Array) -> Params:
  """A scalar head with N(0, 1/sqrt(d + 1)) weights (RLHF implementation details)."""
  std = (cfg.embed_dim + 1) ** -0.5
  kernel = std * jax.random.normal(rng, (cfg.embed_dim, 1), jnp.float32)
  return {"score": {"kernel": kernel.astype(cfg.weight_dtype)}}


def _split_head(params: Params, cfg: ModelConfig) -> tuple[Params, Params]:
  """(the scalar head, the rest): a scalar model keeps no unused lm_head in its frozen tree."""
  head = {k: v for k, v in params.items() if k == "score"}
  dropped = ("score", "lm_head") if cfg.head == "scalar" else ("score",)
  return head, {k: v for k, v in params.items() if k not in dropped}


def load_model(init: str, *, head: str, lora: lora_lib.LoraConfig | None, cache: BaseCache,
               rng: jax.Array, scratch: ModelConfig | None = None) -> Model:
  """A trainable model from `init` (HF or perl_jax directory; "" -> random `scratch` model).

  head: "lm" or "scalar". A scalar model started from a causal LM gets a fresh head. With a
  LoRA config, the checkpoint's weights are frozen and fresh adapters (plus the head) train;
  without, every parameter trains. A perl_jax directory brings its own trained adapters and LoRA
  config, which take precedence over `lora`.
  """
  rng_adapters, rng_head, rng_init = jax.random.split(rng, 3)
  if not init:
    if scratch is None:
      raise ValueError("no checkpoint given and no model shape to start from")
    cfg = scratch.replace(head=head)
    params = init_params(Transformer(cfg), rng_init)
    return _assemble(cfg, params, lora, None, None, rng_adapters)
  path = Path(init)
  if (path / META_FILE).exists():
    return _load_perl_jax_dir(path, head, cache, rng_head)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{init!r} is neither a Hugging Face checkpoint (no config.json) nor "
                            f"a perl_jax model directory (no {META_FILE})")
  cfg, params = cache.get(str(path))
  if head == "lm" and cfg.head != "lm":
    raise ValueError(f"{init!r} is a scalar (ForSequenceClassification) model; a causal LM "
                     "is needed here")
  if head == "scalar" and cfg.head == "lm":
    params = {**{k: v for k, v in params.items() if k != "lm_head"}, **fresh_head(cfg, rng_head)}
    cfg = cfg.replace(head="scalar")
  tokenizer_dir = str(path) if (path / "tokenizer_config.json").exists() else None
  return _assemble(cfg, params, lora, str(path), tokenizer_dir, rng_adapters)


def _assemble(cfg: ModelConfig, params: Params, lora: lora_lib.LoraConfig | None,
              base: str | None, tokenizer_dir: str | None, rng: jax.Array) -> Model:
  if lora is None:  # full fine-tuning: own copies, so updates never alias a shared base
    trainable = {"params": jax.tree.map(jnp.copy, params)}
    return Model(Transformer(cfg), {"params": {}}, trainable, None, tokenizer_dir)
  module = Transformer(cfg, lora=lora)
  adapters = lora_lib.init_adapters(module, params, rng)
  head, rest = _split_head(params, cfg)
  trainable = {"lora": adapters, **({"params": head} if head else {})}
  return Model(module, {"params": rest}, trainable, base, tokenizer_dir)


def save_model(out_dir: str | os.PathLike, model: Model, trainable: Params | None = None) -> None:
  """Writes a perl_jax model directory: config JSON + the trainable tensors (never non-finite)."""
  from safetensors.numpy import save_file

  trainable = model.trainable if trainable is None else trainable
  flat = {k: np.asarray(v) for k, v in flatten(trainable).items()}
  bad = [k for k, v in flat.items() if not np.all(np.isfinite(v.astype(np.float32)))]
  if bad:
    raise FloatingPointError(f"refusing to save non-finite tensors: {bad[:5]}")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  meta = dict(format=1, model_config=_cfg_to_json(model.cfg),
              lora=None if model.lora is None else dataclasses.asdict(model.lora),
              base=None if model.base is None else os.path.abspath(model.base),
              tokenizer_dir=None if model.tokenizer_dir is None else
              os.path.abspath(model.tokenizer_dir),
              reward_gain=model.reward_gain, reward_bias=model.reward_bias)
  tmp = out / (TRAINABLE_FILE + ".tmp")
  save_file(flat, str(tmp))
  os.replace(tmp, out / TRAINABLE_FILE)  # the meta file is written last: its presence = complete
  (out / META_FILE).write_text(json.dumps(meta, indent=2))


def _load_perl_jax_dir(path: Path, head: str, cache: BaseCache, rng: jax.Array) -> Model:
  from safetensors.numpy import load_file

  meta = json.loads((path / META_FILE).read_text())
  cfg = _cfg_from_json(meta["model_config"]).replace(dtype=cache.dtype, param_dtype=cache.dtype)
  lcfg = None if meta["lora"] is None else lora_lib.LoraConfig(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["lora"].items()})
  trainable = jax.tree.map(lambda x: jnp.asarray(x, cfg.weight_dtype),
                           unflatten(load_file(str(path / TRAINABLE_FILE))))
  frozen: Params = {"params": {}}
  if meta["base"] is not None:
    base_cfg, base_params = cache.get(meta["base"])
    if base_cfg.replace(head=cfg.head) != cfg.replace(dtype=base_cfg.dtype,
                                                      param_dtype=base_cfg.param_dtype):
      raise ValueError(f"{path}: its base checkpoint {meta['base']!r} no longer matches the "
                       "architecture it was trained on")
    frozen = {"params": base_params}
  if head == "scalar" and cfg.head == "lm":
    cfg = cfg.replace(head="scalar")
    trainable = merge(trainable, {"params": fresh_head(cfg, rng)})
  elif head != cfg.head:
    raise ValueError(f"{path} holds a {cfg.head!r}-head model; a {head!r} head is needed here")
  if frozen["params"]:
    frozen = {"params": _split_head(frozen["params"], cfg)[1]}
  model = Model(Transformer(cfg, lora=lcfg), frozen, trainable, meta["base"],
                meta.get("tokenizer_dir"), meta.get("reward_gain", 1.0),
                meta.get("reward_bias", 0.0))
  _check_complete(model, path)
  return model


def _check_complete(model: Model, path: Path) -> None:
  """Every parameter the network needs is present with the right shape (never a partial load)."""
  expected = flatten(jax.eval_shape(lambda: init_params(model.module.clone(lora=None),
                                                        jax.random.PRNGKey(0))))
  have = flatten(model.variables()["params"])
  missing = sorted(set(expected) - set(have))
  wrong = sorted(k for k in set(expected) & set(have) if expected[k].shape != have[k].shape)
  if missing or wrong:
    raise ValueError(f"{path}: incomplete model: missing {missing[:5]}, wrong shapes {wrong[:5]}")


def _cfg_from_json(fields: dict) -> ModelConfig:
  return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _cfg_to_json(cfg: ModelConfig) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def lora_from_config(c: Any) -> lora_lib.LoraConfig | None:
  """The LoraConfig of `config.lora`, or None for full fine-tuning (rank 0)."""
  if c.rank == 0:
    return None
  return lora_lib.LoraConfig(rank=c.rank, alpha=c.alpha, dropout=c.dropout,
                             targets=tuple(c.targets))


def scratch_config(c: Any, vocab_size: int, special: dict[str, int], dtype: str) -> ModelConfig:
  """The ModelConfig of `config.model` (a network trained from scratch) for a tokenizer."""
  from perl_jax.models.config import FAMILY_DEFAULTS

  m = c.model
  fields = dict(family=m.family, vocab_size=vocab_size, embed_dim=m.embed_dim,
                num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                head_dim=m.head_dim, mlp_dim=m.mlp_dim, max_positions=m.max_positions,
                dtype=dtype, param_dtype=dtype, **special)
  fields.update(FAMILY_DEFAULTS[m.family])
  return ModelConfig(**fields)


# --- Optimisation ---------------------------------------------------------------------------


def make_optimizer(c: Any, lr: float | None = None) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW with linear warm-up to a constant rate."""
  peak = c.lr if lr is None else lr
  schedule = (optax.linear_schedule(0.0, peak, c.warmup_steps) if c.warmup_steps
              else optax.constant_schedule(peak))
  adam = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
  if c.max_grad_norm:
    return optax.chain(optax.clip_by_global_norm(c.max_grad_norm), adam)
  return adam


def make_train_step(loss_fn: Any, optimizer: optax.GradientTransformation) -> Any:
  """The jitted pure step ``(trainable, opt_state, frozen, batch, rng) -> (trainable,
  opt_state, metrics)`` for ``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``.

  Metrics gain ``loss`` and ``grad_norm`` (before clipping). `trainable` and `opt_state` are
  donated (updated in place): do not reuse the arrays passed in.
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(trainable: Params, opt_state: Any, frozen: Params, batch: Any, rng: jax.Array):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch,
                                                                       rng)
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

  return step


def count(tree: Params) -> int:
  return lora_lib.count_params(tree)
