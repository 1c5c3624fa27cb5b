"""Test setup: 8 host CPU devices so sharding tests can build real meshes.

XLA reads the flag when jax initialises its backend, so it is set here, before any test
module imports jax. Tests that do not shard simply run on device 0.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs each device's part of a program on one thread pool of max(PJRT_NPROC or the core
# count, devices) threads, and a collective needs a thread per device at once. With exactly 8
# threads, independent sharded programs in flight (e.g. an eager op per leaf) can each hold
# some threads in a rendezvous and deadlock; XLA aborts after 40 s. Spare threads avoid that.
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- JAX's persistent compilation cache, for tests that compile the same programs again -----
#
# Resume and determinism tests run one job several times (often in fresh processes); each run
# compiles exactly the programs the first one did, and on this CPU compiling is most of a short
# job's time. With the cache a later run loads the executables the first run compiled instead
# of compiling identical HLO again (the key covers the HLO, devices, compile options and
# versions), so the same machine code runs and bitwise comparisons between runs stay exact. The
# cache lives in this session's temporary directory (one per xdist worker) and is on only where
# a test asks for it, so every other test compiles as a user's run does (some inspect compiled
# programs or count compiles); tests/test_compilation_cache.py checks it turns off again.


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory):
  """This session's persistent compilation cache directory (for this xdist worker)."""
  return tmp_path_factory.mktemp("jax_compilation_cache")


@pytest.fixture(scope="session")
def compilation_cache_env(compilation_cache_dir) -> dict:
  """Environment variables that turn the cache on in a subprocess, every program cached."""
  return {"JAX_COMPILATION_CACHE_DIR": str(compilation_cache_dir),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture
def compilation_cache(compilation_cache_dir):
  """The cache on in this process for one test, off again after it."""
  from tests.helpers import persistent_compilation_cache

  with persistent_compilation_cache(compilation_cache_dir):
    yield compilation_cache_dir


@pytest.fixture(scope="session")
def tiny_ppo_assets(tmp_path_factory) -> dict:
  """`tests.helpers.tiny_lora_assets` with 64 prompts (8 batches of 8, so a resumed run
  restarts mid-epoch) for the PPO resume tests (test_checkpoint.py, test_multihost.py). Read
  only: tests write their runs elsewhere."""
  from tests.helpers import tiny_lora_assets

  return tiny_lora_assets(tmp_path_factory.mktemp("tiny_ppo"), prompts=64)


# --- Sharded PPO (tests/test_sharded_trainers.py, tests/test_phase_layouts.py) --------------


@pytest.fixture(scope="session")
def sharded_assets(tmp_path_factory, compilation_cache_dir) -> dict:
  """Tiny random models and 8 prompts for the 8-device tests (`tests.helpers.tiny_lora_assets`)
  and the compilation cache their PPO runs use."""
  from tests.helpers import tiny_lora_assets

  return dict(tiny_lora_assets(tmp_path_factory.mktemp("sharded")), cache=compilation_cache_dir)


@pytest.fixture(scope="session")
def ppo_mixed_run(sharded_assets):
  """PPO on the 2 x 2 x 2 mesh with one layout for all phases (`test_sharded_trainers.run_ppo`):
  compared with one device there, and the reference of the per-phase layouts in
  test_phase_layouts.py. Compiling it takes ~15 s; run once per session (xdist worker)."""
  from tests.test_sharded_trainers import MIXED, run_ppo

  return run_ppo(sharded_assets, "ppo_mixed", MIXED)
