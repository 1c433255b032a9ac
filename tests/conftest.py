import os

# Set before jax initialises its backend (subprocesses the tests start inherit them):
# - 8 fake CPU devices for the sharding tests;
# - LLVM backend optimisation level 0. The suite's time is mostly XLA:CPU compilation of
#   tiny models whose programs then run for milliseconds: at level 0 the tiny SD UNet's
#   sampling loop compiles in 2.6 s instead of 4.0 s and runs in 0.42 s instead of 0.21 s.
#   The HLO and its numerics are XLA's (no fast-math either way); only machine-code
#   optimisation is skipped;
# - XLA:CPU's loop fusion emitters instead of the MLIR ones (xla_cpu_use_fusion_emitters):
#   compilation a third to a half shorter, run time the same (test_paradigms, test_drivers,
#   test_sdxl_pipeline and test_tuning on 2 workers: 364 s -> 210 s). Fusions may round
#   differently in the last ulps.
# Benchmarks and users run at XLA's defaults.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_cpu_use_fusion_emitters=false").strip()

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
