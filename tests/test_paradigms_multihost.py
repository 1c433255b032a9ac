"""ParaDiGMS under jax.distributed: two processes on localhost, 4 CPU devices each, one mesh
over all 8 devices (window evaluations cross processes through gloo CPU collectives), and the
result equals single-process sampling on 1 device without a mesh (test_paradigms shows 8 local
fake devices equal to 1 device for every method).

The workers (tests/multihost_worker.py) write their stdout/stderr to
``<pytest tmp dir>/multihost*/worker_{0,1}.{out,err}``; the path is printed (``pytest -s``)
and, on failure, the tails of both workers' logs are in the assertion message.
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker as worker

# `make test` runs pytest -n 2 --dist loadgroup: keep this file's tests on one xdist worker so
# the two-process run (a module fixture) happens once.
pytestmark = pytest.mark.xdist_group("multihost")

NUM_PROCESSES = 2
TIMEOUT = 300  # seconds, for both workers together
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TAGS = [worker.tag(name, method) for name, _, method in worker.CASES]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path, lines=40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


def _launch(out_dir):
    """Run both workers; returns (returncodes, logs message, seconds)."""
    port = _free_port()
    env = dict(os.environ)     # conftest's XLA flags: the worker sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    procs, logs = [], []
    t0 = time.perf_counter()
    try:
        for i in range(NUM_PROCESSES):
            out, err = (os.path.join(out_dir, f"worker_{i}.{s}") for s in ("out", "err"))
            logs.append((out, err))
            with open(out, "w") as fo, open(err, "w") as fe:
                procs.append(subprocess.Popen(
                    [sys.executable, WORKER, "--process-id", str(i), "--num-processes",
                     str(NUM_PROCESSES), "--port", str(port), "--out", str(out_dir)],
                    stdout=fo, stderr=fe, env=env, cwd=os.path.dirname(WORKER)))
        # Poll both: if one fails the other would wait for it until jax's own timeouts.
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.perf_counter() - t0 > TIMEOUT:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    seconds = time.perf_counter() - t0
    codes = [p.returncode for p in procs]
    message = f"workers exited with {codes} after {seconds:.0f} s (timeout {TIMEOUT} s)\n"
    for i, (out, err) in enumerate(logs):
        message += (f"\n---- worker {i} stderr ({err}) ----\n{_tail(err)}"
                    f"\n---- worker {i} stdout ({out}) ----\n{_tail(out, 10)}")
    return codes, message, seconds


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multihost")
    print(f"\nmultihost worker logs and results: {out_dir}")
    codes, message, seconds = _launch(out_dir)
    assert codes == [0] * NUM_PROCESSES, message
    results = [dict(np.load(out_dir / f"result_{i}.npz")) for i in range(NUM_PROCESSES)]
    print(f"two-process run: {seconds:.1f} s")
    return results


@pytest.fixture(scope="module")
def single_process():
    assert jax.process_count() == 1
    return worker.run_cases(mesh=None)


def test_two_processes_span_8_devices_and_agree(multihost):
    for i, r in enumerate(multihost):
        assert int(r["process_id"]) == i
    a, b = multihost
    for tag in TAGS:
        assert int(a[f"{tag}_num_devices"]) == 8 and int(a[f"{tag}_out_devices"]) == 8
        assert int(a[f"{tag}_evaluations"]) >= worker.STEPS
        # identical programs on identical inputs: bit-identical in both processes
        np.testing.assert_array_equal(a[f"{tag}_x0"], b[f"{tag}_x0"])
        assert int(a[f"{tag}_iterations"]) == int(b[f"{tag}_iterations"])
        np.testing.assert_array_equal(a[f"{tag}_begins"], b[f"{tag}_begins"])
    # the Picard windows did save iterations (DPM-Solver++ converges fast on this model)
    assert int(a["dpmpp_taa_iterations"]) < worker.STEPS


def test_multihost_equals_single_process(multihost, single_process):
    ref, reference = single_process, "1 device"
    for r in multihost:
        for tag in TAGS:
            assert r[f"{tag}_x0"].shape == worker.SHAPE
            np.testing.assert_allclose(r[f"{tag}_x0"], ref[f"{tag}_x0"], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{tag} vs {reference}")
            assert int(r[f"{tag}_iterations"]) == int(ref[f"{tag}_iterations"]), tag
            np.testing.assert_array_equal(r[f"{tag}_begins"], ref[f"{tag}_begins"],
                                          err_msg=tag)
