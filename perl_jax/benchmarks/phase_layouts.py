"""Time per PPO phase: one fixed layout for all phases vs per-phase layouts; prints a table.

Usage::

  python -m perl_jax.benchmarks.phase_layouts                # 8 host CPU devices
  python -m perl_jax.benchmarks.phase_layouts --iters=4 --batch=16

Runs `ppo.train` (the real loop) on the 'small' model of `model_core` (4 layers, 256 wide,
8 heads, vocab 2048; LoRA r=8 on every projection, GAE with a value model; random weights
from `ppo_iteration.build_checkpoints`) with prompts of random words, once per setting:

* fixed:  ``config.mesh`` (``--fixed``, default fsdp=8) for every phase;
* manual: generate tensor=8, score fsdp=8, train data=2 x fsdp=2 x tensor=2 (a split chosen
          by hand, to show the reallocation cost of moving between three meshes);
* auto:   ``layouts=auto`` with ``--candidates`` candidates (its choice is printed).

It reads ``perf/{generate,score,train,realloc}_s`` from each run's metrics.jsonl and reports
the median over the iterations after the first (the first compiles), plus the process CPU
time of the whole run. XLA_FLAGS gets ``--xla_force_host_platform_device_count=8`` before jax
is imported, unless ``--devices=0`` (use the real devices, e.g. a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

PHASES = ("generate", "score", "train", "realloc")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--devices", type=int, default=8, help="host CPU devices (0: real devices)")
  ap.add_argument("--iters", type=int, default=4)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=16)
  ap.add_argument("--candidates", type=int, default=4)
  ap.add_argument("--fixed", default="data=1,fsdp=8,tensor=1")
  ap.add_argument("--settings", default="fixed,manual,auto")
  args = ap.parse_args(argv)
  if args.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("PJRT_NPROC", str(2 * args.devices))  # BUILD_NOTES: a deadlock
  import logging

  import jax

  from perl_jax import config
  from perl_jax.benchmarks import ppo_iteration
  from perl_jax.trainers import ppo

  logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
  logging.getLogger("perl_jax.trainers.layout_cost").setLevel(logging.INFO)  # auto's choice
  n = jax.device_count()
  root = tempfile.mkdtemp(prefix="phase_layouts_")
  policy_dir, reward_dir = ppo_iteration.build_checkpoints(root, None, "float32")
  with open(f"{root}/prompts.jsonl", "w") as f:
    for i in range(4 * args.batch):
      f.write(json.dumps({"prompt": " ".join(f"w{4 + (7 * i + j) % 2000}" for j in range(15))})
              + "\n")
  fixed = dict(kv.split("=") for kv in args.fixed.split(","))
  manual = dict(generate=f"tensor={n}", score=f"fsdp={n}",
                train="data=2,fsdp=2,tensor=2" if n == 8 else f"fsdp={n}")
  rows = []
  for setting in args.settings.split(","):
    c = config.ppo_config()
    ppo_iteration.lora_block(c)
    c.policy.init, c.reward.init, c.data.prompts = policy_dir, reward_dir, f"{root}/prompts.jsonl"
    c.progress, c.total_iterations, c.eval_every = False, args.iters, 10 ** 6
    c.ppo.batch_size, c.ppo.num_minibatches = args.batch, 2
    c.rollout.max_new_tokens, c.rollout.stop_at_eos = args.new_tokens, False
    c.checkpoint.every_steps, c.checkpoint.every_minutes = 0, 0.0
    c.mesh.update({k: int(v) for k, v in fixed.items()})
    if setting == "manual":
      c.phase_mesh.update(manual)
    elif setting == "auto":
      c.layouts, c.phase_mesh.auto_candidates = "auto", args.candidates
    workdir = f"{root}/{setting}"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ppo.train(c, workdir)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    lines = [json.loads(l) for l in open(f"{workdir}/metrics.jsonl")]
    perf = [m for m in lines if "perf/iter_s" in m][1:]  # the first iteration compiles
    med = {p: statistics.median(m[f"perf/{p}_s"] for m in perf) for p in PHASES}
    rows.append((setting, med, cpu, wall))
  print(f"\n{n} {jax.devices()[0].platform} devices; small model; batch {args.batch}, "
        f"{args.new_tokens} new tokens; median of {args.iters - 1} iterations (s); "
        f"load average {os.getloadavg()}")
  print(f"{'setting':8} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'sum':>8} "
        f"{'run cpu s':>10} {'run wall s':>10}")
  for setting, med, cpu, wall in rows:
    print(f"{setting:8} " + " ".join(f"{med[p]:9.4f}" for p in PHASES)
          + f" {sum(med.values()):8.4f} {cpu:10.1f} {wall:10.1f}")
  sys.stdout.flush()


if __name__ == "__main__":
  main()
