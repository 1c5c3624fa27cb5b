"""Checkpoints that survive preemption, and exact resume.

Design
------
Every trainer owns one `Checkpointer` over ``WORKDIR/checkpoints`` (an Orbax
`CheckpointManager`). A checkpoint holds two items:

* ``state``: every array a resumed run needs, as one pytree: the trainable params (for LoRA
  only the adapters and heads: the frozen base is reloaded from its checkpoint), optimizer
  state, the JAX RNG key, and whatever else the trainer carries between steps (PPO: the value
  model's state, the KL-controller state, the reward-normalisation statistics);
* ``meta``: JSON: the step, the data position, the resolved config, fingerprints of the frozen
  base checkpoints (`common.base_fingerprint`) and trainer bookkeeping (PPO: evaluations so far).

Properties the trainers rely on:

* Asynchronous: Orbax copies the arrays to host memory and writes them in a background thread
  while training goes on (``checkpoint.asynchronous``).
* Atomic: Orbax writes into a temporary directory and renames it when every file is written;
  `latest_step` sees only finished checkpoints, so a process killed mid-write resumes from the
  one before. The last ``checkpoint.keep`` are kept.
* Never non-finite: `save` refuses a state with a NaN or infinity and names the tensors, so a
  diverged run cannot overwrite its last good checkpoint.
* Checked on restore: keys of the config that change the computation must be those the
  checkpoint was written with (`RESUMABLE_KEYS` may differ: run length, logging, checkpointing),
  and the frozen bases must be the same files. A mismatch is a `CheckpointMismatchError` that
  names the keys or the base, rather than a silently different run.

Preemption: `PreemptionGuard` turns SIGTERM (how Cloud TPU announces preemption) into a flag.
The trainer finishes the step in flight, saves, waits for the write, and raises `Preempted`;
``python -m perl_jax.train`` turns that into exit code `PREEMPTED_EXIT_CODE` (75, EX_TEMPFAIL:
"try again"), and running the same command again resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PREEMPTED_EXIT_CODE = 75
# Config keys that may differ between a checkpoint and the run resuming it: they change how long
# the run goes and what it writes, or where arrays live (the mesh: a checkpoint restores into
# any layout, equal up to float summation order), not what it computes.
RESUMABLE_KEYS = ("total_iterations", "log_every", "progress", "workdir", "checkpoint", "mesh")


class CheckpointMismatchError(ValueError):
  """The checkpoint in a workdir was written by a different config or on a different base."""


class NonFiniteStateError(FloatingPointError):
  """A state with NaN/inf was about to be saved."""


class Preempted(Exception):
  """SIGTERM arrived; the state after `step` is saved in `directory`."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted (SIGTERM): saved step {step} to {directory}; run the same "
                     "command again to resume")
    self.step, self.directory = step, directory


class PreemptionGuard:
  """Context manager: while active, SIGTERM sets `requested` instead of killing the process."""

  def __init__(self):
    self.requested = False
    self._previous: Any = None

  def _handler(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: finishing the step, then saving and exiting", signum)
    self.requested = True

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def config_dict(c: Any) -> dict:
  """A JSON-safe nested dict of the config (tuples become lists, as they do in JSON)."""
  def plain(value):
    if isinstance(value, Mapping):
      return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    return value
  return plain(c.to_dict() if hasattr(c, "to_dict") else c)


def _flat(tree: Mapping) -> dict[str, Any]:
  from perl_jax.trainers.common import flatten

  return {path.replace("/", "."): value for path, value in flatten(dict(tree)).items()}


def config_differences(saved: Mapping, current: Mapping) -> list[str]:
  """'key: saved -> current' for every key that differs, ignoring `RESUMABLE_KEYS`."""
  a, b = _flat(saved), _flat(current)
  free = lambda key: any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


@jax.jit
def _all_finite(xs: list) -> list:
  return [jnp.isfinite(x).all() for x in xs]


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or infinity."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  floats = [(p, x) for p, x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  # One program per set of devices, not one eager op per leaf: on a mesh each of those would
  # compile and dispatch a collective program of its own.
  groups: dict[Any, list[int]] = {}
  for i, (_, x) in enumerate(floats):
    where = frozenset(x.sharding.device_set) if isinstance(x, jax.Array) else None
    groups.setdefault(where, []).append(i)
  finite = {}
  for rows in groups.values():
    finite.update(zip(rows, jax.device_get(_all_finite([floats[i][1] for i in rows]))))
  return [jax.tree_util.keystr(p) for i, (p, _) in enumerate(floats) if not finite[i]]


class Checkpointer:
  """Saves and restores a trainer's state under ``workdir/checkpoints``; see the module doc.

  Args:
    workdir: the run's directory.
    c: the run's resolved config; ``c.checkpoint`` holds ``every_steps`` (0: off),
      ``every_minutes`` (0: off), ``keep`` and ``asynchronous``.
    bases: name -> frozen base checkpoint directory (None entries are skipped); their
      fingerprints are stored and checked on restore.
  """

  def __init__(self, workdir: str, c: Any, bases: Mapping[str, str | None] = ()):
    from perl_jax.trainers.common import base_fingerprint

    ck = c.checkpoint
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.every_steps, self.every_s = int(ck.every_steps), 60.0 * float(ck.every_minutes)
    self._config = config_dict(c)
    self._bases = {name: base_fingerprint(path) for name, path in dict(bases).items() if path}
    options = ocp.CheckpointManagerOptions(max_to_keep=ck.keep, create=True,
                                           enable_async_checkpointing=ck.asynchronous)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._last_save = time.monotonic()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, template: Any) -> tuple[Any, dict] | None:
    """(state, meta) of the latest checkpoint, shaped like `template` and placed on its
    arrays' shardings (so a sharded trainer restores into its own layout, whichever layout
    wrote the checkpoint); None if there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    where = f"{self.directory}/{step}"
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    diffs = config_differences(meta.get("config", {}), self._config)
    if diffs:
      raise CheckpointMismatchError(
          f"{where} was written with a different config; resume with the same values or use "
          f"a new --workdir. Differences (checkpoint -> now): {'; '.join(diffs[:10])}")
    for name, fingerprint in meta.get("bases", {}).items():
      if self._bases.get(name) != fingerprint:
        raise CheckpointMismatchError(
            f"{where}: the frozen base of the {name} model is not the checkpoint it was trained "
            f"on (its files changed since); restore the original base or use a new --workdir")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    logging.info("resumed from %s", where)
    return restored["state"], meta

  def due(self, step: int) -> bool:
    """Whether the schedule (every N steps and/or every M minutes) asks for a save now."""
    by_steps = self.every_steps > 0 and step % self.every_steps == 0
    by_time = self.every_s > 0 and time.monotonic() - self._last_save >= self.every_s
    return by_steps or by_time

  def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    """Starts writing checkpoint `step` (returns before the write ends when asynchronous)."""
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteStateError(f"refusing to save step {step} to {self.directory}: "
                                f"non-finite values in {', '.join(bad[:5])}")
    if self._manager.latest_step() == step:
      return  # already saved (e.g. the final step coinciding with the schedule)
    meta = {**meta, "step": step, "config": self._config, "bases": self._bases}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
    self._last_save = time.monotonic()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for any write in flight, then releases the manager. Safe to call twice."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()  # also on errors: the last good checkpoint is complete before the run stops
