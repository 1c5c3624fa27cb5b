"""Host-process memory: keep the heap of a long run close to what it actually holds, and
make the buffers XLA maps afresh on every call cheap to fault in.

Four measures, each measured in BUILD_NOTES.md (PPO iteration speed and memory):

* `restart_with_huge_pages` (the ``python -m`` entry points `perl_jax.train` and
  `perl_jax.benchmarks.ppo_iteration`): glibc's malloc backs the blocks it maps with
  transparent huge pages;
* `trim_after_compiles` (`perl_jax.train`, for every task): freed compiler heap goes back to
  the OS after every compile;
* `fix_mmap_threshold` (`ppo.train`): large buffers always get their own mappings, so they
  never fragment the heap;
* `gradient_compiler_options` (PPO's update programs): XLA:CPU's elemental emitters, which
  need less than half the compile-time memory.

Huge pages for mapped buffers
-----------------------------
XLA:CPU allocates each program's temporaries with `malloc` on every call and frees them
when it returns. glibc maps every block above the mmap threshold freshly (always above
32 MiB, and for a thread's own arena above its 64 MiB heap; `fix_mmap_threshold` lowers the
threshold to 8 MiB on purpose), so every call faults its temporaries in again, one 4 KiB
page at a time: in the PPO benchmark ~67,000 page faults and ~0.2 s of kernel time per
iteration, a fifth of all CPU time. With the tunable ``glibc.malloc.hugetlb=1`` (glibc
>= 2.35) malloc asks for transparent huge pages on those mappings (`madvise`), one fault per
2 MiB: the faults drop to 2,000-7,000 and the iteration to ~0.8x its time, with the same
peak RSS (the blocks are still returned on free). Tunables are read once, when the process
starts, so `restart_with_huge_pages` re-executes the command with the tunable set; it does
nothing where it cannot help (not Linux with glibc >= 2.35, huge pages disabled), when the
tunable is already set either way, or with ``PERL_JAX_HUGE_PAGES=0``.

Trimming after compiles
-----------------------
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
import os
import sys
from typing import Any, Callable, Mapping

# No jax import at module level: `restart_with_huge_pages` runs before the heavy imports of
# the entry points, so that restarting costs a bare interpreter start.

log = logging.getLogger(__name__)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_installed = False
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h
MMAP_THRESHOLD = 8 << 20
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "PERL_JAX_HUGE_PAGES"  # "0": never restart
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def _thp_mode() -> str | None:
  """The kernel's transparent-huge-page mode (always, madvise, never), None if unknown."""
  try:
    with open(_THP_MODE) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def huge_pages_env(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                   thp_mode: str | None) -> dict[str, str] | None:
  """`environ` with ``glibc.malloc.hugetlb=1`` added to GLIBC_TUNABLES, or None where
  restarting with it would not help: not glibc >= 2.35 (`glibc`: version, None if another C
  library), huge pages "never" or unknown (`thp_mode`), the tunable already set (to any
  value: the user's choice stands), or ``PERL_JAX_HUGE_PAGES=0``."""
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (environ.get(OPT_OUT) == "0" or glibc is None or glibc < (2, 35)
      or thp_mode not in ("always", "madvise") or HUGE_PAGES_TUNABLE + "=" in tunables):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(
      t for t in (tunables, HUGE_PAGES_TUNABLE + "=1") if t)}


def started_as(module: str, orig_argv: list[str]) -> bool:
  """Whether the interpreter's command line was ``python [options] -m module ...``."""
  return "-m" in orig_argv and orig_argv[orig_argv.index("-m") + 1:][:1] == [module]


def restart_with_huge_pages(module: str) -> None:
  """Re-executes this process's command line with `huge_pages_env`, where that applies.

  Call it first thing in the ``__main__`` guard of a ``python -m module`` entry point. It
  restarts only a process that was started that way: running the module from another
  program (``runpy``, IPython's ``%run -m``, a notebook kernel) must not restart the host
  program. The restarted process has the same PID, arguments and working directory; the
  environment variable it sets keeps it from restarting again. Returns (doing nothing) where
  `huge_pages_env` is None.
  """
  env = huge_pages_env(os.environ, _glibc_version(), _thp_mode())
  if env is None or not started_as(module, sys.orig_argv):
    return
  os.environ.update(env)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


@functools.cache
def _libc_fn(name: str) -> Callable[..., int] | None:
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, name)
  except (OSError, AttributeError):
    return None


def _malloc_trim() -> Callable[[int], int] | None:
  return _libc_fn("malloc_trim")


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
  import jax

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


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
  """Serves every allocation of `nbytes` or more from its own mapping, returned on free.

  glibc starts at 128 KiB but raises the threshold to the size of each mapped block that is
  freed, up to 32 MiB. XLA frees its multi-MiB temp and output buffers every step, so after
  the first step they come from the heap, where they interleave with long-lived allocations
  and leave holes the heap cannot give back: in the PPO benchmark steady-state RSS rose by
  ~80 MB over a few iterations. Setting the threshold explicitly turns the adjustment off.
  The price is mapping and faulting in those buffers on every call (measured on 4 KiB pages:
  PPO's generation took ~1.5% longer, the embedded default's SFT steps, ~20 ms each, ~35%;
  `restart_with_huge_pages` makes the faults 512 times fewer), so only `ppo.train` sets it,
  and the benchmark as ppo.train does. Process-wide and for good; returns False where the C
  library has no ``mallopt`` (not glibc).
  """
  mallopt = _libc_fn("mallopt")
  if mallopt is None:
    return False
  return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))


def gradient_compiler_options() -> dict[str, Any] | None:
  """`jax.jit` compiler options for PPO's update programs (`ppo.make_update_fn`).

  On the CPU backend, XLA's MLIR fusion emitters took ~300 MB of host memory to compile the
  PPO benchmark's policy update (1,089 fusions) and set the run's peak RSS; the elemental
  emitters compile the same program in ~130 MB, and it runs 2-6% slower (BUILD_NOTES.md has
  the A/B figures). Only PPO's update uses them: it is the compile that set the peak; the SFT
  and reward steps were not measured with them and keep XLA's defaults. Other backends keep
  their defaults (None).
  """
  import jax

  if jax.default_backend() != "cpu":
    return None
  return {"xla_cpu_use_fusion_emitters": False}
