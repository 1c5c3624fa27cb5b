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
The base is recorded by path plus a cheap fingerprint (`base_fingerprint`), checked on every
`peek` and load, so adapters are never silently restored onto a different or retrained base.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from perl_jax import lora as lora_lib
from perl_jax.models import ModelConfig, Transformer, init_params, load_hf_checkpoint
from perl_jax.models.hf import CheckpointError

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
  """Loads each frozen base checkpoint once; models built on the same path share its arrays.

  With a `layout` (`perl_jax.trainers.layout.Layout`) bases go from host memory straight to
  their shards, and `load_model` places every model it builds with the same layout; without
  one, arrays live on the default device.
  """

  def __init__(self, dtype: str = "float32", layout: Any = None):
    self.dtype = dtype
    self.layout = layout
    self._loaded: dict[str, tuple[ModelConfig, Params]] = {}

  def get(self, path: str) -> tuple[ModelConfig, Params]:
    key = os.path.realpath(path)
    if key not in self._loaded:
      cfg, params = load_hf_checkpoint(path, dtype=self.dtype)
      if self.layout is None:
        params = jax.device_put(params)  # one transfer, no per-shape programs
      else:
        params = self.layout.place(Transformer(cfg), {"params": params})["params"]
      self._loaded[key] = (cfg, params)
    return self._loaded[key]


def peek(init: str) -> tuple[ModelConfig, str | None]:
  """(architecture, tokenizer directory or None) of a model directory, checked without
  reading any weights.

  An HF checkpoint: config.json and every tensor's name, shape and dtype (safetensors headers,
  `check_hf_checkpoint`). A perl_jax directory: its meta file, the names and shapes of its
  trainable tensors, and its base checkpoint (it must exist, have the architecture the model
  was trained on and, where recorded, the same `base_fingerprint`). Trainers call this before
  anything is loaded or compiled; every problem is a `CheckpointError` naming the directory
  and the file, key or tensor.
  """
  from perl_jax.models.hf import check_hf_checkpoint

  path = Path(init)
  if (path / META_FILE).exists():
    meta, cfg, lcfg = _read_meta(path)
    tokenizer_dir = meta.get("tokenizer_dir")
    if meta["base"] is not None:
      base_tokenizer = _check_base(path, meta, cfg)
      tokenizer_dir = tokenizer_dir or base_tokenizer
    _check_trainable_header(path, cfg, lcfg, has_base=meta["base"] is not None)
    return cfg, tokenizer_dir
  if (path / "config.json").exists():
    cfg = check_hf_checkpoint(path)
    return cfg, str(path) if (path / "tokenizer_config.json").exists() else None
  what = "does not exist" if not path.exists() else (
      f"is neither a Hugging Face checkpoint (no config.json) nor a perl_jax model directory "
      f"(no {META_FILE})")
  raise CheckpointError(f"model directory {init!r} {what}")


def checked_tokenizer(init: str, fallback_dir: str | None = None) -> Any:
  """The tokenizer stored with checkpoint `init` (else `fallback_dir`), checked to fit it."""
  from perl_jax.tokenizers import TokenizerNotFoundError, check_vocab, load_tokenizer

  # The vocabulary first, from the config alone: of all that can be wrong with a checkpoint,
  # a tokenizer that does not belong to it is the likeliest and says the most.
  cfg, tokenizer_dir = _config_and_tokenizer_dir(Path(init))
  tokenizer_dir = tokenizer_dir or fallback_dir
  if tokenizer_dir is None:
    raise TokenizerNotFoundError(f"{init!r} holds no tokenizer (tokenizer_config.json); save "
                                 "one next to the checkpoint")
  tokenizer = load_tokenizer(tokenizer_dir)
  check_vocab(tokenizer, cfg, init)
  peek(init)
  return tokenizer


def _config_and_tokenizer_dir(path: Path) -> tuple[ModelConfig, str | None]:
  """`peek` without its checks: the config file(s) only."""
  from perl_jax.models.hf import read_hf_config

  if (path / META_FILE).exists():
    meta, cfg, _ = _read_meta(path)
    tokenizer_dir = meta.get("tokenizer_dir")
    if tokenizer_dir is None and meta["base"] is not None:
      base = Path(meta["base"])
      tokenizer_dir = str(base) if (base / "tokenizer_config.json").exists() else None
    return cfg, tokenizer_dir
  if (path / "config.json").exists():
    cfg = read_hf_config(path)
    return cfg, str(path) if (path / "tokenizer_config.json").exists() else None
  return peek(str(path))  # raises, naming what is missing


