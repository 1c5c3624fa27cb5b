"""The PPO benchmark's peak RSS is the measuring process's own, not its parent's.

Linux carries ``ru_maxrss`` across fork and exec, so the benchmark's per-configuration child,
started by a parent that had imported torch to write checkpoints, reported the parent's RSS
as its floor. `_peak_rss_mb` reads the child's own high-water mark (VmHWM).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from perl_jax.benchmarks.ppo_iteration import _peak_rss_mb

_CHILD = r"""
import resource
from perl_jax.benchmarks.ppo_iteration import _peak_rss_mb
print(_peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def test_child_peak_is_its_own_not_the_parents():
  ballast = np.ones(400 << 20, np.uint8)  # 400 MB resident in this (parent) process
  parent_mb = _peak_rss_mb()
  assert parent_mb >= 400
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       check=True).stdout.split()
  child_peak, child_maxrss = float(out[0]), float(out[1])
  del ballast
  assert child_maxrss >= 400  # what ru_maxrss says: the parent's memory, inherited
  assert child_peak < 200  # the child's own: Python, NumPy and the benchmark module
