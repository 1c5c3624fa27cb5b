"""MetricsWriter: JSON lines round-trip, NaN/inf stop a step before any byte is written, and the
hand-written TensorBoard event files read back with TensorBoard's own reader."""

import glob
import json
import math
import os
import pickle
import random

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors as tb_errors
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as tb_records

from perl_jax import metrics as m


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _raw_events(path):
  """Every Event in the file via TensorBoard's strict record reader, which checks both CRCs."""
  reader = tb_records.PyRecordReader_New(path.encode())
  events = []
  while True:
    try:
      reader.GetNext()
    except tb_errors.OutOfRangeError:
      return events
    events.append(event_pb2.Event.FromString(reader.record()))


def _event_file(workdir):
  (path,) = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  return path


# --- file format -------------------------------------------------------------------------

def test_crc32c_known_vectors():
  assert m.crc32c(b"") == 0
  assert m.crc32c(b"123456789") == 0xE3069283
  # RFC 3720 (iSCSI), appendix B.4.
  assert m.crc32c(bytes(32)) == 0x8A9136AA
  assert m.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert m.crc32c(bytes(range(32))) == 0x46DD794E
  assert m.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_masked_crc_and_record_framing_match_tensorboard():
  rng = random.Random(0)
  for n in (0, 1, 7, 8, 100, 1000):
    data = bytes(rng.randrange(256) for _ in range(n))
    assert m.masked_crc32c(data) == tb_records.masked_crc32c(data)
  record = m.tfrecord(b"hello")
  assert len(record) == 8 + 4 + 5 + 4
  assert record[:8] == (5).to_bytes(8, "little")
  assert record[12:17] == b"hello"


def test_encode_event_parses_as_the_real_proto():
  ev = event_pb2.Event.FromString(m.encode_event(1234.5, file_version="brain.Event:2"))
  assert ev.wall_time == 1234.5 and ev.file_version == "brain.Event:2" and ev.step == 0
  scalars = {"loss": 0.25, "ppo/kl": -3.0, "ünïcode tag": 7.0}
  ev = event_pb2.Event.FromString(m.encode_event(1.0, step=2**40 + 3, scalars=scalars))
  assert ev.step == 2**40 + 3  # a multi-byte varint
  assert [(v.tag, v.simple_value) for v in ev.summary.value] == list(scalars.items())


# --- MetricsWriter -----------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
  written = [(0, {"loss": 1.5, "reward": -0.25}), (10, {"loss": 0.75, "kl": 1e-8}),
             (20, {"b": 2.0, "a": 1.0})]
  with m.MetricsWriter(tmp_path, total_steps=20, progress=False) as w:
    for step, values in written:
      w.write(step, values)
      # Flushed at every write: a killed run keeps everything written so far.
      assert len(_lines(w.metrics_path)) == written.index((step, values)) + 1
  lines = _lines(tmp_path / "metrics.jsonl")
  assert lines == [{"step": s, **v} for s, v in written]
  assert list(lines[2]) == ["step", "b", "a"]  # the caller's key order


def test_resumed_run_appends(tmp_path):
  with m.MetricsWriter(tmp_path, progress=False, tensorboard=False) as w:
    w.write(1, {"loss": 1.0})
  with m.MetricsWriter(tmp_path, progress=False, tensorboard=False) as w:
    w.write(2, {"loss": 2.0})
  assert _lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -np.inf, np.float32("nan"),
                                 jnp.array(jnp.nan, jnp.bfloat16)],
                         ids=["nan", "inf", "-inf", "np_f32_nan", "jnp_bf16_nan"])
