"""Read ``*.safetensors`` (single or sharded) as zero-copy NumPy views of a memory map.

No torch: the format is an 8-byte header length, a JSON header and raw little-endian data.
Memory-mapping lets conversion stream a multi-GB UNet through one transpose per tensor
instead of a read, a copy and a transpose.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array in a 64-byte-aligned buffer: XLA:CPU adopts such host buffers
    without copying (``device_put`` is free)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + align, np.uint8)
    offset = (-buf.ctypes.data) % align
    return buf[offset:offset + n].view(dtype).reshape(shape)


class SafetensorsError(ValueError):
    pass


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """-> (the JSON header without ``__metadata__``, the byte offset where data begins)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: too small to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if end - start != count * np.dtype(_DTYPES[info["dtype"]]).itemsize or 8 + n + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} byte range does not match its shape")
    return header, 8 + n


def dtype_of(info: dict) -> np.dtype:
    return np.dtype(_DTYPES[info["dtype"]])


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """name -> read-only array view of the file (kept alive by the arrays themselves)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SafetensorsError(f"{path}: too small to be a safetensors file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (n,) = struct.unpack("<Q", mm[:8])
    if 8 + n > size:
        raise SafetensorsError(f"{path}: header length {n} exceeds the file size {size}")
    header = json.loads(bytes(mm[8:8 + n]))
    base = 8 + n
    buf = memoryview(mm)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end - start != count * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} byte range does not match its shape")
        arr = np.frombuffer(buf[base + start:base + end], dtype=dtype, count=count)
        out[name] = arr.reshape(shape)
    return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write NumPy arrays as safetensors (used by tests and the `convert --to-safetensors` path)."""
    names = {np.dtype(v).name: k for k, v in _DTYPES.items()}
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": names[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.reshape(-1).view(np.uint8).data)
