"""Wall time and peak memory of one PPO iteration after compilation; prints tables, asserts nothing.

Usage::

  python -m perl_jax.benchmarks.ppo_iteration                  # CPU target: 16 x (32 + 32)
  python -m perl_jax.benchmarks.ppo_iteration --no-scaling --iters=20
  python -m perl_jax.benchmarks.ppo_iteration --log_compiles   # print any recompile (see below)
  python -m perl_jax.benchmarks.ppo_iteration --preset=gpu_0p5b   # ~0.5B, bfloat16, GPU only

Setup
-----
The default model is 'small' of `model_core`: a 4-layer, 256-wide Llama (8 heads, 4 KV heads,
head_dim 32, MLP 1024, vocab 2048), written with random weights as a Hugging Face checkpoint
in a temp directory together with a word-level tokenizer of exactly ``vocab`` entries
(``<pad> <bos> <eos> <unk>`` then ``w4 ... w{vocab-1}``). The reward model is that checkpoint
plus a fresh scalar head and fresh (untrained) LoRA adapters, saved with `common.save_model`;
the value model is initialised from it, as `config.ppo_config()` does by default. Policy and
value train LoRA r=8 on every attention and MLP projection (`perl_jax.lora.ALL_TARGETS`);
1 epoch of 2 minibatches; GAE; the other keys are `ppo_config()` defaults. Prompts are
``prompt_len - 1`` random words + ``<bos>``, i.e. exactly ``prompt_len`` tokens with no
padding, and the sampler runs with ``stop_at_eos=False`` so every response has exactly
``new_tokens`` tokens.

What is measured
----------------
The body of `ppo.train`'s loop, built the way `train` builds it (`ppo.load_models` with one
`BaseCache`, `make_score_fn`, ``jit(advantages)``, `make_update_fn`), called phase by phase:

* generate: `ppo.rollout` (the compiled KV-cache sampler, prefill + ``new_tokens`` steps);
* score:    the jitted `score_fn` (policy, reference, reward and value forward passes);
* train:    jitted `advantages` + `update_fn` (1 epoch x 2 minibatches of policy + value
            gradient steps) + the KL-controller update, as `train`'s ``perf/train_s``.

Each phase ends in ``block_until_ready``, so the split is exact (`train` measures the same way).
``--warmup`` iterations compile everything; the median of ``--iters`` timed iterations is
reported. Evaluation, metric writing and checkpointing are not part of an iteration.
"cpu s" is the process CPU time of an iteration (all threads): on a machine shared with other
jobs, wall time well above ``cpu s / cores`` means the cores were busy elsewhere, so compare
runs by both (and by the printed load average). "sys s" is the part of it spent in the
kernel and "faults" the minor page faults of an iteration: XLA maps its larger buffers afresh
on every call, so these show whether they are faulted in on huge pages (the benchmark, like
`perl_jax.train`, restarts itself with glibc's ``glibc.malloc.hugetlb=1``: `perl_jax.host`;
``PERL_JAX_HUGE_PAGES=0`` measures without).
"compiles" counts XLA backend compilations during the timed iterations (a
`jax.monitoring` listener): it must be 0, else something recompiles every iteration.
``--log_compiles`` additionally turns on ``jax_log_compiles`` for the timed part only, so each
recompile is logged with its function name.

GFLOP are XLA's own cost analysis of the compiled programs. XLA counts a loop body once, so
the update's figure is multiplied by minibatches x microbatches x epochs, and the sampler's is
estimated as one forward over the P - 1 prefilled tokens + ``new_tokens`` one-token forwards.
"GFLOP/s" is their sum over the median iteration time; the per-phase rates show which phase
runs far from the machine's matmul rate.

Memory: resident set size (psutil, when installed) after each setup step and after the
first, compiling, call of each phase; the peak is the process's own high-water mark (VmHWM,
see `_peak_rss_mb`). "trimmed" is the RSS after glibc's ``malloc_trim(0)`` at the end, i.e.
without heap that was freed but not returned (mostly left over from XLA compilation). "score
tmp" / "update tmp" are the XLA temp buffers of those compiled programs (activations kept for
the backward pass etc.), and "device peak" the accelerator's peak bytes in use where the
backend reports it. By default every configuration runs in a fresh subprocess
(``--isolate``), so each peak belongs to one configuration alone; checkpoints are written
once by the parent.

Scaling: besides the base configuration, the prompts per iteration (``--batch``) and the
response length (``--new_tokens``) are doubled, separately and together; the table reports
each time relative to the base.
"""

