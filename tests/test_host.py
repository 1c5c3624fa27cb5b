"""perl_jax.host: freed compiler heap goes back to the OS after each XLA compile."""

from __future__ import annotations

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