# --- Checks of model directories without reading weights ------------------------------------


def _read_meta(path: Path) -> tuple[dict, ModelConfig, lora_lib.LoraConfig | None]:
  """(meta, model config, LoRA config) of a perl_jax model directory's meta file."""
  file = path / META_FILE
  try:
    meta = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON: {e}") from None
  if not isinstance(meta, dict):
    raise CheckpointError(f"{file}: expected a JSON object")
  for key in ("model_config", "lora", "base"):
    if key not in meta:
      raise CheckpointError(f"{file}: missing key {key!r}")
  try:
    cfg = _cfg_from_json(meta["model_config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{file}: key 'model_config': {e}") from None
  try:
    lcfg = None if meta["lora"] is None else lora_lib.LoraConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["lora"].items()})
  except (TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{file}: key 'lora': {e}") from None
  return meta, cfg, lcfg


def _check_base(path: Path, meta: dict, cfg: ModelConfig) -> str | None:
  """Checks that a perl_jax directory's base is the checkpoint it was trained on; returns the
  base's tokenizer directory (or None)."""
  from perl_jax.models.hf import check_hf_checkpoint

  base = Path(meta["base"])
  if not (base / "config.json").exists():
    raise CheckpointError(f"{path}: its base checkpoint {str(base)!r} is gone (no config.json "
                          "there); a perl_jax model directory holds only what was trained and "
                          "reads the rest from that path")
  base_cfg = check_hf_checkpoint(base)
  ignore = ("head", "dtype", "param_dtype")  # a scalar model on a causal LM; load-time dtypes
  differ = [f"{f.name}={getattr(cfg, f.name)!r} (base: {getattr(base_cfg, f.name)!r})"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in ignore and getattr(cfg, f.name) != getattr(base_cfg, f.name)]
  if differ:
    raise CheckpointError(f"{path} was trained on a different architecture than its base "
                          f"checkpoint {str(base)!r} now has: " + ", ".join(differ))
  _check_base_fingerprint(path, base, meta.get("base_fingerprint"))
  return str(base) if (base / "tokenizer_config.json").exists() else None


def _read_safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
  """({tensor name: {dtype, shape, data_offsets}}, byte offset of the data) of a safetensors
  file, read from its header only; a truncated file is an error naming it."""
  try:
    with open(file, "rb") as f:
      size = int.from_bytes(f.read(8), "little")
      if not 0 < size <= 100 * 2**20:  # real headers are KBs to a few MB
        raise ValueError(f"header length {size} is not plausible")
      header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    start, file_size = 8 + size, file.stat().st_size
    for name, info in header.items():
      begin, end = info["data_offsets"]
      if not 0 <= begin <= end <= file_size - start:
        raise ValueError(f"tensor {name} lies beyond the end of the file (truncated?)")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None
  return header, start


@functools.lru_cache(maxsize=16)
def _expected_trainable(cfg: ModelConfig,
                        lcfg: lora_lib.LoraConfig | None) -> dict[str, tuple[int, ...]]:
  """{'params/...' and 'lora/...': shape} of every tensor a model of `cfg` can train, from
  abstract evaluation (traced, never compiled or computed)."""
  # The keys are made inside eval_shape: even an eager PRNGKey compiles a (tiny) program.
  params = jax.eval_shape(lambda: init_params(Transformer(cfg), jax.random.PRNGKey(0)))
  out = {f"params/{k}": tuple(v.shape) for k, v in flatten(params).items()}
  if lcfg is not None:
    module = Transformer(cfg, lora=lcfg)
    adapters = lora_lib.adapter_shapes(module, params, jax.ShapeDtypeStruct((2,), jnp.uint32))
    out.update({f"lora/{k}": tuple(v.shape) for k, v in flatten(adapters).items()})
  return out


def _check_trainable_header(path: Path, cfg: ModelConfig, lcfg: lora_lib.LoraConfig | None,
                            has_base: bool) -> None:
  """The trainable tensors of a perl_jax directory fit the model its meta file describes."""
  from perl_jax.models.hf import _names

  file = path / TRAINABLE_FILE
  if not file.exists():
    raise CheckpointError(f"{path} has {META_FILE} but no {TRAINABLE_FILE}")
  stored = {k: tuple(v["shape"]) for k, v in _read_safetensors_header(file)[0].items()}
  try:
    expected = _expected_trainable(cfg, lcfg)
  except ValueError as e:  # e.g. LoRA targets that match no kernel of this architecture
    raise CheckpointError(f"{path / META_FILE}: {e}") from None
  # LoRA: every adapter (the base supplies the frozen params); no base: every param.
  required = {k for k in expected if k.startswith("lora/")}
  if not has_base:
    required |= {k for k in expected if k.startswith("params/")}
  problems = []
  missing = sorted(required - set(stored))
  unexpected = sorted(set(stored) - set(expected))
  if missing:
    problems.append(f"missing tensors {_names(missing)}")
  if unexpected:
    problems.append(f"unexpected tensors {_names(unexpected)}")
  problems += [f"tensor {k} has shape {stored[k]}, expected {expected[k]}"
               for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
  if problems:
    desc = f"{cfg.family}, {cfg.num_layers} layers, embed_dim {cfg.embed_dim}" + (
        f", LoRA rank {lcfg.rank}" if lcfg else "")
    raise CheckpointError(f"{file} does not fit the model {META_FILE} describes ({desc}): "
                          + "; ".join(problems))


# --- Base fingerprints ----------------------------------------------------------------------

FINGERPRINT_SAMPLE_BYTES = 256  # leading bytes of every tensor hashed into the fingerprint


def _base_weight_files(base: Path) -> list[Path]:
  """The safetensors files the loader reads: model.safetensors, else the index's shards."""
  if (base / "model.safetensors").exists():
    return [base / "model.safetensors"]
  index = base / "model.safetensors.index.json"
  if not index.exists():
    raise CheckpointError(f"{base} has neither model.safetensors nor {index.name}")
  try:
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f"{index}: not a safetensors index: {e}") from None
  return [base / name for name in shards]


def base_fingerprint(base: str | os.PathLike) -> dict[str, Any]:
  """A cheap identity of the HF checkpoint directory `base`, recorded by `save_model` and
  checked whenever the model directory is peeked at or loaded.

  Hashing every byte of a multi-GB base would add seconds to minutes to each load, so this
  reads only config.json, the safetensors headers and the first FINGERPRINT_SAMPLE_BYTES of
  each tensor (a few hundred small reads for a 7B model: milliseconds):

  * ``config_sha256``: config.json, i.e. the architecture and its settings;
  * ``tensors_sha256``, ``num_tensors``, ``tensor_bytes``: every tensor's name, dtype and shape,
    and their total size (independent of file layout, so re-sharding keeps them);
  * ``sample_sha256``: the sampled bytes of every tensor, in name order. Retraining changes them
    for every matrix it touched (a merged LoRA update is dense), so a retrained base with the
    same shapes is caught too. Weights that differ only past each tensor's first bytes would
    not be; training never produces that.
  """
  base = Path(base)
  try:
    config_sha = hashlib.sha256((base / "config.json").read_bytes()).hexdigest()
  except OSError as e:
    raise CheckpointError(f"{base}: cannot read config.json: {e}") from None
  table: dict[str, tuple[str, list[int]]] = {}
  samples: dict[str, bytes] = {}
  total = 0
  for file in _base_weight_files(base):
    header, start = _read_safetensors_header(file)
    with open(file, "rb") as f:
      for name in sorted(header):
        info = header[name]
        begin, end = info["data_offsets"]
        table[name] = (info["dtype"], list(info["shape"]))
        total += end - begin
        f.seek(start + begin)
        samples[name] = f.read(min(FINGERPRINT_SAMPLE_BYTES, end - begin))
  sample_hash = hashlib.sha256()
  for name in sorted(samples):
    sample_hash.update(name.encode() + b"\0" + samples[name])
  return {"config_sha256": config_sha,
          "tensors_sha256": hashlib.sha256(json.dumps(sorted(table.items())).encode()).hexdigest(),
          "num_tensors": len(table), "tensor_bytes": total,
          "sample_sha256": sample_hash.hexdigest(), "sample_bytes": FINGERPRINT_SAMPLE_BYTES}


def _check_base_fingerprint(path: Path, base: Path, recorded: dict | None) -> None:
  """Raises naming what changed if `base` is not the checkpoint `path` was trained on."""
  if not recorded:
    return  # written before fingerprints were recorded: the path and architecture are all we have
  now = base_fingerprint(base)
  differ = []
  if now["config_sha256"] != recorded.get("config_sha256"):
    differ.append("its config.json differs")
  if now["tensors_sha256"] != recorded.get("tensors_sha256"):
    differ.append(f"its tensors differ in names, dtypes or shapes ({recorded.get('num_tensors')} "
                  f"tensors, {recorded.get('tensor_bytes')} bytes at training time; "
                  f"{now['num_tensors']} tensors, {now['tensor_bytes']} bytes now)")
  elif (recorded.get("sample_bytes") == now["sample_bytes"]
        and now["sample_sha256"] != recorded.get("sample_sha256")):
    differ.append("its tensors have the same names and shapes but different values (the base "
                  "was retrained or replaced)")
  if differ:
    raise CheckpointError(f"{path} was trained on base checkpoint {str(base)!r}, which has "
                          f"changed since: {'; '.join(differ)}. Adapters and heads only fit the "
                          f"exact base they were trained on: restore it, or retrain {path}")


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
  config, which take precedence over `lora`. Arrays are placed by `cache.layout`, if any.
  """
  return _placed(_load_model(init, head, lora, cache, rng, scratch), cache.layout)


def _placed(model: Model, layout: Any) -> Model:
  """`model` with its trainable tree on `layout` (the frozen one comes placed from the cache)."""
  if layout is not None:
    model.trainable = layout.place(model.module, model.trainable)
  return model


def _load_model(init: str, head: str, lora: lora_lib.LoraConfig | None, cache: BaseCache,
                rng: jax.Array, scratch: ModelConfig | None) -> Model:
  rng_adapters, rng_head, rng_init = jax.random.split(rng, 3)
  layout = cache.layout
  if not init:
    if scratch is None:
      raise ValueError("no checkpoint given and no model shape to start from")
    cfg = scratch.replace(head=head)
    params = (init_params(Transformer(cfg), rng_init) if layout is None
              else layout.init_params(Transformer(cfg), rng_init))
    return _assemble(cfg, params, lora, None, None, rng_adapters, layout)
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
  return _assemble(cfg, params, lora, str(path), tokenizer_dir, rng_adapters, layout)


def _assemble(cfg: ModelConfig, params: Params, lora: lora_lib.LoraConfig | None,
              base: str | None, tokenizer_dir: str | None, rng: jax.Array,
              layout: Any = None) -> Model:
  if lora is None:  # full fine-tuning: own copies, so updates never alias a shared base
    trainable = {"params": jax.tree.map(jnp.copy, params)}
    return Model(Transformer(cfg), {"params": {}}, trainable, None, tokenizer_dir)
  module = Transformer(cfg, lora=lora)
  adapters = (lora_lib.init_adapters(module, params, rng) if layout is None
              else layout.init_adapters(module, params, rng))
  head, rest = _split_head(params, cfg)
  # A head from a cached base is copied: trainers donate trainable trees to their update
  # steps, which would delete the cache's array under every other model built on that base
  # (PPO's reward and value models from one ForSequenceClassification checkpoint).
  head = jax.tree.map(jnp.copy, head)
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
              # checked at load time (older meta files without it still load)
              base_fingerprint=None if model.base is None else base_fingerprint(model.base),
              tokenizer_dir=None if model.tokenizer_dir is None else
              os.path.abspath(model.tokenizer_dir),
              reward_gain=model.reward_gain, reward_bias=model.reward_bias)
  tmp = out / (TRAINABLE_FILE + ".tmp")
  save_file(flat, str(tmp))
  os.replace(tmp, out / TRAINABLE_FILE)  # the meta file is written last: its presence = complete
  (out / META_FILE).write_text(json.dumps(meta, indent=2))


def _load_perl_jax_dir(path: Path, head: str, cache: BaseCache, rng: jax.Array) -> Model:
  from safetensors.numpy import load_file

  peek(str(path))  # meta, tensor shapes, base architecture and fingerprint: before any weights
  meta, cfg, lcfg = _read_meta(path)
  cfg = cfg.replace(dtype=cache.dtype, param_dtype=cache.dtype)
  # With a layout, host arrays go straight to their shards (`_placed`), never whole to one device.
  to_array = jnp.asarray if cache.layout is None else np.asarray
  trainable = jax.tree.map(lambda x: to_array(x, jnp.dtype(cfg.weight_dtype)),
                           unflatten(load_file(str(path / TRAINABLE_FILE))))
  frozen: Params = {"params": {}}
  if meta["base"] is not None:
    base_cfg, base_params = cache.get(meta["base"])
    if base_cfg.replace(head=cfg.head) != cfg.replace(dtype=base_cfg.dtype,
                                                      param_dtype=base_cfg.param_dtype):
      raise CheckpointError(f"{path}: its base checkpoint {meta['base']!r} no longer matches "
                            "the architecture it was trained on")
    frozen = {"params": base_params}
  if head == "scalar" and cfg.head == "lm":
    cfg = cfg.replace(head="scalar")
    trainable = merge(trainable, {"params": fresh_head(cfg, rng)})
  elif head != cfg.head:
    raise CheckpointError(f"{path} holds a {cfg.head!r}-head model; a {head!r} head is needed "
                          "here")
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
  """The jitted pure step ``(trainable, opt_state, frozen, batch, rng, step) -> (trainable,
  opt_state, metrics)`` for ``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``.

  The step's randomness is ``fold_in(rng, step)``, so a resumed run draws what the
  uninterrupted one would have. Metrics gain ``loss``, ``grad_norm`` (before clipping) and
  `nonfinite_flags`: a step whose loss or gradient is not finite changes nothing (see
  `SkipCounter`). `trainable` and `opt_state` are donated: do not reuse the arrays passed in.
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(trainable: Params, opt_state: Any, frozen: Params, batch: Any, rng: jax.Array,
           step: jax.Array):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, batch, jax.random.fold_in(rng, step))
    flags = nonfinite_flags(loss, grads)
    trainable, opt_state = apply_if(flags["nonfinite/any"] == 0, optimizer,
                                    (trainable, opt_state), grads)
    return trainable, opt_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads),
                                  **flags}

  return step


