"""perl_jax.host: freed compiler heap goes back to the OS; large buffers stay out of the heap;
the gradient programs' CPU compiler options compile the same math."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from perl_jax import host


def test_trim_runs_after_every_backend_compile(monkeypatch):
  x7, x9 = jax.device_put(np.arange(7.0)), jax.device_put(np.arange(9.0))
  calls = []
  monkeypatch.setattr(host, "trim", lambda: calls.append(1) or True)
  assert host.trim_after_compiles()  # glibc on the CI machines
  assert host.trim_after_compiles()  # idempotent: one listener per process

  fresh = jax.jit(lambda x: jnp.sin(x) * 3.0 + x.sum())  # a program not compiled before
  fresh(x7).block_until_ready()
  assert len(calls) == 1
  fresh(x7).block_until_ready()  # cached: no compile, no trim
  assert len(calls) == 1
  fresh(x9).block_until_ready()  # a new shape compiles again
  assert len(calls) == 2


def test_trim_returns_heap_to_the_os():
  assert host.trim()


# fix_mmap_threshold changes the process's allocator for good, so it is observed in a child.
_MMAP_PROBE = r"""
import ctypes, sys
import numpy as np
from perl_jax import host

class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in
              "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
big = np.ones(20 << 20, np.uint8)  # a mapped block; freeing it raises glibc's dynamic threshold
del big
if sys.argv[1] == "fixed":
  assert host.fix_mmap_threshold()
before = libc.mallinfo2().hblkhd
buf = np.ones(9 << 20, np.uint8)  # above the fixed 8 MiB threshold, below 20 MiB
print("mapped" if libc.mallinfo2().hblkhd - before >= buf.nbytes else "heap")
"""


def _where_9mib_goes(mode: str) -> str:
  out = subprocess.run([sys.executable, "-c", _MMAP_PROBE, mode], capture_output=True, text=True,
                       check=True)
  return out.stdout.split()[-1]


def test_fixed_mmap_threshold_keeps_large_buffers_out_of_the_heap():
  # glibc's default: after a 20 MiB block is freed, a 9 MiB buffer is carved from the heap...
  assert _where_9mib_goes("default") == "heap"
  # ...with the fixed threshold it gets its own mapping, returned to the OS when freed.
  assert _where_9mib_goes("fixed") == "mapped"


def test_gradient_compiler_options_compile_the_same_math():
  opts = host.gradient_compiler_options()
  assert opts == {"xla_cpu_use_fusion_emitters": False}  # the CPU backend of the tests
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)
  loss = lambda w, x: jnp.sum(jax.nn.silu(x @ w) ** 2) + jnp.mean(jax.nn.log_softmax(x @ w))
  grad_default = jax.jit(jax.grad(loss))(w, x)
  grad_elemental = jax.jit(jax.grad(loss), compiler_options=opts)(w, x)
  np.testing.assert_allclose(grad_elemental, grad_default, rtol=1e-5, atol=1e-6)
  h = x @ w  # NumPy reference of the gradient
  s = 1 / (1 + np.exp(-np.asarray(h)))
  silu = np.asarray(h) * s
  d_h = 2 * silu * (s + np.asarray(h) * s * (1 - s))
  sm = np.exp(h - np.max(h, -1, keepdims=True))
  sm = np.asarray(sm / sm.sum(-1, keepdims=True))
  d_h += (1.0 - h.shape[1] * sm) / h.size
  np.testing.assert_allclose(grad_elemental, np.asarray(x).T @ d_h, rtol=1e-4, atol=1e-5)


def test_huge_pages_env_adds_the_tunable_only_where_it_helps():
  glibc, thp = (2, 36), "madvise"
  env = host.huge_pages_env({"PATH": "/bin"}, glibc, thp)
  assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  # Other tunables are kept, colon-separated.
  env = host.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, "always")
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  # Already set, either way (also what stops the restarted process restarting again).
  assert host.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc, thp) is None
  assert host.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, glibc, thp) is None
  assert host.huge_pages_env({"PERL_JAX_HUGE_PAGES": "0"}, glibc, thp) is None  # opted out
  assert host.huge_pages_env({}, (2, 34), thp) is None  # the tunable came with glibc 2.35
  assert host.huge_pages_env({}, None, thp) is None  # not glibc (musl, macOS)
  assert host.huge_pages_env({}, glibc, "never") is None  # the kernel has them off
  assert host.huge_pages_env({}, glibc, None) is None  # or no THP at all


def test_started_as_reads_the_interpreters_module_flag():
  assert host.started_as("perl_jax.train", ["python", "-m", "perl_jax.train", "--config=x"])
  assert host.started_as("perl_jax.train", ["python", "-X", "importtime", "-m", "perl_jax.train"])
  assert not host.started_as("perl_jax.train", ["python", "-m", "perl_jax.generate"])
  assert not host.started_as("perl_jax.train", ["python", "-m"])
  # A kernel or another program that runs the module with runpy was not started as it.
  assert not host.started_as("perl_jax.train", ["python", "-m", "ipykernel_launcher", "-f",
                                                "kernel.json"])
  assert not host.started_as("perl_jax.train", ["python", "-c", "import runpy"])


# A module that prints each start (a restart runs it again, same PID), then how much of a
# mapped 64 MiB buffer the kernel backs with huge pages (AnonHugePages of its mapping).
_RESTART_PROBE = r"""
import os
print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
from perl_jax import host
if __name__ == "__main__":
  host.restart_with_huge_pages("hp_probe")
