"""perl_jax.host: freed compiler heap goes back to the OS; large buffers stay out of the heap;
the gradient programs' CPU compiler options compile the same math."""

from __future__ import annotations

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