def test_non_finite_raises_and_writes_nothing(tmp_path, bad):
  w = m.MetricsWriter(tmp_path, progress=False)
  w.write(1, {"loss": 1.0, "kl": 0.5})
  before = _read(w.metrics_path), _read(w.event_path)
  with pytest.raises(m.NonFiniteMetricError) as info:
    w.write(2, {"loss": bad, "good": 3.0, "kl": float("inf")})
  assert isinstance(info.value, FloatingPointError)
  message = str(info.value)
  assert "step 2" in message and "loss=" in message and "kl=inf" in message
  assert "good" not in message
  assert info.value.step == 2 and set(info.value.values) == {"loss", "kl"}
  assert str(pickle.loads(pickle.dumps(info.value))) == message
  assert (_read(w.metrics_path), _read(w.event_path)) == before  # nothing of step 2
  w.write(3, {"loss": 0.5})  # the writer is still usable
  w.close()
  assert [line["step"] for line in _lines(w.metrics_path)] == [1, 3]
  assert [e.step for e in _raw_events(w.event_path)[1:]] == [1, 3]


def test_numpy_and_jax_scalars_accepted(tmp_path):
  values = {
      "py_int": 3, "py_bool": True, "np_f32": np.float32(0.5), "np_i64": np.int64(-7),
      "np_0d": np.array(2.25), "np_bool": np.bool_(False), "jnp_f32": jnp.float32(1.75),
      "jnp_0d": jnp.asarray(4.0), "jnp_bf16": jnp.asarray(1.5, jnp.bfloat16),
      "jnp_i32": jnp.asarray(9, jnp.int32), "jnp_sum": jnp.arange(4.0).sum(),
  }
  with m.MetricsWriter(tmp_path, progress=False) as w:
    w.write(np.int64(5), values)
    w.write(jnp.asarray(6), {"x": 1.0})  # steps may be NumPy / jax integers too
  first, second = _lines(tmp_path / "metrics.jsonl")
  assert first == {"step": 5, "py_int": 3.0, "py_bool": 1.0, "np_f32": 0.5, "np_i64": -7.0,
                   "np_0d": 2.25, "np_bool": 0.0, "jnp_f32": 1.75, "jnp_0d": 4.0,
                   "jnp_bf16": 1.5, "jnp_i32": 9.0, "jnp_sum": 6.0}
  assert all(type(v) is float for k, v in first.items() if k != "step")
  assert second == {"step": 6, "x": 1.0}


def test_bad_values_rejected_naming_the_keys(tmp_path):
  w = m.MetricsWriter(tmp_path, progress=False)
  w.write(0, {"ok": 1.0})
  before = _read(w.metrics_path), _read(w.event_path)
  with pytest.raises(ValueError, match=r"vec \(shape \(3,\)\).*one \(shape \(1,\)\)"):
    w.write(1, {"ok": 1.0, "vec": np.ones(3), "one": jnp.ones((1,))})
  with pytest.raises(TypeError, match="name"):
    w.write(1, {"ok": 1.0, "name": "a string"})
  with pytest.raises(TypeError, match="none"):
    w.write(1, {"none": None})
  with pytest.raises(TypeError, match="cplx"):
    w.write(1, {"cplx": 1j})
  with pytest.raises(ValueError, match="'step'"):
    w.write(1, {"step": 1.0})
  with pytest.raises(TypeError):
    w.write(1.0, {"ok": 1.0})  # a float step
  with pytest.raises(ValueError, match=">= 0"):
    w.write(-1, {"ok": 1.0})
  assert (_read(w.metrics_path), _read(w.event_path)) == before
  w.close()


