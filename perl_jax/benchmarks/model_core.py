"""Forward-pass and sampler-decode speed of the core model; prints tables, asserts nothing.

Usage::

  python -m perl_jax.benchmarks.model_core                      # CPU: tiny models + 'small'
  python -m perl_jax.benchmarks.model_core --sizes=small --batch=16 --seq=128
  python -m perl_jax.benchmarks.model_core --preset=gpu_0p5b --peak_gbps=3350   # H100 SXM

What is measured
----------------
* Forward: one jitted prefill ``apply(params, tokens_BxT)`` returning logits. Compiled by a
  first call, then the median of ``--repeats`` timed calls (each ends in
  ``block_until_ready``), reported as milliseconds and processed tokens per second.
* Decode: `perl_jax.sampling.sample` (one jitted program: prefill + while-loop decode) with
  ``stop_at_eos=False`` so every row generates exactly ``--new_tokens``. Compile time is
  excluded by a warm-up call. "gen tok/s" is B * new_tokens / wall time of the whole call,
  so it includes the (short) prompt prefill.
* Roofline (``--preset`` only): the per-step decode time is isolated as
  ``(t(N) - t(N / 4)) / (3N / 4)``, which cancels the prefill and dispatch cost. A decode
  step must at least read every parameter and the KV cache in use, so
  ``bytes / step time`` over ``--peak_gbps`` is the fraction of the memory-bandwidth
  roofline reached. The KV bytes use the mean cache fill over the run (prompt + N / 2
  tokens); the model actually attends over the whole static cache (masked), so this
  fraction is a lower bound on the bandwidth the hardware sustains.

Sizes: 'tiny' is `tiny_config` of every family (few thousand params: measures overheads),
'small' is a 4-layer, 256-wide, vocab-2048 Llama, and the 'gpu_0p5b' preset has the shapes of
Qwen2-0.5B (24 layers, 896 wide, 14 heads / 2 KV heads, vocab 151936, tied embeddings) as a
Llama-family config in bfloat16.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax.benchmarks import print_table
from perl_jax.models.config import FAMILIES, ModelConfig, tiny_config
from perl_jax.models.transformer import Transformer, init_params
from perl_jax.sampling import SamplingConfig, sample


def small_config() -> ModelConfig:
  return tiny_config("llama", num_layers=4, embed_dim=256, vocab_size=2048, num_heads=8,
                     num_kv_heads=4, head_dim=32, mlp_dim=1024, max_positions=2048)


def gpu_0p5b_config() -> ModelConfig:
  """Qwen2-0.5B shapes (494M params with tied embeddings), Llama switches, bfloat16."""
  return ModelConfig(family="llama", vocab_size=151936, embed_dim=896, num_layers=24,
                     num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864,
                     tie_embeddings=True, rope_theta=1_000_000.0, max_positions=32768,
                     bos_token_id=None, eos_token_id=151643, pad_token_id=151643,
                     dtype="bfloat16", param_dtype="bfloat16")


# Defaults per mode: (forward batch, forward seq, prompt length, new tokens).
_CPU_DEFAULTS = dict(batch=8, seq=64, prompt_len=16, new_tokens=32)
_GPU_DEFAULTS = dict(batch=8, seq=512, prompt_len=64, new_tokens=128)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _tokens(cfg: ModelConfig, batch: int, length: int, seed: int = 0) -> jax.Array:
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 3, cfg.vocab_size,
                            jnp.int32)


def bench_forward(model: Transformer, params: Any, batch: int, seq: int,
                  repeats: int) -> float:
  """Median seconds of one compiled prefill forward pass over batch x seq tokens."""
  tokens_BxT = _tokens(model.cfg, batch, seq)
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  return _median_seconds(lambda: apply(params, tokens_BxT), repeats)


def bench_sample(model: Transformer, params: Any, batch: int, prompt_len: int,
                 new_tokens: int, repeats: int) -> float:
  """Median seconds of one compiled `sample` call generating batch x new_tokens tokens."""
  prompt_BxP = _tokens(model.cfg, batch, prompt_len, seed=1)
  mask_BxP = jnp.ones_like(prompt_BxP, bool)
  cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop_at_eos=False)
  rng = jax.random.PRNGKey(2)
  run = lambda: sample(model, {"params": params}, prompt_BxP, mask_BxP, rng, cfg, eos_ids=(),
                       pad_id=0).tokens
  return _median_seconds(run, repeats)


def param_bytes(params: Any) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def kv_bytes(cfg: ModelConfig, batch: int, filled: float) -> float:
  """Bytes of keys and values for `filled` cached tokens per row, all layers."""
  itemsize = np.dtype(cfg.compute_dtype).itemsize  # init_cache's default dtype
  per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
  return batch * filled * per_token



def run(models: list[tuple[str, ModelConfig]], args: argparse.Namespace, roofline: bool) -> None:
  decode_batches = [int(b) for b in args.decode_batches.split(",")]
  fwd_rows, dec_rows, roof_rows = [], [], []
  for name, cfg in models:
    model = Transformer(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    t = bench_forward(model, params, args.batch, args.seq, args.repeats)
    fwd_rows.append([name, f"{n_params:,}", f"{args.batch}x{args.seq}", f"{t * 1e3:.2f}",
                     f"{args.batch * args.seq / t:,.0f}"])
    gen = []
    for b in decode_batches:
      t_full = bench_sample(model, params, b, args.prompt_len, args.new_tokens, args.repeats)
      gen.append(f"{b * args.new_tokens / t_full:,.0f}")
      if roofline:
        short = max(1, args.new_tokens // 4)
        t_short = bench_sample(model, params, b, args.prompt_len, short, args.repeats)
        step = max(t_full - t_short, 1e-9) / (args.new_tokens - short)
        moved = param_bytes(params) + kv_bytes(cfg, b, args.prompt_len + args.new_tokens / 2)
        gbps = moved / step / 1e9
        roof_rows.append([name, b, f"{step * 1e3:.3f}", f"{b / step:,.0f}",
                          f"{moved / 1e6:,.1f}", f"{gbps:,.0f}", f"{gbps / args.peak_gbps:.1%}"])
    dec_rows.append([name] + gen)
    print(f"[done] {name}", flush=True)

  print(f"\ndevice: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{jax.device_count()} device(s); jax {jax.__version__}; median of {args.repeats} runs, "
        "compile excluded")
  print_table("Forward (prefill, logits for every position)",
               ["model", "params", "BxT", "ms", "tokens/s"], fwd_rows)
  print_table(f"Sampler: generated tokens/s (prompt {args.prompt_len}, "
               f"{args.new_tokens} new tokens, prefill included)",
               ["model"] + [f"B={b}" for b in decode_batches], dec_rows)
  if roofline:
    print_table(f"Decode step vs memory-bandwidth roofline (peak {args.peak_gbps:,.0f} GB/s; "
                 "bytes = params + mean KV cache in use)",
                 ["model", "B", "step ms", "decode tok/s", "MB/step", "GB/s", "of peak"],
                 roof_rows)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default=None,
                      help="comma list of tiny,small (default: both, or none with --preset)")
  parser.add_argument("--preset", default=None, choices=["gpu_0p5b"])
  parser.add_argument("--batch", type=int, default=None, help="forward-pass batch")
  parser.add_argument("--seq", type=int, default=None, help="forward-pass length")
  parser.add_argument("--prompt_len", type=int, default=None)
  parser.add_argument("--new_tokens", type=int, default=None)
  parser.add_argument("--decode_batches", default="1,16,64")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak_gbps", type=float, default=3350.0,
                      help="accelerator memory bandwidth (H100 SXM 3350, H200 4800)")
  args = parser.parse_args(argv)
  defaults = _GPU_DEFAULTS if args.preset else _CPU_DEFAULTS
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  sizes = args.sizes.split(",") if args.sizes else ([] if args.preset else ["tiny", "small"])

  models: list[tuple[str, ModelConfig]] = []
  for size in sizes:
    if size == "tiny":
      models += [(f"tiny-{f}", tiny_config(f)) for f in FAMILIES]
    elif size == "small":
      models.append(("small-llama", small_config()))
    else:
      parser.error(f"unknown size {size!r} (tiny, small)")
  if args.preset == "gpu_0p5b":
    models.append(("gpu_0p5b", gpu_0p5b_config()))
  for name, cfg in models:
    longest = max(args.seq, args.prompt_len + args.new_tokens)
    if cfg.positions == "learned" and longest > cfg.max_positions:
      parser.error(f"{name}: sequence lengths exceed max_positions={cfg.max_positions}")
  run(models, args, roofline=args.preset is not None)


if __name__ == "__main__":
  main()