from __future__ import annotations

if __name__ == "__main__":  # as perl_jax.train does; the per-configuration children inherit it
  from perl_jax import host as _host

  _host.restart_with_huge_pages("perl_jax.benchmarks.ppo_iteration")

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from perl_jax.benchmarks import print_table

# Defaults per mode: (prompts per iteration, prompt length, new tokens).
_CPU_DEFAULTS = dict(batch=16, prompt_len=32, new_tokens=32)
_GPU_DEFAULTS = dict(batch=32, prompt_len=64, new_tokens=128)  # untested: no GPU here
_TARGET_ITER_S = 0.4  # CPU target, for the 16 x (32 + 32) base configuration
_TARGET_RSS_MB = 600.0
_RESULT_TAG = "PPO_ITERATION_RESULT "


# --- Setup ----------------------------------------------------------------------------------


def model_config(preset: str | None):
  """The policy's ModelConfig: 'small' of model_core, or the Qwen2-0.5B-shaped preset."""
  from perl_jax.benchmarks import model_core

  if preset == "gpu_0p5b":
    cfg = model_core.gpu_0p5b_config()
  else:
    cfg = model_core.small_config()
  # Special ids of the word-level tokenizer built here (<pad>=0 <bos>=1 <eos>=2); the preset's
  # own pad == eos (151643) is rejected by the prompt encoder. Params are written in float32;
  # `BaseCache(dtype)` casts on load.
  return cfg.replace(pad_token_id=0, bos_token_id=1, eos_token_id=2, dtype="float32",
                     param_dtype="float32")


def build_word_tokenizer(vocab_size: int, out_dir: str):
  """A word-level fast tokenizer with exactly `vocab_size` entries, saved to `out_dir`."""
  from perl_jax.data import synthetic

  words = [f"w{i}" for i in range(len(synthetic.SPECIAL_TOKENS), vocab_size)]
  return synthetic.word_level_tokenizer(synthetic.SPECIAL_TOKENS + tuple(words), out_dir)


def lora_block(c) -> None:
  from perl_jax import lora as lora_lib

  c.lora.rank = 8
  c.lora.targets = lora_lib.ALL_TARGETS


def build_checkpoints(root: str, preset: str | None, dtype: str) -> tuple[str, str]:
  """(policy HF dir with tokenizer, reward perl_jax dir) with random weights under `root`."""
  import jax

  from perl_jax import config
  from perl_jax.models import Transformer, init_params, save_hf_checkpoint
  from perl_jax.trainers import common

  policy_dir, reward_dir = f"{root}/policy", f"{root}/reward"
  cfg = model_config(preset)
  build_word_tokenizer(cfg.vocab_size, policy_dir)
  save_hf_checkpoint(cfg, init_params(Transformer(cfg), jax.random.PRNGKey(0)), policy_dir)
  c = config.ppo_config()
  lora_block(c)
  # The reward model: the policy checkpoint + a fresh scalar head + untrained adapters.
  cache = common.BaseCache(dtype)
  reward = common.load_model(policy_dir, head="scalar", lora=common.lora_from_config(c.lora),
                             cache=cache, rng=jax.random.PRNGKey(1))
  common.save_model(reward_dir, reward)
  return policy_dir, reward_dir


# --- Measurement ----------------------------------------------------------------------------


