"""The test suite's own persistent compilation cache (tests/conftest.py, tests/helpers.py): on
inside `persistent_compilation_cache`, where a program compiled before is loaded instead of
compiled; off again after it, so the tests after it compile everything as a user's run does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tests.helpers import persistent_compilation_cache

MISS, HIT = "/jax/compilation_cache/cache_misses", "/jax/compilation_cache/cache_hits"


def test_cache_serves_identical_programs_only_while_on(tmp_path):
  events = []
  listener = lambda event, **kw: events.append(event)
  jax.monitoring.register_event_listener(listener)
  try:
    _on_then_off(tmp_path, events)
  finally:
    jax.monitoring.unregister_event_listener(listener)


def _on_then_off(tmp_path, events: list):
  x = np.arange(5.0)

  def run():  # a new function each time (no in-memory hit), the same HLO
    return jax.jit(lambda x: jnp.cos(x) * 7.0 - x.max())(x).block_until_ready()

  with persistent_compilation_cache(tmp_path):
    run()
    assert MISS in events and HIT not in events  # compiled and written
    assert any(tmp_path.iterdir())
    events.clear()
    run()
    assert HIT in events and MISS not in events  # loaded, not compiled
  events.clear()
  run()
  assert HIT not in events and MISS not in events  # off again: compiled, cache not read
  assert jax.config.jax_compilation_cache_dir is None
