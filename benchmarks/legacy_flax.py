"""Baseline: the legacy diffusers 0.39.0 Flax UNet (``FlaxUNet2DConditionModel``), in its own venv.

diffusers >= 0.40 dropped its Flax models, so this baseline cannot run in the project venv. This
module (run with the project's python) creates, once, a separate venv at
``benchmarks/.work/venv039`` with diffusers 0.39.0 and a jax/flax pair it works with, then runs
``legacy_flax_worker.py`` in it as a subprocess and returns the worker's JSON result.

Python::

    from benchmarks.legacy_flax import run_legacy_flax
    res = run_legacy_flax("benchmarks/.work/sd15_unet", sizes=(32, 64), batch=2, repeats=3)
    res["convert_s"], res["forward"]["64"]["median_s"]

CLI (prints the result dict as JSON on stdout; progress on stderr)::

    .venv/bin/python benchmarks/legacy_flax.py [UNET_FOLDER] [--sizes 32 64] [--batch 2] [--repeats 3]

UNET_FOLDER defaults to ``benchmarks/.work/sd15_unet`` (see ``common.make_sd15_unet_folder``).
See ``legacy_flax_worker.py`` for what is timed, the exact input recipe and the saved outputs
(``benchmarks/.work/legacy_out_{s}.npy``).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
VENV = WORK / "venv039"
WORKER = HERE / "legacy_flax_worker.py"
STAMP = VENV / ".jaxdiff_legacy_flax_stamp.json"
DEFAULT_UNET = WORK / "sd15_unet"

# Pinned requirements of the legacy venv. Any change here makes the stamp stale -> reinstall.
#
# diffusers/transformers/torch: as required for the baseline. torch MUST stay exactly 2.13.0: this
# machine has that CPU wheel locally; any other torch spec pulls a multi-GB CUDA build.
#
# jax/jaxlib/flax: the current PyPI releases (jax 0.10.2, flax 0.12.8; the same pair as the project
# venv) were tried first and work: diffusers 0.39's Flax models are plain flax.linen modules, and
# flax 0.12 still ships flax.linen. Checked on a tiny SD-style UNet converted with
# from_pt=True: the jitted Flax output matched diffusers' PyTorch UNet2DConditionModel to 4e-5
# (max |out| ~1.1). So no older fallback pins were needed. They are pinned exactly so that the
# baseline does not drift when jax/flax release again.
REQUIREMENTS = [
    "diffusers==0.39.0",
    "transformers==4.57.6",
    "torch==2.13.0",
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
]

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[legacy_flax +{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _clean_env() -> dict:
    """Environment for the venv039 processes: nothing of the project venv leaks in, no hub access."""
    env = dict(os.environ)
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"):
        env.pop(k, None)
    env["PYTHONNOUSERSITE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stamp_ok() -> bool:
    try:
        return json.loads(STAMP.read_text()).get("requirements") == REQUIREMENTS and venv_python().exists()
    except (OSError, ValueError):
        return False


def ensure_venv() -> Path:
    """Create venv039 and install REQUIREMENTS unless the stamp says it is already done.

    Idempotent; a file lock makes concurrent callers wait for one install. Returns the venv python.
    """
    WORK.mkdir(parents=True, exist_ok=True)
    if _stamp_ok():
        log(f"venv ok: {VENV}")
        return venv_python()
    with open(WORK / "venv039.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp_ok():  # someone else finished while we waited
            return venv_python()
        t0 = time.perf_counter()
        env = _clean_env()
        if not venv_python().exists():
            base = getattr(sys, "_base_executable", None) or sys.executable
            log(f"creating venv {VENV} with {base}")
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, env=env)
        log(f"installing {' '.join(REQUIREMENTS)} (takes a few minutes)")
        # pip's output goes to our stderr, so stdout stays reserved for the JSON result.
        subprocess.run([str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check",
                        *REQUIREMENTS], check=True, env=env, stdout=sys.stderr)
        check = subprocess.run(
            [str(venv_python()), "-c",
             "import jax, flax, diffusers; from diffusers import FlaxUNet2DConditionModel; "
             "print(jax.__version__, flax.__version__, diffusers.__version__)"],
            check=True, env=env, capture_output=True, text=True)
        install_s = time.perf_counter() - t0
        STAMP.write_text(json.dumps({"requirements": REQUIREMENTS, "install_s": install_s,
                                     "check": check.stdout.strip(),
                                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        log(f"venv ready in {install_s:.0f}s (jax, flax, diffusers = {check.stdout.strip()})")
    return venv_python()


def run_legacy_flax(unet_folder: str, sizes=(32, 64), batch: int = 2, repeats: int = 3) -> dict:
    """Benchmark diffusers 0.39's Flax UNet on a diffusers-format UNet folder (float32 safetensors).

    Creates/reuses venv039, runs ``legacy_flax_worker.py`` there and returns its result dict:
    ``{"versions": {...}, "convert_s": float, "forward": {"32": {"compile_s", "median_s", "times",
    "output"}, ...}, ...}``. Outputs are saved as ``benchmarks/.work/legacy_out_{s}.npy``.
    Adds ``"venv_install_s"`` (time of the one-off install, from the stamp) to the result.
    """
    folder = Path(unet_folder).resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers UNet folder (no config.json)")
    py = ensure_venv()
    with tempfile.NamedTemporaryFile(dir=WORK, prefix="legacy_flax_", suffix=".json", delete=False) as f:
        json_out = Path(f.name)
    cmd = [str(py), str(WORKER), str(folder), "--sizes", *map(str, sizes), "--batch", str(batch),
           "--repeats", str(repeats), "--out-dir", str(WORK), "--json-out", str(json_out)]
    log(f"running worker: {' '.join(cmd)}")
    try:
        # Worker progress -> our stderr; its stdout (a copy of the JSON) is dropped, the file is read.
        proc = subprocess.run(cmd, env=_clean_env(), stdout=subprocess.DEVNULL, stderr=None)
        if proc.returncode != 0:
            raise RuntimeError(f"legacy_flax_worker failed with exit code {proc.returncode}")
        result = json.loads(json_out.read_text())
    finally:
        json_out.unlink(missing_ok=True)
    try:
        result["venv_install_s"] = json.loads(STAMP.read_text()).get("install_s")
    except (OSError, ValueError):
        pass
    result["venv"] = str(VENV)
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="diffusers 0.39 Flax UNet baseline (own venv)")
    ap.add_argument("unet_folder", nargs="?", default=str(DEFAULT_UNET))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    res = run_legacy_flax(args.unet_folder, sizes=tuple(args.sizes), batch=args.batch, repeats=args.repeats)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
