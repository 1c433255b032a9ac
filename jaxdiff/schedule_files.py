"""Schedule files: tuned ratios (and later learned time grids) as a small JSON file, read by jaxdiff.

The result of hours of tuning is K numbers; JSON keeps them readable, diffable and
loadable without jax or orbax. Ratios only make sense with the grid they were tuned on, so
``meta`` should carry it (``optimize_timesteps`` returns a ready ``log['meta']``).
Floats are written with Python's shortest round-trip repr: loading gives back the saved
values bit for bit.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Optional, Tuple

import numpy as np

FORMAT = "jaxdiff.tuning.ratios"   # kept: files written before the move stay readable
VERSION = 1


def _jsonable(obj):
    """numpy scalars/arrays -> Python numbers/lists, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) or (hasattr(obj, "shape") and hasattr(obj, "dtype")):
        return _jsonable(np.asarray(obj).tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def save_ratios(path, ratios, meta: Optional[dict] = None) -> pathlib.Path:
    """Write ``ratios`` [K] and a JSON-serialisable ``meta`` dict to ``path``."""
    arr = np.asarray(ratios)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise ValueError(f"ratios must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"ratios contain non-finite values: {arr.tolist()}")
    doc = {"format": FORMAT, "version": VERSION, "dtype": arr.dtype.name,
           "ratios": [float(v) for v in arr], "meta": _jsonable(dict(meta or {}))}
    try:
        text = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta is not JSON-serialisable: {err}") from err
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)          # atomic: a crash never leaves half a file
    return path


def load_ratios(path) -> Tuple[np.ndarray, dict]:
    """-> (ratios [K] in the saved dtype, meta)."""
    path = pathlib.Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not a ratios file (invalid JSON: {err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ratios file (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported ratios file version {doc.get('version')!r}; "
                         f"this jaxdiff reads version {VERSION}")
    values = doc.get("ratios")
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
        raise ValueError(f"{path}: \"ratios\" must be a non-empty list of finite numbers")
    ratios = np.asarray(values, dtype=np.float64).astype(np.dtype(doc.get("dtype", "float64")))
    return ratios, doc.get("meta", {})


# ------------------------------------------------------------------------ learned time grids
SCHEDULE_FORMAT = "jaxdiff.schedule"
SCHEDULE_VERSION = 1
GRID_SOLVERS = ("ddim", "dpmsolver++")       # solvers whose tables can be built on any grid


def schedule_fingerprint(alphas_cumprod) -> dict:
    """What a schedule file records of the noise schedule it was made for: the training
    step count and the alpha_bar table itself (1000 float32 numbers: small, and it lets a
    solver check the file against its own tables without knowing its config)."""
    ac = np.asarray(alphas_cumprod, np.float32).reshape(-1)
    if ac.size < 2 or not np.all(np.isfinite(ac)) or np.any(ac <= 0) or np.any(ac > 1):
        raise ValueError("alphas_cumprod must be a finite table of values in (0, 1]")
    return {"kind": "discrete", "num_train_timesteps": int(ac.size),
            "alphas_cumprod": [float(v) for v in ac]}


def check_time_grid(t, network_t=None, *, t_max: float = 1.0, t_min: float = 0.0,
                    where: str = "time grid") -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """-> (t [K+1], network_t [K]) as float64 after checking: finite, strictly decreasing,
    inside [t_min, t_max]; network times finite and inside the same range."""
    t = np.asarray(t, np.float64)
    if t.ndim != 1 or t.shape[0] < 2:
        raise ValueError(f"{where}: t must be 1-D with K + 1 >= 2 times, got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"{where}: t has non-finite values: {t.tolist()}")
    if np.any(np.diff(t) >= 0):
        bad = int(np.flatnonzero(np.diff(t) >= 0)[0])
        raise ValueError(f"{where}: t must be strictly decreasing, but t[{bad}]={t[bad]} "
                         f"<= t[{bad + 1}]={t[bad + 1]}")
    tol = 1e-9
    if t[0] > t_max + tol or t[-1] < t_min - tol:
        raise ValueError(f"{where}: t runs from {t[0]} to {t[-1]}, outside the schedule's "
                         f"[{t_min}, {t_max}]")
    if network_t is None:
        return t, None
    n = np.asarray(network_t, np.float64)
    if n.shape != (t.shape[0] - 1,):
        raise ValueError(f"{where}: network_t must have one time per step ({t.shape[0] - 1}), "
                         f"got shape {n.shape}")
    if not np.all(np.isfinite(n)) or np.any(n > t_max + tol) or np.any(n < t_min - tol):
        raise ValueError(f"{where}: network_t must be finite and inside [{t_min}, {t_max}], "
                         f"got {n.tolist()}")
    return t, n


def save_schedule(path, *, solver: str, t, network_t=None, alphas_cumprod,
                  options: Optional[dict] = None, meta: Optional[dict] = None) -> pathlib.Path:
    """Write a learned time grid: step i of ``solver`` moves from continuous time t[i] to
    t[i + 1] (t [K+1], jaxdiff's VP time: (n + 1) / N for training step n) and asks the
    network at ``network_t[i]`` (default t[i]). ``options`` are the solver's own (DPM-Solver++
    ``order``); ``meta`` is free (method, loss, tuning time)."""
    if solver not in GRID_SOLVERS:
        raise ValueError(f"solver must be one of {list(GRID_SOLVERS)}, got {solver!r}")
    fp = schedule_fingerprint(alphas_cumprod)
    n_total = fp["num_train_timesteps"]
    t, n = check_time_grid(t, network_t, t_max=1.0, t_min=1.0 / n_total - 1e-12)
    n = t[:-1] if n is None else n
    doc = {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION, "solver": solver,
           "num_steps": int(t.shape[0] - 1), "t": [float(v) for v in t],
           "network_t": [float(v) for v in n], "options": _jsonable(dict(options or {})),
           "noise_schedule": fp, "meta": _jsonable(dict(meta or {}))}
    try:
        text = json.dumps(doc, indent=1, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta/options are not JSON-serialisable: {err}") from err
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path


def load_schedule(source) -> dict:
    """A schedule (path or the dict ``save_schedule`` writes) -> the checked dict, with
    ``t``, ``network_t`` and ``alphas_cumprod`` as numpy arrays. A ratios file is returned
    as ``{"format": FORMAT, "ratios": ..., "meta": ...}`` (the TimeTuner special case)."""
    where = "schedule"
    if isinstance(source, dict):
        doc = source
    else:
        where = str(source)
        try:
            doc = json.loads(pathlib.Path(source).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not a schedule file (invalid JSON: {err})") from err
    if not isinstance(doc, dict):
        raise ValueError(f"{where} is not a schedule file (not a JSON object)")
    if doc.get("format") == FORMAT:
        if isinstance(source, dict):
            raise ValueError("pass a ratios file by its path (or the ratios array to with_ratios)")
        ratios, meta = load_ratios(source)
        return {"format": FORMAT, "ratios": ratios, "meta": meta}
    if doc.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{where} is not a schedule file (\"format\" is "
                         f"{doc.get('format')!r}, expected {SCHEDULE_FORMAT!r} or {FORMAT!r})")
    if doc.get("version") != SCHEDULE_VERSION:
        raise ValueError(f"{where}: unsupported schedule file version {doc.get('version')!r}; "
                         f"this jaxdiff reads version {SCHEDULE_VERSION}")
    if doc.get("solver") not in GRID_SOLVERS:
        raise ValueError(f"{where}: \"solver\" must be one of {list(GRID_SOLVERS)}, got "
                         f"{doc.get('solver')!r}")
    ns = doc.get("noise_schedule")
    if not isinstance(ns, dict) or "alphas_cumprod" not in ns:
        raise ValueError(f"{where}: no \"noise_schedule\" with \"alphas_cumprod\"")
    ac = np.asarray(schedule_fingerprint(ns["alphas_cumprod"])["alphas_cumprod"], np.float32)
    t, n = check_time_grid(doc.get("t"), doc.get("network_t"), t_max=1.0,
                           t_min=1.0 / ac.size - 1e-12, where=where)
    if n is None:
        n = t[:-1]
    if int(doc.get("num_steps", -1)) != t.shape[0] - 1:
        raise ValueError(f"{where}: num_steps={doc.get('num_steps')!r} but t has "
                         f"{t.shape[0]} times ({t.shape[0] - 1} steps)")
    out = dict(doc)
    out.update(t=t, network_t=n, alphas_cumprod=ac, where=where,
               options=dict(doc.get("options") or {}), meta=dict(doc.get("meta") or {}))
    return out