def nonfinite_flags(loss: jax.Array, grads: Params) -> dict[str, jax.Array]:
  """{'nonfinite/loss', 'nonfinite/grad', 'nonfinite/any'}: 1.0 where not finite, else 0.0."""
  bad_loss = ~jnp.all(jnp.isfinite(loss))
  bad_grad = ~jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  f = lambda x: x.astype(jnp.float32)
  return {"nonfinite/loss": f(bad_loss), "nonfinite/grad": f(bad_grad),
          "nonfinite/any": f(bad_loss | bad_grad)}


def apply_if(ok: jax.Array, optimizer: optax.GradientTransformation, state: Any,
             grads: Params) -> Any:
  """`state` (a (trainable, opt_state) pair) after one optimizer step on `grads` if `ok`, else
  `state` itself, bit for bit. A `lax.cond`, not a select: selecting between old and new
  states per leaf made XLA keep both alive (+300 MB and twice the compile time for PPO's
  update on CPU)."""
  def step(s):
    trainable, opt_state = s
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    new = (optax.apply_updates(trainable, updates), opt_state)
    return type(s)(*new) if hasattr(s, "_fields") else new  # a NamedTuple stays one

  return jax.lax.cond(ok, step, lambda s: s, state)


class NonFiniteTrainingError(FloatingPointError):
  """Too many consecutive steps had a non-finite loss or gradient."""