def _peak_rss_mb() -> float:
  """This process's peak RSS: the kernel's high-water mark of its own memory map (VmHWM).

  Not ``ru_maxrss``: Linux carries that across fork and exec, so a child started by a parent
  of 700 MB (this script's, after torch wrote the checkpoints) reported >= 700 MB whatever
  it used itself. ``ru_maxrss`` is the fallback where /proc is missing.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> dict[str, float]:
  out = {"maxrss_mb": _peak_rss_mb()}
  try:
    import psutil

    out["rss_mb"] = psutil.Process().memory_info().rss / 2 ** 20
  except ImportError:
    pass
  return out


def _device_peak_mb() -> float | None:
  import jax

  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # backends without memory stats
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2 ** 20


def _trimmed_rss_mb() -> float | None:
  """Current RSS after glibc's malloc_trim(0): what remains once freed heap is returned."""
  from perl_jax import host

  try:
    import psutil
  except ImportError:
    return None
  return psutil.Process().memory_info().rss / 2 ** 20 if host.trim() else None


def _temp_mb(compiled) -> float | None:
  try:
    return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  except Exception:
    return None


def _gflop(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"]) / 1e9


def measure(policy_dir: str, reward_dir: str, *, batch: int, prompt_len: int, new_tokens: int,
            dtype: str, warmup: int, iters: int, seed: int, log_compiles: bool,
            flops: bool, trim: bool = True, profile: str | None = None,
            grad_accum: int = 0) -> dict[str, Any]:
  """Builds the PPO pieces as `ppo.train` does and times `iters` iterations after `warmup`."""
  mem_start = _rss_mb()
  import functools

  import jax
  import jax.numpy as jnp

  from perl_jax import config, rl
  from perl_jax import lora as lora_lib
  from perl_jax.sampling import SamplingConfig
  from perl_jax.tokenizers import check_vocab, encode_prompts, eos_ids, load_tokenizer
  from perl_jax.trainers import common, ppo

  if trim:
    from perl_jax import host

    host.trim_after_compiles()  # as perl_jax.train does
    host.fix_mmap_threshold()  # as ppo.train does
  mem_import = _rss_mb()
  c = config.ppo_config()
  lora_block(c)
  c.dtype = dtype
  c.seed = seed
  c.policy.init, c.reward.init = policy_dir, reward_dir
  c.ppo.batch_size, c.ppo.num_minibatches, c.ppo.epochs = batch, 2, 1
  if grad_accum:
    c.ppo.grad_accum = grad_accum
  c.rollout.max_new_tokens, c.rollout.stop_at_eos = new_tokens, False
  c.data.max_prompt_len = prompt_len
  config.validate(c)

  # --- As ppo.train: models, tokenizer, prompts, optimizers, compiled phases ----------------
  rng = jax.random.PRNGKey(c.seed)
  rng, model_rng = jax.random.split(rng)
  np_rng = np.random.default_rng(c.seed)
  cache = common.BaseCache(c.dtype)
  models = ppo.load_models(c, cache, model_rng)
  policy, value = models.policy, models.value
  mem_models = _rss_mb()
  tokenizer = load_tokenizer(policy.tokenizer_dir or c.policy.init)
  check_vocab(tokenizer, policy.cfg)
  mem_tokenizer = _rss_mb()
  eos, pad = eos_ids(tokenizer, policy.cfg), int(tokenizer.pad_token_id)
  words = np.asarray([f"w{i}" for i in range(4, len(tokenizer))])
  texts = [" ".join(np_rng.choice(words, prompt_len - 1)) for _ in range(max(4 * batch, 64))]
  prompt_tokens, prompt_mask = encode_prompts(tokenizer, texts, c.data.max_prompt_len)
  if not prompt_mask.all():
    raise RuntimeError("prompts came out padded; expected exactly prompt_len tokens each")
  scfg = SamplingConfig(max_new_tokens=c.rollout.max_new_tokens,
                        temperature=c.rollout.temperature, top_k=c.rollout.top_k,
                        top_p=c.rollout.top_p, num_samples=c.rollout.num_samples,
                        stop_at_eos=c.rollout.stop_at_eos)
  policy_opt = common.make_optimizer(c.optimizer)
  value_opt = common.make_optimizer(c.optimizer, lr=c.ppo.value_lr or None)
  pol_state = ppo.TrainState(policy.trainable, policy_opt.init(policy.trainable))
  val_state = ppo.TrainState(value.trainable, value_opt.init(value.trainable))
  frozen = {"policy": policy.frozen, "value": value.frozen}
  ref_vars = {"params": models.reference_params}
  reward_vars = models.reward.variables()
  reward_affine = jnp.asarray([models.reward.reward_gain, models.reward.reward_bias],
                              jnp.float32)
  kl_ctl = (rl.AdaptiveKL(c.ppo.kl_coef, c.ppo.kl_target, c.ppo.kl_horizon)
            if c.ppo.adaptive_kl else rl.FixedKL(c.ppo.kl_coef))
  kl_state = kl_ctl.init_state()
  reward_stats = rl.RunningMeanStd.create()
  score_fn = ppo.make_score_fn(policy.module, models.reward.module, value.module,
                               c.rollout.temperature, c.ppo.missing_eos_penalty,
                               ppo.recompute_logprobs(c.rollout))
  advantages_fn = jax.jit(functools.partial(ppo.advantages, c))
  update_fn = ppo.make_update_fn(c, policy.module, value.module, policy_opt, value_opt)
  first: dict[str, dict] = {}  # RSS after each phase of the first (compiling) iteration

  def policy_vars(state):
    return common.variables(policy.frozen, state.trainable)

  def value_vars():
    return common.variables(value.frozen, val_state.trainable)

  def iteration(it: int) -> tuple[float, ...]:
    """One loop body of ppo.train: (generate, score, advantages, update, process CPU, kernel
    CPU) seconds and the page faults it took."""
    nonlocal rng, pol_state, val_state, kl_state, reward_stats
    cpu0 = time.process_time()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    rng, k_roll, k_update = jax.random.split(rng, 3)
    rows = np_rng.choice(len(prompt_tokens), c.ppo.batch_size, replace=False)
    tokens, mask, resp_mask, ended, sampler_logp = ppo.rollout(
        policy.module, policy_vars(pol_state), prompt_tokens[rows], prompt_mask[rows], k_roll,
        scfg, eos, pad)
    jax.block_until_ready(tokens)
    t1 = time.perf_counter()
    if it == 0:
      first["generate"] = _rss_mb()
    logp, ref_logp, values, scores = score_fn(policy_vars(pol_state), ref_vars, reward_vars,
                                              reward_affine, value_vars(), tokens, mask,
                                              resp_mask, ended, sampler_logp)
    jax.block_until_ready((logp, ref_logp, values, scores))
    t2 = time.perf_counter()
    if it == 0:
      first["score"] = _rss_mb()
    batch_ = ppo.Rollout(tokens, mask, resp_mask, ended, logp, ref_logp, values, scores)
    adv, returns, reward_stats, metrics = advantages_fn(batch_, kl_state, reward_stats)
    jax.block_until_ready((adv, returns))
    t3 = time.perf_counter()
    data = ppo.rollout_arrays(batch_, adv, returns)
    for epoch in range(c.ppo.epochs):
      pol_state, val_state, update_metrics = update_fn(
          pol_state, val_state, frozen, data, jax.random.fold_in(k_update, epoch),
          train_policy=it >= c.ppo.critic_warmup_iters)
    kl_state = kl_ctl.update(kl_state, metrics["objective/kl"], tokens.shape[0])
    jax.block_until_ready((update_metrics, pol_state, val_state, kl_state))
    t4 = time.perf_counter()
    if it == 0:
      first["update"] = _rss_mb()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.process_time() - cpu0,
            usage.ru_stime - usage0.ru_stime, usage.ru_minflt - usage0.ru_minflt)

  t_compile = time.perf_counter()
  for it in range(warmup):
    iteration(it)
  t_compile = time.perf_counter() - t_compile
  mem_warm = _rss_mb()

  compiles: list[str] = []
  listener = lambda event, secs, **kw: compiles.append(event) if (
      event == "/jax/core/compile/backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  if log_compiles:
    jax.config.update("jax_log_compiles", True)
  times = [iteration(warmup + i) for i in range(iters)]
  if log_compiles:
    jax.config.update("jax_log_compiles", False)
  jax.monitoring.unregister_event_duration_listener(listener)
  mem_end = _rss_mb()
  trimmed = _trimmed_rss_mb()
  if profile:  # after the timed part, so tracing overhead never enters the figures
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      for i in range(2):
        iteration(warmup + iters + i)

  # Python-side cost of assembling the variables dicts (3 merges per iteration in ppo.train).
  t = time.perf_counter()
  for _ in range(20):
    policy_vars(pol_state), policy_vars(pol_state), value_vars()
  merge_ms = (time.perf_counter() - t) / 20 * 1e3

  gflop, temp_mb = {}, {}
  if flops:  # lowering again compiles again; done after the timed part
    tokens = jnp.zeros((batch, prompt_len + new_tokens), jnp.int32)
    mask = jnp.ones_like(tokens, bool)
    resp = jnp.ones((batch, new_tokens), bool)
    ended = jnp.zeros((batch,), bool)
    compiled = score_fn.lower(policy_vars(pol_state), ref_vars, reward_vars, reward_affine,
                              value_vars(), tokens, mask, resp, ended,
                              jnp.zeros((batch, new_tokens), jnp.float32)).compile()
    gflop["score"], temp_mb["score"] = _gflop(compiled), _temp_mb(compiled)
    zeros = jnp.zeros((batch, new_tokens), jnp.float32)
    data = dict(tokens=tokens, mask=mask, response_mask=resp, logp=zeros, values=zeros,
                adv=zeros, returns=zeros)
    # The update is two programs (policy, value); XLA counts a loop body once, and each scans
    # minibatches x microbatches, per epoch. Their temp buffers are never live together.
    progs = update_fn.programs
    pick = lambda *keys: {k: data[k] for k in ("tokens", "mask", "response_mask") + keys}
    compiled = [progs["policy"].lower(pol_state, frozen["policy"], pick("logp", "adv"),
                                      jax.random.PRNGKey(0)).compile(),
                progs["value"].lower(val_state, frozen["value"], pick("values", "returns"),
                                     jax.random.PRNGKey(0)).compile()]
    per_call = [_gflop(x) for x in compiled]
    steps = c.ppo.num_minibatches * c.ppo.grad_accum * c.ppo.epochs
    gflop["update"] = None if None in per_call else sum(per_call) * steps
    temps = [_temp_mb(x) for x in compiled]
    temp_mb["update"] = None if None in temps else max(temps)
    # Sampler: prefill of P - 1 tokens + new_tokens one-token steps, from two compiled forwards.
    variables = lora_lib.inference_variables(policy_vars(pol_state), policy.module.lora)
    fwd = lambda v, t: policy.module.apply(v, t, outputs_from=t.shape[1] - 1)
    f_prompt = _gflop(jax.jit(fwd).lower(variables, tokens[:, :prompt_len - 1]).compile())
    f_step = _gflop(jax.jit(fwd).lower(variables, tokens[:, :1]).compile())
    if f_prompt is not None and f_step is not None:
      gflop["generate"] = f_prompt + new_tokens * f_step

  split = np.asarray(times)
  med = lambda col: float(statistics.median(split[:, col]))
  total = [float(x) for x in split[:, :4].sum(axis=1)]
  return dict(
      batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, dtype=dtype, iters=iters,
      warmup_s=t_compile, iter_s=statistics.median(total), iter_min_s=min(total),
      iter_max_s=max(total), generate_s=med(0), score_s=med(1), adv_s=med(2), update_s=med(3),
      train_s=float(statistics.median(split[:, 2] + split[:, 3])), cpu_s=med(4),
      sys_s=med(5), faults=med(6),
      cpu_count=os.cpu_count(), compiles=len(compiles),
      merge_ms=merge_ms, gflop=gflop, temp_mb=temp_mb, device_peak_mb=_device_peak_mb(),
      mem=dict(start=mem_start, imported=mem_import, models=mem_models,
               tokenizer=mem_tokenizer, **{f"first_{k}": v for k, v in first.items()},
               warm=mem_warm, end=mem_end), trimmed_rss_mb=trimmed,
      torch_imported="torch" in sys.modules,
      trainable=common.count(pol_state.trainable), frozen=common.count(policy.frozen),
      device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
      jax=jax.__version__, loadavg=os.getloadavg(),
      tunables=os.environ.get("GLIBC_TUNABLES", "none"))


# --- Reporting ------------------------------------------------------------------------------



def _name(r: dict) -> str:
  return f"B={r['batch']} P={r['prompt_len']} N={r['new_tokens']}"


def report(results: list[dict], args: argparse.Namespace) -> None:
  base = results[0]
  print(f"\ndevice: {base['device']}; jax {base['jax']}; dtype {base['dtype']}; "
        f"policy trainable {base['trainable']:,} of {base['trainable'] + base['frozen']:,} "
        f"params; median of {base['iters']} iterations after {args.warmup} warm-up; glibc "
        f"tunables {base['tunables']} (perl_jax.host.restart_with_huge_pages)")
  rows = []
  for r in results:
    rows.append([_name(r), f"{r['iter_s']:.3f}", f"{r['iter_min_s']:.3f}-{r['iter_max_s']:.3f}",
                 f"{r['cpu_s']:.2f}", f"{r['sys_s']:.2f}", f"{r['faults']:,.0f}",
                 f"{r['generate_s']:.3f}", f"{r['score_s']:.3f}", f"{r['adv_s']:.4f}",
                 f"{r['update_s']:.3f}", f"{r['batch'] * r['new_tokens'] / r['iter_s']:,.0f}",
                 r["compiles"], f"{r['warmup_s']:.1f}",
                 " ".join(f"{x:.2f}" for x in r["loadavg"])])
  print_table("Seconds per PPO iteration (median; train = advantages + update; cpu s = "
               f"process CPU time per iteration, all threads, on {base['cpu_count']} cores: "
               "iter s well above cpu s / cores means other processes took the cores; sys s = "
               "the part of it in the kernel, faults = minor page faults, mostly first touches "
               "of freshly mapped buffers)",
               ["config", "iter s", "min-max", "cpu s", "sys s", "faults", "generate", "score",
                "advantages", "update", "resp tok/s", "compiles", "warm-up s", "load avg"], rows)

  rows = []
  for r in results:
    g = r["gflop"]
    if not g:
      continue
    parts = [g.get(k) for k in ("generate", "score", "update")]
    known = sum(x for x in parts if x)
    rows.append([_name(r)] + [f"{x:.1f}" if x else "?" for x in parts] + [
        f"{known:.1f}", f"{known / r['iter_s']:.1f}",
        f"{(g.get('generate') or 0) / r['generate_s']:.1f}",
        f"{(g.get('score') or 0) / r['score_s']:.1f}",
        f"{(g.get('update') or 0) / r['update_s']:.1f}"])
  if rows:
    print_table("Work per iteration (XLA cost analysis) and achieved rate",
                 ["config", "gen GFLOP", "score GFLOP", "update GFLOP", "total GFLOP",
                  "GFLOP/s", "gen GFLOP/s", "score GFLOP/s", "update GFLOP/s"], rows)

  rows = []
  for r in results:
    m = r["mem"]
    cur = lambda k: f"{m[k]['rss_mb']:.0f}" if k in m and "rss_mb" in m[k] else "-"
    opt = lambda x: "-" if x is None else f"{x:.0f}"
    rows.append([_name(r), cur("imported"), cur("models"), cur("tokenizer"),
                 cur("first_generate"), cur("first_score"), cur("first_update"), cur("end"),
                 opt(r["trimmed_rss_mb"]), f"{m['end']['maxrss_mb']:.0f}",
                 opt(r["temp_mb"].get("score")), opt(r["temp_mb"].get("update")),
                 opt(r["device_peak_mb"])])
  print_table("Memory, MB: RSS after importing jax + perl_jax / loading the 4 models / loading "
               "the tokenizer / the first (compiling) generate, score, update / the timed "
               "iterations / malloc_trim(0); peak RSS = VmHWM; XLA temp buffers of the "
               "compiled score and update programs" + ("" if args.isolate else
                                                      " (one process: peaks accumulate)"),
               ["config", "imported", "models", "tokenizer", "1st gen", "1st score",
                "1st update", "end", "trimmed", "peak RSS", "score tmp", "update tmp",
                "device peak"], rows)
  if any(r["torch_imported"] for r in results):
    print("note: torch was imported (transformers.AutoTokenizer in perl_jax.tokenizers."
          "load_tokenizer pulls it in); it is part of the 'tokenizer' step above")

  rows = [[_name(r), f"{r['merge_ms']:.2f}"] for r in results]
  print_table("Host overhead: common.variables() merges per iteration (3 calls), ms",
               ["config", "ms"], rows)

  if len(results) > 1:
    rows = []
    for r in results:
      rows.append([_name(r), f"x{r['batch'] / base['batch']:g}",
                   f"x{r['new_tokens'] / base['new_tokens']:g}",
                   f"{r['iter_s']:.3f}", f"x{r['iter_s'] / base['iter_s']:.2f}",
                   f"x{r['generate_s'] / base['generate_s']:.2f}",
                   f"x{r['score_s'] / base['score_s']:.2f}",
                   f"x{r['train_s'] / base['train_s']:.2f}",
                   f"{r['iter_s'] / (r['batch'] * r['new_tokens']) * 1e3:.3f}"])
    print_table("Scaling relative to the base configuration",
                 ["config", "prompts", "new tokens", "iter s", "iter", "generate", "score",
                  "train", "ms / resp token"], rows)

  if not args.preset and (base["batch"], base["prompt_len"], base["new_tokens"]) == (16, 32, 32):
    peak = base["mem"]["end"]["maxrss_mb"]
    met = lambda ok: "met" if ok else "MISSED"
    print(f"\ntarget (16 prompts x 32 + 32 tokens): {base['iter_s']:.3f} s per iteration "
          f"(target <= {_TARGET_ITER_S} s: {met(base['iter_s'] <= _TARGET_ITER_S)}), peak RSS "
          f"{peak:.0f} MB (target <= {_TARGET_RSS_MB:.0f} MB: {met(peak <= _TARGET_RSS_MB)})")


# --- Entry point ----------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
  result = measure(args.policy_dir, args.reward_dir, batch=args.batch,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype,
                   warmup=args.warmup, iters=args.iters, seed=args.seed,
                   log_compiles=args.log_compiles, flops=args.flops, trim=args.trim,
                   profile=args.profile, grad_accum=args.grad_accum)
  print(_RESULT_TAG + json.dumps(result), flush=True)


def _run_isolated(args: argparse.Namespace, policy_dir: str, reward_dir: str, batch: int,
                  new_tokens: int) -> dict:
  cmd = [sys.executable, "-m", "perl_jax.benchmarks.ppo_iteration", "--_child",
         f"--policy_dir={policy_dir}", f"--reward_dir={reward_dir}", f"--batch={batch}",
         f"--prompt_len={args.prompt_len}", f"--new_tokens={new_tokens}",
         f"--dtype={args.dtype}", f"--warmup={args.warmup}", f"--iters={args.iters}",
         f"--seed={args.seed}", "--flops" if args.flops else "--no-flops",
         "--trim" if args.trim else "--no-trim", f"--grad_accum={args.grad_accum}"]
  if args.log_compiles:
    cmd.append("--log_compiles")
  if args.profile:
    cmd.append(f"--profile={args.profile}")
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith(_RESULT_TAG):
      result = json.loads(line[len(_RESULT_TAG):])
    else:
      print(line)
  if proc.returncode or result is None:
    raise RuntimeError(f"configuration B={batch} N={new_tokens} failed (exit {proc.returncode})")
  return result


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default=None, choices=["gpu_0p5b"],
                      help="Qwen2-0.5B-shaped Llama in bfloat16 (needs an accelerator)")
  parser.add_argument("--batch", type=int, default=None, help="prompts per iteration")
  parser.add_argument("--prompt_len", type=int, default=None, help="tokens per prompt")
  parser.add_argument("--new_tokens", type=int, default=None, help="tokens per response")
  parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                      help="param and compute dtype (default float32; bfloat16 with --preset)")
  parser.add_argument("--iters", type=int, default=10, help="timed iterations")
  parser.add_argument("--warmup", type=int, default=2, help="untimed (compiling) iterations")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=True,
                      help="also run 2x prompts, 2x new tokens and both")
  parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                      help="one subprocess per configuration (clean peak-memory figures)")
  parser.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                      help="XLA cost analysis of each phase (compiles the programs once more)")
  parser.add_argument("--trim", action=argparse.BooleanOptionalAction, default=True,
                      help="malloc_trim after each compile, as perl_jax.train does (perl_jax.host)")
  parser.add_argument("--log_compiles", action="store_true",
                      help="set jax_log_compiles during the timed iterations")
  parser.add_argument("--profile", default=None,
                      help="trace 2 more iterations with jax.profiler into this directory "
                      "(a Perfetto trace: perfetto_trace.json.gz)")
  parser.add_argument("--grad_accum", type=int, default=0,
                      help="ppo.grad_accum: microbatches per minibatch (0: the config's)")
  parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir)")
  parser.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--policy_dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--reward_dir", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  defaults = _GPU_DEFAULTS if args.preset else _CPU_DEFAULTS
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.dtype is None:
    args.dtype = "bfloat16" if args.preset else "float32"
  if args.prompt_len < 2 or args.batch % 2:
    parser.error("need --prompt_len >= 2 and an even --batch (2 minibatches)")
  if args._child:
    _child(args)
    return

  configs = [(args.batch, args.new_tokens)]
  if args.scaling:
    configs += [(2 * args.batch, args.new_tokens), (args.batch, 2 * args.new_tokens),
                (2 * args.batch, 2 * args.new_tokens)]
  with tempfile.TemporaryDirectory(dir=args.workdir) as root:
    start = time.perf_counter()
    policy_dir, reward_dir = build_checkpoints(root, args.preset, args.dtype)
    print(f"[setup] checkpoints in {root} ({time.perf_counter() - start:.1f} s)", flush=True)
    results = []
    for batch, new_tokens in configs:
      if args.isolate:
        r = _run_isolated(args, policy_dir, reward_dir, batch, new_tokens)
      else:
        r = measure(policy_dir, reward_dir, batch=batch, prompt_len=args.prompt_len,
                    new_tokens=new_tokens, dtype=args.dtype, warmup=args.warmup,
                    iters=args.iters, seed=args.seed, log_compiles=args.log_compiles,
                    flops=args.flops, profile=args.profile, grad_accum=args.grad_accum)
      print(f"[done] {_name(r)}: {r['iter_s']:.3f} s/iter", flush=True)
      results.append(r)
  report(results, args)


if __name__ == "__main__":
  main()
