"""Export a trained model as Hugging Face files: merged weights, or LoRA adapters for peft.

    python -m perl_jax.export --workdir=DIR --out=OUT [--format=merged|peft] [--dtype=float32]

Design
------
* What is exported: DIR itself when it is a perl_jax model directory (``perl_jax_model.json``)
  or an HF checkpoint, else the first of DIR's ``policy/`` (PPO), ``model/`` (reward model; a
  LoRA SFT run's adapters) and ``hf/`` (SFT, merged). The built-in pipeline's ``sft/`` and
  ``reward/`` stages are workdirs of their own. The model is loaded by `common.load_model`, as
  a trainer loads it, in float32; ``--dtype`` is only the stored dtype.
* ``merged``: `save_hf_checkpoint` with the adapters folded in (in float32): ``config.json`` +
  ``model.safetensors`` of a ``*ForCausalLM`` or, for a scalar head (reward, value), a
  ``*ForSequenceClassification`` with num_labels=1. Plain transformers, no peft needed.
* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` for
  ``PeftModel.from_pretrained(base, OUT)``, base being the frozen checkpoint the adapters were
  trained on (``base_model_name_or_path``). Module names and layouts come from the tensor table
  of `perl_jax.models.hf` that its loader and writer use: the adapter of the kernel stored as
  ``M.weight`` becomes ``M.lora_A.weight`` [r, in] and ``M.lora_B.weight`` [out, r]. Our scale
  ``alpha / r`` is peft's (no rsLoRA). ``target_modules`` lists exactly the adapted modules:
  short names (``q_proj``) when they select nothing else, else full paths. GPT-2 fuses q, k, v
  into one ``c_attn``: its m adapters become one of rank m*r (stacked A, block-diagonal B), with
  ``rank_pattern`` / ``alpha_pattern`` keeping the scale alpha/r. peft is not imported (it needs
  torch): the file holds the fields peft reads; the others take peft's defaults.
* Scalar heads: ``task_type = SEQ_CLS``, the trained head saved whole (``modules_to_save =
  ["score"]``); load the base with ``AutoModelForSequenceClassification.from_pretrained(base,
  num_labels=1)``. A full fine-tune or a merged checkpoint has no adapters: peft is an error.
* Reward gain and bias (perl_jax scores ``gain * head + bias``): the gain is folded into the
  head weight, which is exact. HF classification heads have no bias (Llama, Gemma, Qwen2, GPT-2
  alike), so the bias goes beside the weights: ``reward.bias`` in ``perl_jax_export.json`` and,
  for merged, ``reward_bias`` in ``config.json`` (``model.config.reward_bias`` in
  transformers). HF logit + bias = perl_jax score; preferences (differences) need no bias.
* Tokenizer files are copied from the model's tokenizer directory. OUT must be absent or empty,
  and a failed export leaves it empty: no partial export ever looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from absl import app, flags, logging

FORMATS = ("merged", "peft")
STAGES = ("policy", "model", "hf")  # looked for in a workdir, in this order
EXPORT_FILE = "perl_jax_export.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def find_model(workdir: str | Path) -> Path:
  """The model directory to export in `workdir` (see the module doc); an error names it."""
  from perl_jax.trainers.common import META_FILE

  root = Path(workdir)
  if not root.is_dir():
    raise FileNotFoundError(f"workdir {str(root)!r} does not exist")
  for path in (root, *(root / s for s in STAGES)):
    if (path / META_FILE).exists() or (path / "config.json").exists():
      return path
  raise FileNotFoundError(
      f"nothing to export in {str(root)!r}: it is neither a perl_jax model directory "
      f"({META_FILE}) nor a Hugging Face checkpoint (config.json), and holds none as "
      f"{', '.join(s + '/' for s in STAGES)}")


def export(workdir: str | Path, out: str | Path, fmt: str = "merged",
           dtype: str = "float32") -> dict[str, Any]:
  """Exports the model in `workdir` to `out` as `fmt`; returns what `perl_jax_export.json` holds."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
  source, out = find_model(workdir), Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"output {str(out)!r} exists and is not an empty directory")
  if fmt == "peft":
    _check_has_adapters(source)  # before any weights are read
  import jax
  from perl_jax.trainers import common

  head = common.peek(str(source))[0].head
  model = common.load_model(str(source), head=head, lora=None, cache=common.BaseCache("float32"),
                            rng=jax.random.PRNGKey(0))
  record: dict[str, Any] = dict(
      format=fmt, source=str(source.resolve()), base=model.base, head=model.cfg.head, dtype=dtype,
      lora=None if model.lora is None else dataclasses.asdict(model.lora))
  if model.cfg.head == "scalar":
    record["reward"] = dict(gain=model.reward_gain, bias=model.reward_bias, note="the gain is "
                            "folded into the score weight; perl_jax score = HF logit + bias")
  out.mkdir(parents=True, exist_ok=True)
  try:
    (_save_merged if fmt == "merged" else _save_peft)(model, out, dtype)
    record["tokenizer_files"] = _copy_tokenizer(model.tokenizer_dir, out)
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=2))
  except BaseException:
    for f in out.iterdir():  # OUT was empty: leave no partial export behind
      f.unlink()
    raise
  return record


