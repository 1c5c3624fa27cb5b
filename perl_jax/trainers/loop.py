"""The step loop shared by the SFT and reward trainers: checkpoints, resume, faults, logging.

`run` drives ``step_fn`` (`common.make_train_step`) over shuffled batches and owns what
every supervised trainer needs around it:

* resume: the latest checkpoint in ``WORKDIR/checkpoints`` (`perl_jax.checkpoint`) restores
  trainable params, optimizer state and RNG, and its ``data_position`` (global batches taken)
  restarts the input pipeline (`perl_jax.data.pipeline.Batches`) exactly there: batch order is
  a pure function of (seed, position), so nothing before it is read or tokenized again;
* metrics: a resumed run drops the records the lost steps had written, so each step is logged
  once (`MetricsWriter(keep_below=...)`);
* faults: a non-finite loss or gradient skips the update (`common.SkipCounter`); SIGTERM finishes
  the step, saves and raises `checkpoint.Preempted`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import jax

from perl_jax import checkpoint
from perl_jax.data.pipeline import Batches
from perl_jax.trainers import common

Params = Any


def lr_at(o: Any, step: int) -> float:
  """The learning rate `common.make_optimizer` uses at `step` (linear warm-up, then constant)."""
  if o.warmup_steps and step < o.warmup_steps:
    return o.lr * step / o.warmup_steps
  return float(o.lr)


def run(c: Any, workdir: str, *, step_fn: Callable, trainable: Params, opt_state: Any,
        frozen: Params, train_batches: Batches, rng: jax.Array,
        bases: Mapping[str, str | None], setup_metrics: Mapping[str, float],
        evaluate: Callable[[Params], dict], log_eval: Callable[[Any, int, Params], None],
        progress_keys: tuple[str, ...], layout: Any = None) -> tuple[Params, Any, dict, Any]:
  """Steps 1..c.total_iterations (from the latest checkpoint on); returns (trainable,
  opt_state, metrics of the last evaluation, the still open `MetricsWriter`).

  `train_batches` yields the step's batch dicts (exactly the step function's keys).
  `evaluate(trainable)` returns held-out metrics; `log_eval(writer, step, trainable)` writes any
  extra evaluation output (e.g. decoded samples). With a `layout` (`trainers.layout.Layout`)
  each batch is split over its ('data', 'fsdp') axes; the state arrays come placed, and a
  checkpoint restores into their shardings.
  """
  from perl_jax.metrics import MetricsWriter

  if train_batches.process_count > 1:
    raise NotImplementedError(
        f"{train_batches.process_count} processes: the input pipeline shards batches by "
        "process, but the trainers do not yet assemble the shards into global arrays")
  place_batch = (lambda b: b) if layout is None else layout.shard_batch

  ckpt = checkpoint.Checkpointer(workdir, c, bases)
  skips = common.SkipCounter(c.optimizer.max_consecutive_skips)
  start = position = 0
  restored = ckpt.restore({"trainable": trainable, "opt_state": opt_state, "rng": rng})
  if restored is not None:
    state, meta = restored
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    start, skips.total = meta["step"], meta["skipped_steps"]
    position = meta["data_position"]
  writer = MetricsWriter(workdir, c.total_iterations, progress=c.progress,
                         progress_keys=progress_keys, keep_below=start + 1 if start else 0)
  if not start:
    writer.write(0, setup_metrics)

  def run_eval(step: int) -> dict:
    metrics = evaluate(trainable)
    writer.write(step, metrics)
    log_eval(writer, step, trainable)
    return metrics

  stream = train_batches.iterate(start=position)
  eval_metrics: dict = {}
  step = start
  waited = 0.0  # seconds the loop waited for the input pipeline since the last log line
  with checkpoint.PreemptionGuard() as guard, ckpt:
    for step in range(start + 1, c.total_iterations + 1):
      t0 = time.perf_counter()
      batch = next(stream)
      waited += time.perf_counter() - t0
      position = batch.position + 1
      trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen,
                                              place_batch(batch.arrays), rng, step)
      metrics = skips.update(step, metrics)
      last = step == c.total_iterations
      if step % c.log_every == 0 or last:
        writer.write(step, {**metrics, "lr": lr_at(c.optimizer, step - 1), "epoch": batch.epoch,
                            "perf/data_wait_s": waited})
        waited = 0.0
      if step % c.eval_every == 0 or last:
        eval_metrics = run_eval(step)
      if ckpt.due(step) or last or guard.requested:
        ckpt.save(step, {"trainable": trainable, "opt_state": opt_state, "rng": rng},
                  {"data_position": position, "skipped_steps": skips.total})
      if guard.requested:
        writer.close()
        raise checkpoint.Preempted(step, ckpt.directory)
  if not eval_metrics:  # resumed after the last step: evaluate again, log nothing twice
    eval_metrics = evaluate(trainable)
  return trainable, opt_state, eval_metrics, writer
