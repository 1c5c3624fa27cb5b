"""The input pipeline: shuffled, sharded, resumable batches, encoded ahead of the step.

Design
------
* **Order.** Epoch ``e`` visits the records in the order `epoch_order` ``(n, seed, e)``, a
  permutation that depends only on (seed, epoch); global batch ``j`` of an epoch is positions
  ``[j B, (j + 1) B)`` of it, and the last incomplete batch is dropped (one shape, one
  compile). A new epoch reshuffles, so every record is still seen.
* **Position.** Global batches are numbered 0, 1, 2, ... across epochs; batch ``p`` is a pure
  function of ``p``, so the position (the number of batches already taken, which the
  supervised trainers store in their checkpoints as ``data_position``) is all a resumed run
  needs: `iterate` ``(start=p)`` jumps straight there, without reading or tokenizing anything
  before it.
* **Shards.** With ``process_count`` processes (multi-host), each takes its own contiguous
  ``B / process_count`` rows of every global batch: the shards of one batch are disjoint and
  together are exactly that batch, and all processes take the same number of steps. Defaults
  come from ``jax.process_index()`` / ``jax.process_count()``. (The trainers themselves are
  still single-process: assembling the shards into one global array is the scale-out work.)
* **Records are read lazily** from any sequence (a list, or a TFDS split that reads by
  index: `perl_jax.data.tfds_builders.TfdsRecords.take`), and each batch is encoded (formatted
  and tokenized) only when needed, so memory does not grow with the dataset.
* **Prefetch.** A background thread encodes the next ``prefetch`` batches while the step
  runs (Hugging Face fast tokenizers release the GIL while encoding a batch), so the
  accelerator does not wait on tokenization; an error while encoding is raised in the
  consumer, at the batch it belongs to. ``prefetch=0`` encodes in the caller's thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order (a permutation of range(n)) in which epoch `epoch` visits `n` records."""
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
  return np.random.default_rng((seed, epoch)).permutation(n)


class Batch(NamedTuple):
  position: int  # global batch number, 0-based, across epochs
  epoch: int
  indices: np.ndarray  # this process's record indices, int64 [B / process_count]
  arrays: dict  # encode(records at indices)


class Batches:
  """Deterministic, sharded, resumable batches of `records`, encoded by `encode`.

  Args:
    records: a sequence (``len`` and indexing; a ``take(indices)`` method is used if present).
    encode: list of records -> dict of arrays with a leading batch axis.
    batch_size: the GLOBAL batch size (all processes together).
    seed: the shuffling seed.
    process_index, process_count: this process's shard; default from jax.
    prefetch: batches encoded ahead in a background thread (0: none).
  """

  def __init__(self, records: Sequence, encode: Callable[[list], Arrays], batch_size: int,
               seed: int, *, process_index: int | None = None, process_count: int | None = None,
               prefetch: int = 2):
    if process_index is None or process_count is None:
      import jax

      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    n = len(records)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} does not split over {process_count} processes")
    if n < batch_size:
      raise ValueError(f"{n} records are fewer than batch_size={batch_size}: every batch would "
                       "be incomplete and dropped")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.records, self.encode, self.seed = records, encode, seed
    self.batch_size, self.prefetch = batch_size, prefetch
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self.batches_per_epoch = n // batch_size
    self._order: tuple[int, np.ndarray] | None = None  # (epoch, order) of the last epoch used
    self._lock = threading.Lock()

  def __len__(self) -> int:
    """Batches per epoch."""
    return self.batches_per_epoch

  def indices(self, position: int) -> tuple[int, np.ndarray]:
    """(epoch, this process's record indices) of global batch `position`."""
    if position < 0:
      raise ValueError(f"position must be >= 0, got {position}")
    epoch, j = divmod(position, self.batches_per_epoch)
    with self._lock:  # the prefetch thread and the caller may both ask
      if self._order is None or self._order[0] != epoch:
        self._order = (epoch, epoch_order(len(self.records), self.seed, epoch))
      order = self._order[1]
    start = j * self.batch_size + self.process_index * self.local_batch_size
    return epoch, order[start:start + self.local_batch_size]

  def fetch(self, indices: np.ndarray) -> list:
    take = getattr(self.records, "take", None)
    return list(take(indices)) if take else [self.records[int(i)] for i in indices]

  def batch(self, position: int) -> Batch:
    """Global batch `position` (this process's shard), read and encoded now."""
    epoch, idx = self.indices(position)
    return Batch(position, epoch, idx, dict(self.encode(self.fetch(idx))))

  def iterate(self, start: int = 0, stop: int | None = None) -> Iterator[Batch]:
    """Batches `start`, `start` + 1, ... (forever, or up to `stop` exclusive)."""
    positions = itertools.count(start) if stop is None else range(start, stop)
    if self.prefetch <= 0:
      return (self.batch(p) for p in positions)
    return _prefetched(self.batch, positions, self.prefetch)


class _Raised(NamedTuple):
  error: BaseException


_END = object()


def _prefetched(make: Callable[[int], Any], positions: Iterator[int], depth: int) -> Iterator:
  """make(p) for p in positions, computed `depth` ahead in a daemon thread."""
  items: queue.Queue = queue.Queue(maxsize=depth)
  stopped = threading.Event()

  def put(item: Any) -> bool:
    while not stopped.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work() -> None:
    try:
      for p in positions:
        if not put(make(p)):
          return
      put(_END)
    except BaseException as e:  # raised again in the consumer, never swallowed
      put(_Raised(e))

  def consume() -> Iterator:
    thread = threading.Thread(target=work, name="input-pipeline", daemon=True)
    thread.start()
    try:
      while True:
        item = items.get()
        if item is _END:
          return
        if isinstance(item, _Raised):
          raise item.error
        yield item
    finally:  # the consumer stopped (or failed): let the thread finish
      stopped.set()

  return consume()