import numpy as np
buf = np.ones(64 << 20, np.uint8)
addr = buf.ctypes.data
inside = False
for line in open("/proc/self/smaps"):
  head = line.split()[0]
  if "-" in head and ":" not in head:
    lo, hi = (int(x, 16) for x in head.split("-"))
    inside = lo <= addr < hi
  elif inside and head == "AnonHugePages:":
    print("huge_kb", line.split()[1])
"""


def _restart_probe(tmp_path, *command: str, **env) -> tuple[list[list[str]], int]:
  (tmp_path / "hp_probe.py").write_text(_RESTART_PROBE)
  out = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True,
                       cwd=tmp_path, env={k: v for k, v in {**os.environ, **env}.items()
                                          if v is not None}).stdout.split("\n")
  starts = [line.split()[1:] for line in out if line.startswith("start")]
  huge_kb = [int(line.split()[1]) for line in out if line.startswith("huge_kb")]
  assert len(huge_kb) == 1, out
  return starts, huge_kb[0]


def test_restart_with_huge_pages_restarts_once_and_the_buffers_get_huge_pages(tmp_path):
  # Whether it applies on this machine (glibc >= 2.35, huge pages not "never"): on CI it does.
  applies = host.huge_pages_env({}, host._glibc_version(), host._thp_mode()) is not None
  fresh = dict(GLIBC_TUNABLES=None, PERL_JAX_HUGE_PAGES=None)
  starts, huge_kb = _restart_probe(tmp_path, "-m", "hp_probe", **fresh)
  if applies:
    assert len(starts) == 2 and starts[0][0] == starts[1][0]  # one restart, the same process
    assert starts[0][1] == "-" and starts[1][1] == "glibc.malloc.hugetlb=1"
    assert huge_kb >= 32 << 10  # most of the 64 MiB on 2 MiB pages
  else:
    assert len(starts) == 1 and (huge_kb == 0 or host._thp_mode() == "always")
  never_restarted = [
      _restart_probe(tmp_path, "-m", "hp_probe", GLIBC_TUNABLES=None, PERL_JAX_HUGE_PAGES="0"),
      # Run as __main__ by another program (as IPython's %run -m does): that program's
      # command line must not be re-executed.
      _restart_probe(tmp_path, "-c", "import runpy; runpy.run_module('hp_probe', "
                     "run_name='__main__')", **fresh)]
  for starts, huge_kb in never_restarted:
    assert len(starts) == 1
    if host._thp_mode() == "madvise":
      assert huge_kb == 0  # and so 4 KiB pages: what the restart changes


def test_the_entry_points_restart_with_huge_pages(tmp_path):
  # A config file is executed by `perl_jax.train` after its start-up: it reports what the
  # process it runs in sees, then ends it.
  cfg = tmp_path / "probe.py"
  cfg.write_text("import os\n\ndef get_config():\n"
                 "  print('tunables', os.environ.get('GLIBC_TUNABLES', '-'), flush=True)\n"
                 "  os._exit(0)\n")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
  out = subprocess.run([sys.executable, "-m", "perl_jax.train", f"--config={cfg}"],
                       capture_output=True, text=True, env=env, check=True).stdout
  want = ("glibc.malloc.hugetlb=1" if host.huge_pages_env({}, host._glibc_version(),
                                                          host._thp_mode()) else "-")
  assert f"tunables {want}" in out.splitlines()
