"""Config blocks shared by `configs/*.py`, and the checks every config passes before compiling.

Each file in `configs/` has a `get_config()` that assembles these blocks and sets its task.
Every key is documented here, next to its default, once. A user overrides any key on the
command line (``--config.ppo.kl_coef=0.1``); ml_collections rejects unknown keys on the command
line, and `validate` rejects unknown keys (set in Python) and inconsistent values with a
`ConfigError` naming the key, before any compute.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

import ml_collections as mlc

from perl_jax import lora as lora_lib
from perl_jax.models.config import FAMILIES

TASKS = ("sft", "reward", "ppo")


class ConfigError(ValueError):
  """A config key no config has, or values that cannot work together; names the key."""


def base(task: str) -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.task = task  # which trainer runs: "sft" | "reward" | "ppo"
  c.seed = 0  # every random choice (init, data order, sampling) derives from it
  c.workdir = ""  # output directory; the --workdir flag overrides; "" -> ./workdir/<config name>
  c.dtype = "float32"  # param and compute dtype of loaded models: "float32" | "bfloat16"
  c.total_iterations = 100  # optimizer steps (sft, reward) or PPO iterations (ppo)
  c.log_every = 10  # steps between metric lines
  c.eval_every = 50  # steps between evaluations (held-out metrics, decoded samples)
  c.progress = True  # tqdm progress bar on the terminal
  c.optimizer = optimizer()
  c.checkpoint = checkpoint()
  c.lora = lora()
  c.data = data()
  c.mesh = mesh()
  # Used only when no checkpoint is given (policy.init == ""): a random model of this shape.
  c.model = model()
  return c


def model() -> mlc.ConfigDict:
  m = mlc.ConfigDict()
  m.family = "llama"  # one of perl_jax.models.FAMILIES
  m.num_layers = 2
  m.embed_dim = 64
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 16
  m.mlp_dim = 256
  m.max_positions = 512  # learned-position families only
  return m


def optimizer() -> mlc.ConfigDict:
  o = mlc.ConfigDict()
  o.lr = 1e-3  # peak learning rate (LoRA runs take ~10x the full-tuning rate)
  o.warmup_steps = 0  # linear warm-up, then constant
  o.b1 = 0.9
  o.b2 = 0.95  # PPO-max: Adam beta2 0.95
  o.eps = 1e-6  # PPO-max: Adam epsilon 1e-6 (added outside the sqrt, as optax does)
  o.weight_decay = 0.0
  o.max_grad_norm = 1.0  # global gradient-norm clipping; 0 disables
  # A step whose loss or gradient is not finite is skipped (params and optimizer state kept)
  # and counted; this many skips in a row stop the run, naming the step and what was wrong.
  o.max_consecutive_skips = 5
  return o


def mesh() -> mlc.ConfigDict:
  """The device mesh every trainer runs on (`perl_jax.sharding`, `perl_jax/trainers/layout.py`).

  One size may be -1: it takes the devices the others leave. Without a -1 the product must
  divide the device count and the run uses the first data x fsdp x tensor devices. Batches
  (data.batch_size; PPO's prompts and microbatches) must divide over data x fsdp.
  """
  m = mlc.ConfigDict()
  m.data = 1  # splits the batch; params replicated (data parallelism)
  m.fsdp = -1  # splits the batch and the params' embed dimension (FSDP / ZeRO-3)
  m.tensor = 1  # splits heads, KV heads, MLP width and vocab (Megatron tensor parallelism)
  # Overrides of entries of the logical-axis rules table (sharding.LOGICAL_RULES), as
  # "logical=axes" separated by commas; axes are mesh axes joined by "+", or "none"
  # (replicated): e.g. "kv_heads=none,embed=fsdp+data". Unlisted names keep their entry; the
  # table keeps its order (it matters: see perl_jax/sharding.py).
  m.rules = ""
  return m


def phase_mesh() -> mlc.ConfigDict:
  """PPO's per-phase meshes, "data=1,fsdp=2,tensor=4" (missing axes: 1; the product must equal
  config.mesh's device count); "" is config.mesh. `layouts=auto` ignores these."""
  m = mlc.ConfigDict()
  m.generate = ""  # rollout: the KV-cache sampler
  m.score = ""  # reward, reference and value forward passes
  m.train = ""  # the update (models load here; optimizer state lives here)
  m.auto_candidates = 4  # layouts=auto: at most this many meshes measured per phase
  m.auto_runs = 2  # layouts=auto: timed runs per candidate (after one compiling run)
  return m


def checkpoint() -> mlc.ConfigDict:
  """Orbax checkpoints in WORKDIR/checkpoints; the same command resumes from the latest."""
  k = mlc.ConfigDict()
  k.every_steps = 50  # save every N steps (PPO: iterations); 0: only by time and at the end
  k.every_minutes = 10.0  # ...and at least this often; 0 disables the time trigger
  k.keep = 3  # the newest checkpoints kept
  k.asynchronous = True  # write in the background while training continues
  return k


def lora() -> mlc.ConfigDict:
  l = mlc.ConfigDict()
  l.rank = 8  # 0 trains every parameter instead (full fine-tuning)
  l.alpha = 16.0  # adapters add (alpha / rank) * B A x
  l.dropout = 0.0  # on the adapter input, training only
  l.targets = lora_lib.ALL_TARGETS  # regexes over param paths, e.g. "attn/(q|v)/kernel$"
  return l


def data() -> mlc.ConfigDict:
  d = mlc.ConfigDict()
  d.prompts = ""  # RL prompts, JSONL {"prompt"}; "" -> the built-in synthetic task
  d.train = ""  # SFT {"prompt","response"} or reward {"prompt","chosen","rejected"} /
  d.eval = ""  # {"prompt","response","label"} JSONL; "" -> the built-in synthetic task
  # A published dataset prepared with `python -m perl_jax.data.prepare` instead of JSONL:
  # hh_rlhf | tldr_comparisons | tldr_sft | shp | thumbs (perl_jax.data.tfds_builders). SFT and
  # reward read its train and eval splits (SFT on a preference set trains on the chosen
  # responses); PPO takes the prompts of its train split.
  d.tfds = ""
  d.tfds_dir = ""  # the --data_dir it was prepared in; "" -> TFDS's default (~/tensorflow_datasets)
  d.tfds_train_split = "train"  # TFDS split syntax works, e.g. "train[:10%]"
  d.tfds_eval_split = ""  # "" -> the dataset's evaluation split (test or validation)
  # Prompt text: "chat" applies the tokenizer's chat template (conversations as user/assistant
  # messages), "plain" fills `prompt_template`, "auto" is chat when the tokenizer has a template.
  d.prompt_format = "auto"
  d.prompt_template = "{prompt}"  # plain format; {prompt} is the record's prompt text
  d.max_prompt_len = 16  # tokens (after formatting); longer prompts follow `truncate`
  d.max_response_len = 16  # tokens of SFT / preference responses (EOS added on top)
  d.truncate = "error"  # too-long prompt: "error" | "left" (keep the last tokens, log a count)
  d.batch_size = 32  # examples per optimizer step (sft, reward), over all processes
  return d


def checkpoint_refs() -> tuple[mlc.ConfigDict, mlc.ConfigDict, mlc.ConfigDict]:
  """policy / reward / value `init`: an HF checkpoint directory or a perl_jax model directory."""
  policy = mlc.ConfigDict()
  policy.init = ""  # causal LM + tokenizer; "" -> built-in synthetic task (trained here first)
  reward = mlc.ConfigDict()
  reward.init = ""  # ForSequenceClassification dir or a perl_jax reward model; "" -> trained here
  reward.num_samples_for_norm = 256  # reference-policy samples used to set gain and bias
  value = mlc.ConfigDict()
  value.init = ""  # "" -> the reward model (PPO-max: critic initialised from the reward model)
  return policy, reward, value


def rollout() -> mlc.ConfigDict:
  r = mlc.ConfigDict()
  r.max_new_tokens = 16
  r.temperature = 1.0  # log-probs are computed at this temperature too
  r.top_p = 1.0
  r.top_k = 0
  r.stop_at_eos = True  # False: always generate exactly max_new_tokens
  r.num_samples = 1  # responses per prompt (>= 2 for rloo / grpo)
  # Old log-probs for PPO: "auto" takes the sampler's own when it drew from the unfiltered
  # softmax(logits / T) (top_k = 0, top_p = 1), saving a policy forward pass; "recompute"
  # always runs one, as TRL does.
  r.logprobs = "auto"
  return r


def ppo() -> mlc.ConfigDict:
  p = mlc.ConfigDict()
  p.batch_size = 32  # prompts per iteration
  p.num_minibatches = 2  # minibatches per epoch over the batch x num_samples responses
  p.grad_accum = 1  # microbatches per minibatch (gradient accumulation)
  p.epochs = 1  # passes over each rollout batch
  p.estimator = "gae"  # "gae" (PPO with a value model) | "reinforce" | "rloo" | "grpo"
  p.kl_coef = 0.05  # per-token KL penalty in the reward (PPO-max: 0.05)
  p.kl_estimator = "k1"  # "k1" | "k3" (low variance) | "k2"
  p.adaptive_kl = False  # adaptive controller (Ziegler et al.) instead of a fixed coefficient
  p.kl_target = 6.0
  p.kl_horizon = 10000
  p.gamma = 1.0
  p.lam = 0.95
  p.reward_norm = True  # PPO-max: normalise scores with running statistics...
  p.reward_clip = 10.0  # ...and clip them to +-reward_clip (0 disables clipping)
  p.whiten_advantages = True
  p.adv_clip = 0.0  # clip whitened advantages to +-adv_clip; 0 disables (PPO-max: 0.5)
  p.clip_eps = 0.2  # policy ratio clip
  p.dual_clip = 0.0  # dual-clip constant c > 1 for negative advantages; 0 disables
  p.value_clip_eps = 0.2  # value prediction clip around the old values
  p.vf_coef = 0.1
  p.value_lr = 0.0  # critic learning rate; 0 -> optimizer.lr
  p.entropy_coef = 0.0  # PPO-max: sensitive, off by default
  p.ptx_coef = 0.0  # PPO-ptx: weight of an LM loss on data.train (SFT data)
  p.critic_warmup_iters = 0  # iterations that train only the value model first
  p.missing_eos_penalty = 0.0  # subtracted from the score of responses without EOS
  return p


def validate(c: mlc.ConfigDict, num_devices: int | None = None) -> None:
  """Raises `ConfigError` naming the key for an unknown key or values that cannot work together.

  The mesh is checked against `num_devices` (default: this process's `jax.device_count()`;
  `perl_jax.plan` passes the target topology's)."""

  def fail(key: str, why: str):
    raise ConfigError(f"config.{key}: {why}")

  if c.task not in TASKS:
    fail("task", f"{c.task!r} is not one of {TASKS}")
  # A key no trainer reads is a typo, and a silently ignored setting (ConfigDicts accept new
  # attributes unless locked, so one set in Python gets this far).
  known = _keys({"sft": sft_config, "reward": reward_config, "ppo": ppo_config}[c.task]())
  for key in _keys(c):
    if key not in known and not any(key.startswith(k + ".") for k in known):
      close = difflib.get_close_matches(key, known, n=1)
      fail(key, f"unknown key for task {c.task!r}" + (f" (did you mean config.{close[0]}?)"
                                                      if close else ""))
  if c.dtype not in ("float32", "bfloat16"):
    fail("dtype", f"{c.dtype!r} must be 'float32' or 'bfloat16'")
  for key in ("total_iterations", "log_every", "eval_every", "data.batch_size",
              "data.max_prompt_len", "data.max_response_len"):
    if _get(c, key) < 1:
      fail(key, f"must be >= 1, got {_get(c, key)}")
  if c.data.truncate not in ("error", "left"):
    fail("data.truncate", f"{c.data.truncate!r} must be 'error' or 'left'")
  _validate_data_source(c, fail)
  if c.model.family not in FAMILIES:
    fail("model.family", f"{c.model.family!r} is not one of {FAMILIES}")
  if c.lora.rank < 0:
    fail("lora.rank", "must be >= 0 (0 = full fine-tuning)")
  if c.lora.rank > 0:
    try:
      lora_lib.LoraConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                          targets=tuple(c.lora.targets))
    except ValueError as e:
      fail("lora", str(e))
  for key in ("data.prompts", "data.train", "data.eval", "policy.init", "reward.init",
              "value.init"):
    path = _get(c, key, "")
    if path and not os.path.exists(path):
      fail(key, f"path {path!r} does not exist")
  if c.task in ("sft", "reward") and not c.data.tfds and bool(c.data.train) != bool(c.data.eval):
    missing = "data.eval" if c.data.train else "data.train"
    fail(missing, "give both data.train and data.eval (or neither, for the built-in synthetic "
         "task)")
  if c.task == "reward":
    if c.reward_model.loss not in ("auto", "pairwise", "pointwise"):
      fail("reward_model.loss", f"{c.reward_model.loss!r} is not 'auto', 'pairwise' or "
           "'pointwise'")
    if (c.data.train or c.data.tfds) and not (c.policy.init or c.reward.init):
      fail("policy.init", "a reward model on your own data needs a checkpoint to start from "
           "(policy.init or reward.init); only the built-in synthetic task trains its own "
           "policy first")
    if c.reward_model.normalize and c.reward.init and not c.policy.init:
      fail("reward_model.normalize", "needs config.policy.init: the reference policy whose "
           "samples set the gain and bias")
  if c.task == "ppo":
    p, r = c.ppo, c.rollout
    if p.estimator not in ("gae", "reinforce", "rloo", "grpo"):
      fail("ppo.estimator", f"{p.estimator!r} is not one of gae, reinforce, rloo, grpo")
    if p.kl_estimator not in ("k1", "k2", "k3"):
      fail("ppo.kl_estimator", f"{p.kl_estimator!r} is not one of k1, k2, k3")
    if r.logprobs not in ("auto", "recompute"):
      fail("rollout.logprobs", f"{r.logprobs!r} must be 'auto' or 'recompute'")
    if p.estimator in ("rloo", "grpo") and r.num_samples < 2:
      fail("rollout.num_samples", f"{p.estimator} needs >= 2 responses per prompt")
    responses = p.batch_size * r.num_samples
    if responses % p.num_minibatches:
      fail("ppo.num_minibatches", f"{responses} responses per iteration (ppo.batch_size x "
           f"rollout.num_samples) do not split into {p.num_minibatches} minibatches")
    if (responses // p.num_minibatches) % p.grad_accum:
      fail("ppo.grad_accum", f"a minibatch of {responses // p.num_minibatches} does not split "
           f"into {p.grad_accum} microbatches")
    if r.temperature <= 0:
      fail("rollout.temperature", "PPO samples stochastically: temperature must be > 0")
    if not 0 < r.top_p <= 1:
      fail("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    if r.max_new_tokens < 1:
      fail("rollout.max_new_tokens", "must be >= 1")
    if p.dual_clip and p.dual_clip <= 1:
      fail("ppo.dual_clip", f"must be > 1 (or 0 to disable), got {p.dual_clip}")
    if p.ptx_coef and not c.data.train:
      fail("data.train", "ppo.ptx_coef > 0 needs SFT data ({\"prompt\", \"response\"} JSONL) "
           "for its language-model loss")
    for key in ("epochs", "batch_size", "num_minibatches", "grad_accum"):
      if p[key] < 1:
        fail(f"ppo.{key}", "must be >= 1")
  devices = _device_count() if num_devices is None else num_devices
  check_mesh(c, devices)
  if c.task == "ppo":
    from perl_jax.trainers import phases  # imports jax; only PPO has phases

    phases.check_config(c, devices)


# --- The mesh: sizes, rules, and batches that split over it -----------------------------------


def _device_count() -> int:
  import jax  # only here: the rest of this module never needs a backend

  return jax.device_count()


def mesh_sizes(c: mlc.ConfigDict, num_devices: int) -> dict[str, int]:
  """{'data', 'fsdp', 'tensor'} sizes of `config.mesh` on `num_devices` devices (-1 resolved)."""
  sizes = {axis: c.mesh[axis] for axis in ("data", "fsdp", "tensor")}
  for axis, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh.{axis}: {size!r} must be an integer >= 1, or -1 (the "
                        "devices the other axes leave)")
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ConfigError(f"config.mesh.{free[1]}: only one of mesh.data, mesh.fsdp, mesh.tensor "
                      f"may be -1 (mesh.{free[0]} is -1 too)")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  where = f"{num_devices} device{'s' if num_devices != 1 else ''}"
  if free:
    if num_devices % fixed:
      raise ConfigError(f"config.mesh.{free[0]}=-1: the other mesh sizes multiply to {fixed}, "
                        f"which does not divide the {where}")
    sizes[free[0]] = num_devices // fixed
  elif num_devices % fixed:
    raise ConfigError(f"config.mesh: data x fsdp x tensor = {sizes['data']} x {sizes['fsdp']} "
                      f"x {sizes['tensor']} = {fixed} does not divide the {where}")
  return sizes


def mesh_rules(c: mlc.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """`sharding.LOGICAL_RULES` with the entries `config.mesh.rules` overrides, in table order."""
  from perl_jax import sharding

  table = dict(sharding.LOGICAL_RULES)
  text = c.mesh.rules
  if not isinstance(text, str):
    raise ConfigError(f"config.mesh.rules: {text!r} must be a string like "
                      "'kv_heads=none,embed=fsdp+data'")
  for entry in filter(None, (e.strip() for e in text.split(","))):
    name, sep, axes = (x.strip() for x in entry.partition("="))
    if not sep or not name:
      raise ConfigError(f"config.mesh.rules: entry {entry!r} is not 'logical=axes' (axes: mesh "
                        "axes joined by '+', or 'none')")
    if name not in table:
      raise ConfigError(f"config.mesh.rules: unknown logical axis {name!r}; known: "
                        f"{', '.join(table)}")
    parts = [] if axes.lower() in ("", "none") else [a.strip() for a in axes.split("+")]
    unknown = [a for a in parts if a not in sharding.MESH_AXES]
    if unknown or len(set(parts)) != len(parts):
      raise ConfigError(f"config.mesh.rules: {entry!r}: mesh axes must be distinct names from "
                        f"{sharding.MESH_AXES} (or 'none'), got {axes!r}")
    table[name] = None if not parts else parts[0] if len(parts) == 1 else tuple(parts)
  return tuple(table.items())


def check_mesh(c: mlc.ConfigDict, num_devices: int) -> tuple[dict[str, int], tuple]:
  """(mesh sizes, rules) of `config.mesh`; raises `ConfigError` naming the key for a mesh that
  does not fit `num_devices` or a batch that does not split over data x fsdp."""
  sizes = mesh_sizes(c, num_devices)
  rules = mesh_rules(c)
  shards = sizes["data"] * sizes["fsdp"]
  over = f"over mesh data x fsdp = {sizes['data']} x {sizes['fsdp']} = {shards} batch shards"
  if c.task in ("sft", "reward") and c.data.batch_size % shards:
    raise ConfigError(f"config.data.batch_size: {c.data.batch_size} examples do not split {over}")
  if c.task == "ppo":
    p = c.ppo
    if p.batch_size % shards:
      raise ConfigError(f"config.ppo.batch_size: {p.batch_size} prompts do not split {over}")
    micro = p.batch_size * c.rollout.num_samples // (p.num_minibatches * p.grad_accum)
    if micro % shards:
      raise ConfigError(
          f"config.ppo.num_minibatches: a microbatch of {micro} responses (ppo.batch_size x "
          f"rollout.num_samples / (ppo.num_minibatches x ppo.grad_accum)) does not split {over}")
  return sizes, rules


def _validate_data_source(c: mlc.ConfigDict, fail) -> None:
  """data.tfds against the JSONL keys it replaces, and the prompt format keys."""
  from perl_jax.data import formatting, published

  d = c.data
  if d.prompt_format not in formatting.FORMATS:
    fail("data.prompt_format", f"{d.prompt_format!r} is not one of {formatting.FORMATS}")
  try:
    formatting.check_template(d.prompt_template)
  except ValueError as e:
    fail("data.prompt_template", str(e))
  if not d.tfds:
    for key in ("tfds_dir", "tfds_eval_split"):
      if d[key]:
        fail(f"data.{key}", "is set but data.tfds (the dataset to read) is not")
    return
  if d.tfds not in published.DATASETS:
    fail("data.tfds", f"unknown dataset {d.tfds!r}; known: {', '.join(published.DATASETS)}")
  if d.tfds_dir and not os.path.isdir(d.tfds_dir):
    fail("data.tfds_dir", f"directory {d.tfds_dir!r} does not exist")
  kind = published.DATASETS[d.tfds][0]
  replaced = ("prompts",) if c.task == "ppo" else ("train", "eval")
  for key in replaced:
    if d[key]:
      fail(f"data.{key}", f"data.tfds={d.tfds!r} already gives the {c.task} data; set one or "
           "the other")
  if c.task == "sft" and kind == "pointwise":
    fail("data.tfds", f"{d.tfds!r} holds pointwise ratings, not demonstrations for SFT")
  if c.task == "reward" and c.reward_model.loss not in ("auto", kind):
    fail("reward_model.loss", f"{c.reward_model.loss!r}, but data.tfds={d.tfds!r} holds "
         f"{kind} records (use 'auto')")
  if c.task == "ppo" and not (c.policy.init and c.reward.init):
    fail("policy.init" if not c.policy.init else "reward.init",
         f"PPO on data.tfds={d.tfds!r} needs your policy.init and reward.init; only the "
         "built-in synthetic task trains its own")


def _keys(c: mlc.ConfigDict, prefix: str = "") -> list[str]:
  """Every leaf key of `c`, dotted ("data.train", ...)."""
  out = []
  for key, value in c.items():
    if isinstance(value, mlc.ConfigDict):
      out += _keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def _get(c: mlc.ConfigDict, dotted: str, default=None):
  node = c
  for part in dotted.split("."):
    if part not in node:
      return default
    node = node[part]
  return node


# --- Task configs: configs/*.py start from these. ---------------------------------------------


def sft_config() -> mlc.ConfigDict:
  """Supervised fine-tuning: next-token loss on response tokens only."""
  c = base("sft")
  c.policy, _, _ = checkpoint_refs()  # policy.init "" -> a random `model`-shaped network
  c.total_iterations = 300
  c.lora.rank = 0  # a model trained from scratch has nothing to adapt; set > 0 for LoRA SFT
  c.optimizer.lr = 3e-3
  return c


def reward_config() -> mlc.ConfigDict:
  """Reward model: LoRA (or full) fine-tuning of a scalar head on preferences."""
  c = base("reward")
  c.policy, c.reward, _ = checkpoint_refs()  # reward.init "" -> start from policy.init + new head
  c.total_iterations = 300
  c.optimizer.lr = 3e-3
  c.reward_model = mlc.ConfigDict()
  c.reward_model.loss = "auto"  # "pairwise" (Bradley-Terry) | "pointwise" | "auto" (from the data)
  c.reward_model.margin = 0.0  # required score gap in the Bradley-Terry loss
  c.reward_model.center_coef = 0.01  # reward centering: coef * mean((chosen + rejected)^2)
  c.reward_model.normalize = True  # after training: gain/bias so reference samples ~ N(0, 1)
  return c


def ppo_config() -> mlc.ConfigDict:
  """PPO with LoRA on policy and value (PERL) against a learned reward."""
  c = base("ppo")
  c.policy, c.reward, c.value = checkpoint_refs()
  c.total_iterations = 60
  c.log_every = 1
  c.eval_every = 10
  c.optimizer.lr = 2e-3
  c.rollout = rollout()
  c.ppo = ppo()
  # A layout per phase (perl_jax/trainers/phases.py): "manual" reads phase_mesh (empty entries:
  # config.mesh, i.e. one layout for all); "auto" measures candidate meshes at start.
  c.layouts = "manual"
  c.phase_mesh = phase_mesh()
  # The built-in task's prerequisites (used only when policy.init / reward.init are ""):
  c.synthetic = mlc.ConfigDict()
  c.synthetic.sft_steps = 300
  c.synthetic.reward_steps = 300
  return c
