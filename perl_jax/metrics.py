"""One metrics writer for every trainer: JSON lines, TensorBoard events and a progress bar.

Design
------
`MetricsWriter(workdir, total_steps)` is the only place a trainer sends its numbers to. Each
``write(step, metrics)`` goes, in this order, through:

1. Conversion. Every value (Python number, NumPy scalar or 0-d array, 0-d `jax.Array` of a
   bool, integer or floating dtype, bfloat16 included) becomes a Python float. All device
   values are fetched with one `jax.device_get`, so their transfers overlap. Anything with
   more than one element is rejected, naming the keys, instead of being silently averaged:
   the caller decides how to reduce.
2. A finiteness check, BEFORE anything is written. A NaN or inf raises
   `NonFiniteMetricError` (a `FloatingPointError`) naming the step and every non-finite key,
   and nothing of that step reaches any output, so the files end at the last good step and a
   diverged run stops at the step where it diverged instead of training on garbage.
3. Output, each flushed at once so a killed run keeps every line it wrote:

   * ``WORKDIR/metrics.jsonl``: one JSON object per line, ``{"step": step, **metrics}``, in the
     caller's key order. The file is opened for appending: a resumed run adds its lines after
     the old ones, and a reader keeps the last line of a repeated step.
   * ``WORKDIR/tb/events.out.tfevents.<time>.<host>``: TensorBoard scalars, written by this
     module itself (see below), so neither TensorFlow nor the tensorboard package is needed at
     run time.
   * a tqdm bar whose position is the step and whose postfix shows a few chosen keys. It is
     created at the first write with that step as its start, so a resumed run reports a true
     rate.

``write_samples(step, samples)`` appends ``{"step": step, "samples": [...]}`` to
``WORKDIR/samples.jsonl`` and prints the first few samples with `tqdm.write`, which keeps the
bar intact. Samples are for reading, not for plotting: they are not checked for finiteness.

Only one process writes. ``is_main_process`` defaults to ``jax.process_index() == 0``; on
every other process each method is a no-op and no file is created (no metrics.jsonl, no
TensorBoard file, no samples.jsonl, no progress bar), so multi-host trainers call the writer
unconditionally. Beware that such processes then also skip the finiteness check; a trainer
that must stop every host on a NaN has to agree on it across hosts itself. (Checkpoints are
the opposite case: Orbax's CheckpointManager is called on every process and writes
collectively, each process its own shards.)

TensorBoard event files
-----------------------
An event file is a TFRecord file of serialized ``tensorflow.Event`` protos. Each record is::

  uint64 length | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)

all little endian, where ``masked_crc(c) = (((c >> 15) | (c << 17)) + 0xa282ead8) mod 2**32``
and crc32c is the Castagnoli CRC (reflected polynomial 0x82F63B78), computed here with a
256-entry table in pure Python (events are a few hundred bytes, so speed does not matter). The
first record is ``Event(wall_time, file_version="brain.Event:2")``; each write then adds one
``Event(wall_time, step, summary=Summary(value=[Value(tag, simple_value), ...]))``. The protos
are hand-encoded in the protobuf wire format: this needs only varints, 64-bit doubles, 32-bit
floats and length-delimited fields, which is far less than a dependency on generated proto
classes. ``simple_value`` is a float32, so values beyond the float32 range show as +-inf in
TensorBoard (the JSON lines keep full precision).
"""

from __future__ import annotations

import json
import math
import operator
import os
import socket
import struct
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

Scalar = float | int | np.ndarray | np.generic | jax.Array


class NonFiniteMetricError(FloatingPointError):
  """A metric passed to `MetricsWriter.write` was NaN or infinite; nothing of its step was written."""

  def __init__(self, step: int, values: Mapping[str, float]):
    self.step = step
    self.values = dict(values)  # only the non-finite ones
    listed = ", ".join(f"{k}={v}" for k, v in self.values.items())
    super().__init__(f"non-finite metrics at step {step}: {listed} "
                     f"(nothing was written for step {step})")

  def __reduce__(self):  # keep it picklable despite the non-message constructor arguments
    return type(self), (self.step, self.values)


# ------------------------------------------------------------------------------------------
# CRC32C (Castagnoli) and TFRecord framing.

def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli, iSCSI) of ``data``, e.g. ``crc32c(b"123456789") == 0xE3069283``."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The CRC TFRecord stores: rotated and offset so that CRCs of CRCs do not degenerate."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, the data, its masked CRC."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data +
          struct.pack("<I", masked_crc32c(data)))


