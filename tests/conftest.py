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


# `make test-fast` (-m "not slow", the developer loop, about 10 minutes on 2 cores) runs these
# modules: solver parity step by step, the driver contract over every sampler, TimeTuner, time
# grids, conversion and model parity, guidance. Every other module (pipelines against
# diffusers, notebooks, subprocess runs, full-size architectures, the digits model end to
# end) counts as slow: `make test` and CI run everything.
FAST_MODULES = {"test_solvers", "test_drivers", "test_tuning", "test_time_grids",
                "test_conversion", "test_models_parity", "test_attention", "test_layers",
                "test_constraints", "test_guidance", "test_ratios"}


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] not in FAST_MODULES:
            item.add_marker(pytest.mark.slow)