def test_event_file_read_back_by_tensorboard(tmp_path):
  written = [(0, {"loss": 2.0, "ppo/kl": 0.1}), (5, {"loss": 1.25, "ppo/kl": 0.3, "lr": 1e-4}),
             (300, {"loss": 1 / 3, "ppo/kl": -0.5, "huge": 1e39})]  # 1e39 > float32 max
  with m.MetricsWriter(tmp_path, progress=False) as w:
    for step, values in written:
      w.write(step, values)
  path = _event_file(tmp_path)
  assert os.path.basename(path).startswith("events.out.tfevents.")

  # Strict reader: both CRCs of every record are checked and every byte is consumed.
  events = _raw_events(path)
  assert events[0].file_version == "brain.Event:2"
  assert len(events) == 1 + len(written)
  assert [e.wall_time for e in events] == sorted(e.wall_time for e in events)
  for event, (step, values) in zip(events[1:], written):
    assert event.step == step
    assert [v.tag for v in event.summary.value] == list(values)

  # TensorBoard's own loader, as the TensorBoard UI reads a run directory.
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  assert acc.file_version == 2.0  # "brain.Event:2" was parsed
  assert sorted(acc.Tags()["scalars"]) == ["huge", "loss", "lr", "ppo/kl"]
  expected = {}
  for step, values in written:
    for tag, value in values.items():
      with np.errstate(over="ignore"):  # 1e39 becomes inf as a float32, as intended
        expected.setdefault(tag, []).append((step, float(np.float32(value))))
  for tag, series in expected.items():
    assert [(s.step, s.value) for s in acc.Scalars(tag)] == series, tag
  assert math.isinf(acc.Scalars("huge")[0].value)  # beyond float32 in TensorBoard...
  assert _lines(tmp_path / "metrics.jsonl")[2]["huge"] == 1e39  # ...exact in the JSON lines


def test_samples_file_and_printout(tmp_path, capsys):
  samples = [{"prompt": "2+2=", "response": "4", "reward": np.float32(1.0)},
             {"prompt": "x" * 5000, "response": "y", "reward": jnp.asarray(-0.5)},
             {"prompt": "third", "response": "z", "reward": 0.0}]
  with m.MetricsWriter(tmp_path, progress=False, print_samples=2) as w:
    w.write_samples(10, samples)
    w.write_samples(20, samples[:1])
    with pytest.raises(TypeError):
      w.write_samples(30, {"prompt": "not a list"})
  lines = _lines(tmp_path / "samples.jsonl")
  assert [line["step"] for line in lines] == [10, 20]
  assert lines[0]["samples"] == [{"prompt": "2+2=", "response": "4", "reward": 1.0},
                                 {"prompt": "x" * 5000, "response": "y", "reward": -0.5},
                                 {"prompt": "third", "response": "z", "reward": 0.0}]
  out = capsys.readouterr().out
  assert "[step 10] sample 0:" in out and "response: 4" in out
  assert "[step 10] sample 1:" in out and "more chars" in out  # long text is cut on screen
  assert "third" not in out  # only print_samples of them


def test_non_main_process_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  with m.MetricsWriter(workdir, total_steps=10, is_main_process=False) as w:
    w.write(1, {"loss": 1.0})
    w.write(2, {"loss": float("nan")})  # not even checked
    w.write_samples(1, [{"a": 1}])
  w.write(3, {"loss": 1.0})  # nor closed
  assert not workdir.exists()
  captured = capsys.readouterr()
  assert captured.out == "" and captured.err == ""


def test_progress_bar(tmp_path, capsys):
  with m.MetricsWriter(tmp_path, total_steps=None, tensorboard=False,
                       progress_keys=("reward", "missing")) as w:
    for step in range(1, 4):
      w.write(step, {"loss": 1.0 / step, "reward": 0.125 * step})
    w.write(2, {"reward": 9.0})  # a step going back only redraws
  err = capsys.readouterr().err
  assert "reward=" in err and "loss=" not in err and "missing" not in err
  assert not (tmp_path / "tb").exists()
  with m.MetricsWriter(tmp_path, total_steps=100, tensorboard=False) as w:
    w.write(50, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})  # starts at a resumed step
    w.write(100, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
  err = capsys.readouterr().err
  assert "100/100" in err and "c=" in err and "d=" not in err  # first three keys by default


def test_closed_writer_refuses_writes(tmp_path):
  w = m.MetricsWriter(tmp_path, progress=False)
  w.close()
  w.close()  # twice is fine
  with pytest.raises(ValueError, match="closed"):
    w.write(0, {"loss": 1.0})
