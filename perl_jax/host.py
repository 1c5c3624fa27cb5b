"""Host-process memory: give XLA's freed compiler heap back to the operating system.

Why
---
On CPU (and for the host side of every backend) compiling a program is the most
memory-hungry thing a run does: XLA:CPU's compile of PPO's update takes ~300 MB of heap
for a few seconds, many times the program's own buffers. glibc keeps freed heap in its
arenas rather than returning it, so every compile leaves the resident set higher and the
next compile starts from there: the peak RSS of a run becomes roughly the sum of its
compiles instead of the largest one. `malloc_trim(0)` returns free pages to the OS.

`trim_after_compiles()` registers a `jax.monitoring` listener on XLA's backend-compile event
that calls `malloc_trim(0)` after each compile. Compiles are rare (a handful per run) and a
trim takes milliseconds, so steady-state speed is unaffected; the figures are in
BUILD_NOTES.md (PPO iteration speed and memory). Where the C library has no
``malloc_trim`` (not glibc: macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Callable

import jax

log = logging.getLogger(__name__)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_installed = False


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc.malloc_trim
  except (OSError, AttributeError):
    return None


def trim() -> bool:
  """Returns freed heap to the OS now; False where the C library cannot."""
  fn = _malloc_trim()
  if fn is None:
    return False
  fn(0)
  return True


def trim_after_compiles() -> bool:
  """Calls `trim` after every XLA backend compile from now on (once per process).

  Returns whether trimming is available here.
  """
  global _installed
  if _malloc_trim() is None:
    log.debug("malloc_trim is not available: compiler heap stays with the process")
    return False
  if not _installed:
    def listener(event: str, duration_secs: float, **kwargs) -> None:
      del duration_secs, kwargs
      if event == _COMPILE_EVENT:
        trim()

    jax.monitoring.register_event_duration_secs_listener(listener)
    _installed = True
  return True
