"""benchmarks/device.py (the prepared accelerator run) in its CPU smoke mode, so that the
script cannot rot between the sessions that have a device: every step runs and reports,
numbers that must agree do, and a budget that runs out skips steps cleanly."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device.py"


def _run(tmp_path, *args):
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((tmp_path / "device.json").read_text()), (tmp_path / "device.md").read_text()


@pytest.mark.slow
def test_smoke_run_every_step(tmp_path):
    data, md = _run(tmp_path, "--budget", "120")
    steps = data["steps"]
    assert [k for k, v in steps.items() if v["status"] != "ok"] == [], steps
    c = steps["1 correctness"]["vs_cpu_float32"]
    assert c["jaxdiff float32 xla"] < 1e-5 and c["diffusers float32"] < 1e-4
    assert 1e-4 < c["jaxdiff bfloat16 xla"] < 5e-2          # bf16 is bf16, and close
    rows = steps["2 forward"]["rows"]
    assert any(k.startswith("diffusers") for k in rows) and all(
        v["median_s"] > 0 for v in rows.values())
    assert steps["3 ddim-50 latency"]["ratio_diffusers_over_jaxdiff"] > 0
    for res in steps["4 parallel sampling"]["runs"].values():
        assert "sequential" in res and all(r["rounds"] >= 1 for k, r in res.items()
                                           if k != "sequential")
    assert steps["5 encoder propagation"]["speedup"] > 0
    assert "| 4 parallel sampling | ok |" in md


def test_budget_runs_out_cleanly(tmp_path):
    data, md = _run(tmp_path, "--budget", "1")
    assert {v["status"] for v in data["steps"].values()} == {"skipped"}
    assert "skipped" in md