class SkipCounter:
  """Counts skipped (non-finite) steps on the host; stops the run after `limit` in a row.

  `update(step, metrics)` takes a step's metrics (as returned by a step function), returns
  them without the per-step flags (and without non-finite values, so they can be logged),
  plus ``train/skipped_steps`` (the total so far).
  """

  def __init__(self, limit: int, total: int = 0):
    self.limit, self.total, self.in_a_row = limit, total, 0

  def update(self, step: int, metrics: dict) -> dict:
    """Flags may be scalars or [M] arrays (M optimizer steps in order, e.g. PPO minibatches)."""
    metrics = dict(metrics)
    flags = {k: np.atleast_1d(np.asarray(metrics.pop(k), np.float32))
             for k in list(metrics) if k.startswith("nonfinite/")}
    n = max((f.size for f in flags.values()), default=0)
    flags = {k: np.broadcast_to(f, (n,)) for k, f in flags.items()}
    skipped = False
    for i, bad in enumerate(flags.get("nonfinite/any", ())):
      if not bad:
        self.in_a_row = 0
        continue
      skipped = True
      self.total += 1
      self.in_a_row += 1
      what = " and ".join(k.split("/")[1] for k in ("nonfinite/loss", "nonfinite/grad")
                          if k in flags and flags[k][i])
      logging.warning("step %d: non-finite %s; update skipped (%d in a row)", step, what,
                      self.in_a_row)
      if self.in_a_row >= self.limit:
        raise NonFiniteTrainingError(
            f"step {step}: non-finite {what} for {self.in_a_row} updates in a row "
            f"(optimizer.max_consecutive_skips={self.limit}); stopping. The last checkpoint "
            "holds the last good state")
    if skipped:  # the skipped updates' NaN losses are not worth a line; the count is
      metrics = {k: v for k, v in metrics.items() if np.all(np.isfinite(np.asarray(v)))}
    metrics["train/skipped_steps"] = self.total
    return metrics


def count(tree: Params) -> int:
  return lora_lib.count_params(tree)