# ------------------------------------------------------------------------------------------
# Protobuf wire format, just enough for tensorflow.Event with scalar summaries.

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
  if n < 0:
    raise ValueError(f"only non-negative varints are encoded here, got {n}")
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  try:
    return struct.pack("<f", value)
  except OverflowError:  # finite in float64 but beyond float32: it IS +-inf as a float32
    return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(wall_time: float, *, step: int | None = None, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """Serialized ``tensorflow.Event``.

  Fields: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
  summary = 5 (Summary); Summary.value = 1 (repeated Value); Value.tag = 1 (string),
  Value.simple_value = 2 (float).
  """
  out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
  if step is not None:
    out += _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode("utf-8"))
  if scalars:
    summary = b"".join(
        _len_field(1, _len_field(1, tag.encode("utf-8")) + _key(2, _FIXED32) + _float32(v))
        for tag, v in scalars.items())
    out += _len_field(5, summary)
  return out


# ------------------------------------------------------------------------------------------
# Value conversion.

def _is_real_dtype(dtype: np.dtype) -> bool:
  # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, float8), which NumPy does not.
  return (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer) or
          jnp.issubdtype(dtype, jnp.floating))


def to_floats(metrics: Mapping[str, Scalar]) -> dict[str, float]:
  """Converts every value to a Python float; raises naming the keys of non-scalar values.

  Finiteness is not checked here (see `MetricsWriter.write`).
  """
  for key in metrics:
    if not isinstance(key, str) or not key:
      raise TypeError(f"metric names must be non-empty strings, got {key!r}")
  if "step" in metrics:  # it would collide with the step field of the JSON line
    raise ValueError("'step' is not allowed as a metric name; it is the write's step argument")
  # One call, so device-to-host copies overlap. A list, not the dict: pytree flattening sorts
  # dict keys, and the caller's order is kept in the outputs.
  host = jax.device_get(list(metrics.values()))
  out, not_scalar, not_number = {}, [], []
  for key, value in zip(metrics, host):
    if isinstance(value, (bool, int, float)):  # the common case, no NumPy round trip
      out[key] = float(value)
      continue
    array = np.asarray(value)
    if array.dtype == object or not _is_real_dtype(array.dtype):
      not_number.append(f"{key} ({type(value).__name__}, dtype {array.dtype})")
    elif array.ndim != 0:
      not_scalar.append(f"{key} (shape {array.shape})")
    else:
      out[key] = float(array)
  if not_number:
    raise TypeError(f"metrics must be real numbers; not numbers: {', '.join(not_number)}")
  if not_scalar:
    raise ValueError("metrics must be scalars (reduce arrays before writing); "
                     f"not scalars: {', '.join(not_scalar)}")
  return out


def _json_default(obj: Any) -> Any:
  # Samples may hold NumPy values (token ids, rewards); metrics never reach this.
  if isinstance(obj, (np.ndarray, np.generic)):
    return obj.tolist()
  raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _check_step(step: int) -> int:
  if isinstance(step, (bool, np.bool_)):
    raise TypeError(f"step must be an integer, got {step!r}")
  step = operator.index(step)  # ints, NumPy and 0-d jax integers; floats are an error
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  return step


# ------------------------------------------------------------------------------------------

