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
