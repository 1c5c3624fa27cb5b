"""Test setup: 8 host CPU devices so sharding tests can build real meshes.

XLA reads the flag when jax initialises its backend, so it is set here, before any test
module imports jax. Tests that do not shard simply run on device 0.
"""

import os

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