class MetricsWriter:
  """Writes metrics to ``workdir`` as JSON lines and TensorBoard events, and shows progress.

  Args:
    workdir: directory of the run; created if missing.
    total_steps: length of the progress bar; None for a bar without a total.
    progress: show a tqdm progress bar (on stderr).
    tensorboard: write a TensorBoard event file under ``workdir/tb``.
    is_main_process: when False every method is a no-op and nothing is created; None (the
      default) means ``jax.process_index() == 0``, the one writer of a multi-host run.
    progress_keys: metric names shown in the bar's postfix (those present in a write); None
      shows the first three metrics of each write.
    print_samples: how many samples of each `write_samples` call are printed.
    keep_below: None appends to existing metrics.jsonl / samples.jsonl; a step number first
      drops their records at that step or later (and any torn last line of a killed process):
      0 for a run starting afresh, the step a resumed run restarts from otherwise, so each step
      appears once. TensorBoard files are never rewritten; each writer starts a new one.
  """

  def __init__(self, workdir: str | os.PathLike, total_steps: int | None = None, *,
               progress: bool = True, tensorboard: bool = True,
               is_main_process: bool | None = None,
               progress_keys: Sequence[str] | None = None, print_samples: int = 2,
               keep_below: int | None = None):
    self.workdir = os.fspath(workdir)
    self.total_steps = total_steps
    if is_main_process is None:
      is_main_process = jax.process_index() == 0
    self.is_main_process = is_main_process
    self.progress_keys = None if progress_keys is None else tuple(progress_keys)
    self.print_samples = print_samples
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    self.samples_path = os.path.join(self.workdir, "samples.jsonl")
    self.event_path: str | None = None
    self._progress = progress
    self._bar: tqdm.tqdm | None = None
    self._metrics_file = self._samples_file = self._event_file = None
    self._closed = False
    if not is_main_process:
      return
    os.makedirs(self.workdir, exist_ok=True)
    if keep_below is not None:
      for path in (self.metrics_path, self.samples_path):
        _drop_records_from(path, keep_below)
    self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
    if tensorboard:
      tb_dir = os.path.join(self.workdir, "tb")
      os.makedirs(tb_dir, exist_ok=True)
      now = time.time()
      self.event_path = os.path.join(
          tb_dir, f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}")
      # Append: a second writer started on this host in the same second shares the file
      # instead of truncating it; readers accept a repeated file_version record.
      self._event_file = open(self.event_path, "ab")
      self._event_file.write(tfrecord(encode_event(now, file_version="brain.Event:2")))
      self._event_file.flush()

  # --- context manager -------------------------------------------------------------------

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"MetricsWriter for {self.workdir} is closed")

  # --- writing ---------------------------------------------------------------------------

  def write(self, step: int, metrics: Mapping[str, Scalar]) -> None:
    """Records ``metrics`` at ``step``; raises `NonFiniteMetricError` before writing any NaN/inf."""
    if not self.is_main_process:
      return
    self._check_open()
    step = _check_step(step)
    values = to_floats(metrics)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
      raise NonFiniteMetricError(step, bad)
    # Everything is encoded before the first byte goes out, so no error can leave a step
    # half written.
    line = json.dumps({"step": step, **values}, allow_nan=False) + "\n"
    record = (tfrecord(encode_event(time.time(), step=step, scalars=values))
              if self._event_file is not None else None)
    self._metrics_file.write(line)
    self._metrics_file.flush()
    if record is not None:
      self._event_file.write(record)
      self._event_file.flush()
    if self._progress:
      self._update_bar(step, values)

  def _update_bar(self, step: int, values: Mapping[str, float]) -> None:
    keys = self.progress_keys if self.progress_keys is not None else tuple(values)[:3]
    postfix = {k: values[k] for k in keys if k in values}
    if self._bar is None:
      self._bar = tqdm.tqdm(total=self.total_steps, initial=step, unit="step",
                            dynamic_ncols=True, postfix=postfix)
    elif step >= self._bar.n:
      self._bar.set_postfix(postfix, refresh=False)  # update() redraws, rate-limited
      self._bar.update(step - self._bar.n)
    else:  # the step went back (e.g. an evaluation pass logged out of order): just redraw
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.n = self._bar.last_print_n = step
      self._bar.refresh()

  def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
    """Appends ``{"step": step, "samples": samples}`` to samples.jsonl and prints a few."""
    if not self.is_main_process:
      return
    self._check_open()
    step = _check_step(step)
    if isinstance(samples, Mapping) or not all(isinstance(s, Mapping) for s in samples):
      raise TypeError("samples must be a list of dicts")
    samples = [dict(zip(s, jax.device_get(list(s.values())))) for s in samples]
    line = json.dumps({"step": step, "samples": samples}, default=_json_default) + "\n"
    if self._samples_file is None:  # only runs that log samples get the file
      self._samples_file = open(self.samples_path, "a", encoding="utf-8")
    self._samples_file.write(line)
    self._samples_file.flush()
    for i, sample in enumerate(samples[:self.print_samples]):
      fields = "\n".join(f"  {k}: {_short(v)}" for k, v in sample.items())
      tqdm.tqdm.write(f"[step {step}] sample {i}:\n{fields}")

  def close(self) -> None:
    """Closes the bar and the files. Safe to call twice."""
    if self._closed:
      return
    self._closed = True
    if self._bar is not None:
      self._bar.close()
    for f in (self._metrics_file, self._samples_file, self._event_file):
      if f is not None:
        f.close()


def _drop_records_from(path: str, step: int) -> None:
  """Rewrites JSON-lines `path` without records at `step` or later (atomically)."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:  # a line torn by a killed process
        continue
      if isinstance(record, dict) and record.get("step", step) < step:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


def _short(value: Any, limit: int = 1000) -> str:
  # Long completions would flood the terminal; the file keeps them whole.
  text = value if isinstance(value, str) else repr(value)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"
