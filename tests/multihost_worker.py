"""One process of the two-process ParaDiGMS test (tests/test_paradigms_multihost.py).

    python tests/multihost_worker.py --process-id I --num-processes 2 --port P --out DIR

Each process gets 4 fake CPU devices, joins ``jax.distributed`` on ``localhost:P`` (process 0
runs the coordinator), builds a mesh over all 8 global devices and runs ``jaxdiff.paradigms``
on identical inputs (same latents, same noise, from fixed PRNG keys) with DDPM and
DPM-Solver++, each Picard method on one of them at least. Window evaluations then cross processes through the CPU collectives (gloo).
It writes ``DIR/result_I.npz`` (x_0 and stats per case, see ``run_cases``).

Importing this module has no side effects (jax is imported lazily), so the test imports it for
the model function, the inputs and ``run_cases``: one definition of the computation on both
sides of the comparison.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

import numpy as np

STEPS = 16
PARALLEL = 12          # not a multiple of 8 devices: the window is padded to 16
TOLERANCE = 0.05
SHAPE = (2, 4, 4, 3)
# (solver, options, Picard method): each method once, on a stochastic single-step and a
# deterministic multistep solver (test_paradigms crosses every method with both on 8 local
# devices)
CASES = [("ddpm", {}, "paradigms"), ("dpm++", {}, "parasolver"), ("dpm++", {}, "taa")]


def tag(name: str, method: str) -> str:
    return name.replace("+", "p") + ("" if method == "paradigms" else f"_{method}")
LOCAL_DEVICES = 4


@functools.lru_cache(maxsize=None)
def _alphas_cumprod() -> np.ndarray:
    from jaxdiff.zoo.digits.model import SCHEDULE, alphas_cumprod
    return np.asarray(alphas_cumprod(SCHEDULE))


def model_fn(x, t):
    """The exact epsilon of Gaussian data x0 ~ N(mu, c^2) under the digits schedule, plus a
    mild nonlinearity so the Picard iterations have something to converge (the analytic
    model of tests/test_paradigms.py)."""
    import jax.numpy as jnp

    table = _alphas_cumprod()
    abar = jnp.interp(t, jnp.arange(table.shape[0], dtype=jnp.float32), jnp.asarray(table))
    abar = abar.reshape(-1, *([1] * (x.ndim - 1)))
    a, s, c, mu = jnp.sqrt(abar), jnp.sqrt(1 - abar), 0.5, 0.2
    eps = s * (x - a * mu) / (abar * c * c + s * s)
    return eps + 0.05 * jnp.tanh(x)


def inputs():
    """Identical in every process: the same PRNG keys give the same draws."""
    import jax
    x_T = jax.random.normal(jax.random.PRNGKey(0), SHAPE)
    noise = jax.random.normal(jax.random.PRNGKey(1), (STEPS,) + SHAPE)
    return np.asarray(x_T), np.asarray(noise)


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) jax.Array as one full numpy array in this process."""
    import jax
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_cases(mesh=None) -> dict:
    """{f"{name}_x0", f"{name}_iterations", f"{name}_begins", ...} for every case."""
    import jaxdiff
    from jaxdiff import solvers
    from jaxdiff.zoo.digits.model import SCHEDULE

    x_T, noise = inputs()
    out = {}
    for name, kw, method in CASES:
        solver = solvers.make(name, SCHEDULE, STEPS, **kw)
        stochastic = bool(getattr(solver, "stochastic", False))
        x0, stats = jaxdiff.paradigms(model_fn, solver, x_T, parallel=PARALLEL,
                                      tolerance=TOLERANCE,
                                      noise=noise if stochastic else None, mesh=mesh,
                                      method=method)
        t = tag(name, method)
        out[f"{t}_x0"] = to_host(x0)
        out[f"{t}_iterations"] = np.int64(stats.iterations)
        out[f"{t}_evaluations"] = np.int64(stats.model_evaluations)
        out[f"{t}_begins"] = np.asarray(stats.begins)
        out[f"{t}_num_devices"] = np.int64(1 if mesh is None else mesh.devices.size)
        if mesh is not None:
            out[f"{t}_out_devices"] = np.int64(len(x0.sharding.device_set))
    return out


def _configure_environment():
    """Must run before jax is imported: 4 fake CPU devices, CPU only."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                               f"{LOCAL_DEVICES}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    _configure_environment()
    # this checkout's jaxdiff, whatever is installed in the environment
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0 = time.perf_counter()
    import jax

    # Cross-process collectives on CPU: gloo over TCP (jax's default when jax.distributed is
    # initialised; set explicitly so a changed default cannot turn this into a hang/error).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120)
    try:
        n_global = args.num_processes * LOCAL_DEVICES
        assert jax.process_index() == args.process_id, jax.process_index()
        assert jax.process_count() == args.num_processes, jax.process_count()
        assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
        assert jax.device_count() == n_global, jax.devices()
        print(f"[{args.process_id}] devices: {jax.devices()}", flush=True)

        import jaxdiff.parallel
        mesh = jaxdiff.parallel.make_mesh()
        assert mesh.devices.size == n_global
        result = run_cases(mesh)
        result["process_id"] = np.int64(jax.process_index())
        result["seconds"] = np.float64(time.perf_counter() - t0)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"result_{args.process_id}.npz")
        np.savez(path, **result)
        print(f"[{args.process_id}] " + ", ".join(
            f"{k}={int(v)}" for k, v in result.items() if k.endswith("iterations"))
            + f"; wrote {path} in {result['seconds']:.1f} s", flush=True)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