def _check_has_adapters(source: Path) -> None:
  from perl_jax.trainers.common import META_FILE

  if not (source / META_FILE).exists():
    raise ValueError(f"{source} is a merged Hugging Face checkpoint: it holds no LoRA adapters, "
                     "so only --format=merged applies (LoRA SFT runs also save their adapters "
                     "to WORKDIR/model)")
  meta = json.loads((source / META_FILE).read_text())
  if meta["lora"] is None:
    raise ValueError(f"{source} is a full fine-tune (no LoRA adapters): peft export needs "
                     "adapters; use --format=merged")
  if meta["base"] is None:
    raise ValueError(f"{source} has adapters but no base checkpoint for peft to load them on")


def _fold_gain(params: dict, model: Any) -> dict:
  """The score kernel times the reward gain (exact: gain * (h @ w) = h @ (gain * w))."""
  if model.cfg.head != "scalar" or model.reward_gain == 1.0:
    return params
  score = params["score"]
  return {**params, "score": {**score, "kernel": score["kernel"] * model.reward_gain}}


def _save_merged(model: Any, out: Path, dtype: str) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from perl_jax import lora as lora_lib
  from perl_jax.models import save_hf_checkpoint

  variables = model.variables()
  params = variables["params"]
  if "lora" in variables:
    params = lora_lib.merge(params, variables["lora"], model.lora)
  params = jax.tree.map(lambda x: np.asarray(x).astype(jnp.dtype(dtype)),
                        _fold_gain(params, model))
  save_hf_checkpoint(model.cfg.replace(dtype=dtype, param_dtype=dtype), params, out)
  if model.cfg.head == "scalar":  # the bias an HF score head cannot hold
    config = json.loads((out / "config.json").read_text())
    config["reward_bias"] = model.reward_bias
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_peft(model: Any, out: Path, dtype: str) -> None:
  import jax.numpy as jnp
  import numpy as np
  from safetensors.numpy import save_file

  from perl_jax import lora as lora_lib
  from perl_jax.models.hf import _tensor_specs  # the loader's table: one source of HF names
  from perl_jax.trainers.common import flatten

  cfg, lcfg, scalar = model.cfg, model.lora, model.cfg.head == "scalar"
  heads = dict(model.trainable.get("params", {}))
  if set(heads) - {"score"} or scalar != ("score" in heads):
    raise ValueError(f"trainable params {sorted(heads)} besides adapters cannot be written as "
                     "peft adapters; use --format=merged")
  adapters = dict(model.trainable["lora"])
  if "score" in adapters:  # peft never adapts a module it saves whole: fold into the head
    heads = lora_lib.merge(heads, {"score": adapters.pop("score")}, lcfg)
  kernels = {k: v.shape for k, v in flatten(model.variables()["params"]).items()}
  flat = {k: np.asarray(v, np.float32) for k, v in flatten(adapters).items()}
  pending = {k.rsplit("/", 1)[0] + "/kernel" for k in flat}
  to_np = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).astype(jnp.dtype(dtype)))

  tensors, ranks, alphas = {}, {}, {}
  every, adapted_modules = [], []  # modules an adapter could go on / went on
  for spec in _tensor_specs(cfg, "transformer." if cfg.family == "gpt2" else "model."):
    leaves = ["/".join(leaf) for leaf in spec.leaves]
    if not leaves[0].endswith("kernel") or spec.name == "score.weight":
      continue
    module = spec.name.removesuffix(".weight")
    every.append(module)
    adapted = [j for j, leaf in enumerate(leaves) if leaf in pending]
    if not adapted:
      continue
    pending -= set(leaves)
    adapted_modules.append(module)
    # A: in_dims + (r,) -> [r, in]; B: (r,) + out_dims -> [out, r] (torch Linear and Conv1D alike).
    a_list = [flat[leaves[j][:-len("kernel")] + "a"] for j in adapted]
    b_list = [flat[leaves[j][:-len("kernel")] + "b"] for j in adapted]
    r = a_list[0].shape[-1]
    lora_a = np.concatenate([a.reshape(-1, r).T for a in a_list])
    sizes = [math.prod(kernels[leaf]) // lora_a.shape[1] for leaf in leaves]  # fused: one input
    offsets = np.cumsum([0] + sizes)
    lora_b = np.zeros((offsets[-1], len(adapted) * r), np.float32)
    for i, (j, b) in enumerate(zip(adapted, b_list)):
      lora_b[offsets[j]:offsets[j + 1], i * r:(i + 1) * r] = b.reshape(r, -1).T
    if len(adapted) > 1:  # a stacked adapter of rank m*r: same scale alpha / r
      ranks[re.escape(module)] = len(adapted) * r
      alphas[re.escape(module)] = len(adapted) * lcfg.alpha
    tensors[f"base_model.model.{module}.lora_A.weight"] = to_np(lora_a)
    tensors[f"base_model.model.{module}.lora_B.weight"] = to_np(lora_b)
  if pending:
    raise ValueError(f"adapters on {sorted(pending)} have no Hugging Face module to go on")
  if scalar:
    tensors["base_model.model.score.weight"] = to_np(
        np.asarray(_fold_gain(heads, model)["score"]["kernel"]).reshape(cfg.embed_dim, 1).T)

  short = {m.rsplit(".", 1)[-1] for m in adapted_modules}
  selected = {m for m in every if m.rsplit(".", 1)[-1] in short}
  targets = sorted(short) if selected == set(adapted_modules) else sorted(adapted_modules)
  number = lambda x: int(x) if float(x).is_integer() else float(x)
  config = dict(
      peft_type="LORA", task_type="SEQ_CLS" if scalar else "CAUSAL_LM",
      base_model_name_or_path=model.base, r=lcfg.rank, lora_alpha=number(lcfg.alpha),
      lora_dropout=lcfg.dropout, target_modules=targets, use_rslora=False, use_dora=False,
      fan_in_fan_out=cfg.family == "gpt2",  # GPT-2's Conv1D weights are (in, out)
      bias="none", modules_to_save=["score"] if scalar else None, inference_mode=True,
      rank_pattern=ranks, alpha_pattern={k: number(v) for k, v in alphas.items()})
  save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _copy_tokenizer(tokenizer_dir: str | None, out: Path) -> list[str]:
  if tokenizer_dir is None:
    logging.warning("the model names no tokenizer directory: %s holds no tokenizer", out)
    return []
  copied = [n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
  for name in copied:
    shutil.copyfile(Path(tokenizer_dir) / name, out / name)
  if not copied:
    logging.warning("no tokenizer files in %s: %s holds no tokenizer", tokenizer_dir, out)
  return copied


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  try:
    record = export(f.workdir, f.out, f.format, f.dtype)
  except (FileNotFoundError, ValueError) as e:  # bad inputs: a message, not a traceback
    sys.exit(f"error: {e}")
  print(json.dumps({"out": f.out, **record}, indent=2))


def _define_flags() -> None:
  """Only when run as a program: absl flags are global, and importing this module (tests,
  other commands) must not claim --workdir or --dtype, which perl_jax.train and .generate own."""
  flags.DEFINE_string("workdir", None, "A perl_jax.train workdir, a perl_jax model directory or "
                      "a Hugging Face checkpoint.")
  flags.DEFINE_string("out", None, "Output directory (absent or empty).")
  flags.DEFINE_enum("format", "merged", list(FORMATS), "merged: one HF checkpoint; peft: LoRA "
                    "adapters for peft on the base checkpoint.")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                    "Stored dtype (adapters are merged in float32).")
  flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
