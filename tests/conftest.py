import os

# 8 fake CPU devices for sharding tests; must be set before jax initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# One on-disk XLA compilation cache per test run, shared by both xdist workers and every
# subprocess the tests start (notebook kernels, the CLI, benchmarks/device.py --smoke): a
# program that several modules compile (the digits UNet's sampling loops, the tiny
# pipelines' text encoders and VAE) is compiled once per run instead of once per module
# (jax.clear_caches() below drops the in-memory copies). The controller makes the folder
# before the workers start, so they inherit it; a run never sees another run's programs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdiff-test-xla-")
    os.environ["JAXDIFF_TEST_OWNS_XLA_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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


def pytest_sessionfinish(session, exitstatus):
    """The controller (or a plain single-process run) removes the run's compilation cache."""
    if os.environ.get("JAXDIFF_TEST_OWNS_XLA_CACHE") and not os.environ.get(
            "PYTEST_XDIST_WORKER"):
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# `make test-fast` (-m "not slow", the developer loop, about 8 minutes on 2 cores) runs these
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
