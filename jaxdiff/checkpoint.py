"""Checkpoints of converted models: the fast path (no PyTorch, no re-conversion).

Layout: ``DIR/jaxdiff.json`` (model class, config, dtype, format) and the parameters, in one
of two formats:
- ``DIR/state.safetensors`` (the default): every parameter already in jaxdiff's layout
  (NHWC kernels, (in, out) linears) under its NNX path. Loading reads each array once from
  the file into an aligned buffer that becomes the device array (no transposes, no
  decompression, on CPU no second copy): faster than converting the diffusers weights
  again, and several times faster than orbax's restore (benchmarks/loading.py).
- ``DIR/state`` (``format="orbax"``): an orbax StandardCheckpointer of the parameter tree,
  for code that manages its checkpoints with orbax (sharded restores, async saves).
Loading builds the module structure with ``nnx.eval_shape`` and fills it; a parameter the
file lacks, one it has that the module does not, or one of the wrong shape or dtype raises
``ValueError`` listing them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff.models.registry import abstract_model, class_name, model_classes
from jaxdiff.safetensors_io import aligned_empty, dtype_of, read_header, write_safetensors

_META = "jaxdiff.json"
_SAFETENSORS = "state.safetensors"
FORMATS = ("safetensors", "orbax")


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def save_model(model, directory, *, overwrite: bool = False,
               format: str = "safetensors") -> Path:
    """Write ``model`` (a converted jaxdiff module) to ``directory``; ``format``:
    "safetensors" (memory-mapped reload, the default) or "orbax"."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True)")
    directory.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    dtype = jax.tree.leaves(state)[0].dtype
    meta = {"class_name": class_name(model), "config": model.config.to_dict(),
            "dtype": np.dtype(dtype).name, "format": format}
    (directory / _META).unlink(missing_ok=True)      # a half-written checkpoint is none
    if format == "safetensors":
        flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
        write_safetensors({_key(path): np.asarray(leaf) for path, leaf in flat},
                          directory / _SAFETENSORS)
    else:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(directory / "state", nnx.to_pure_dict(state), force=overwrite)
    (directory / _META).write_text(json.dumps(meta, indent=1))
    return directory


def is_checkpoint(directory) -> bool:
    return (Path(directory) / _META).exists()


def _restore_safetensors(path: Path, target: dict, threads: int = 2) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    header, base = read_header(path)
    flat, tree = jax.tree_util.tree_flatten_with_path(target)
    keys = [_key(p) for p, _ in flat]
    missing = [k for k in keys if k not in header]
    unexpected = sorted(set(header) - set(keys))
    wrong = [f"{k}: file {header[k]['dtype']}{header[k]['shape']}, module "
             f"{np.dtype(a.dtype)}{list(a.shape)}" for k, (_, a) in zip(keys, flat)
             if k in header and (tuple(header[k]["shape"]) != tuple(a.shape)
                                 or dtype_of(header[k]) != np.dtype(a.dtype))]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit the module: missing {missing[:10]} "
                         f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
                         f"mismatched {wrong[:10]} ({len(wrong)})")
    fd = os.open(path, os.O_RDONLY)

    def one(k):
        # one read from the page cache straight into a 64-byte-aligned buffer, which
        # XLA:CPU adopts without another copy (as conversion does)
        info = header[k]
        out = aligned_empty(tuple(info["shape"]), dtype_of(info))
        view, start = memoryview(out.reshape(-1).view(np.uint8)), base + info["data_offsets"][0]
        while len(view):
            got = os.preadv(fd, [view], start)
            if got <= 0:
                raise ValueError(f"{path}: file ends inside tensor {k!r}")
            view, start = view[got:], start + got
        return jax.device_put(out)

    try:
        with ThreadPoolExecutor(threads) as pool:
            values = list(pool.map(one, keys))
    finally:
        os.close(fd)
    return jax.tree_util.tree_unflatten(tree, values)


def load_model(directory):
    directory = Path(directory).absolute()
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a jaxdiff checkpoint (no {_META})")
    meta = json.loads((directory / _META).read_text())
    model_cls, config_cls = model_classes(meta["class_name"])
    config = config_cls.from_dict(meta["config"])
    dtype = jnp.dtype(meta["dtype"])
    graphdef, abs_state = nnx.split(abstract_model(model_cls, config, dtype))
    target = nnx.to_pure_dict(abs_state)
    fmt = meta.get("format", "orbax")        # (checkpoints before the safetensors format)
    if fmt == "safetensors":
        restored = _restore_safetensors(directory / _SAFETENSORS, target)
    elif fmt == "orbax":
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(directory / "state", target)
    else:
        raise ValueError(f"{directory / _META}: unknown checkpoint format {fmt!r}; this "
                         f"jaxdiff reads {FORMATS}")
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state)
