import os

# 8 fake CPU devices for sharding tests; must be set before jax initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled XLA program after each test module.

    Each XLA:CPU executable holds a few memory mappings, and a pytest worker that runs
    hundreds of modules accumulates tens of thousands of them: at the kernel's
    vm.max_map_count (65530) the next compilation segfaults inside LLVM (seen as a worker
    crash in an arbitrary test). Clearing the caches between modules keeps a worker far
    below the limit; within a module, compiled programs are still reused."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
