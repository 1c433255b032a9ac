"""Orbax checkpoints of converted models: the fast path (no PyTorch, no re-conversion).

Layout: ``DIR/jaxdiff.json`` (model class, config, dtype) and ``DIR/state`` (orbax
StandardCheckpointer of the parameter tree). Loading builds the module structure with
``nnx.eval_shape`` and restores straight into it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.convert import FAMILIES, abstract_model, family_of

_META = "jaxdiff.json"


def _class_name(model) -> str:
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(f"cannot checkpoint a {name}; supported: {sorted(FAMILIES)}")
    return name


def save_model(model, directory, *, overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True)")
    directory.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    dtype = jax.tree.leaves(state)[0].dtype
    meta = {"class_name": _class_name(model), "config": model.config.to_dict(),
            "dtype": np.dtype(dtype).name}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(directory / "state", nnx.to_pure_dict(state), force=overwrite)
    (directory / _META).write_text(json.dumps(meta, indent=1))
    return directory


def is_checkpoint(directory) -> bool:
    return (Path(directory) / _META).exists()


def load_model(directory):
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not is_checkpoint(directory):
        raise FileNotFoundError(f"{directory} is not a jaxdiff checkpoint (no {_META})")
    meta = json.loads((directory / _META).read_text())
    family = family_of(meta["class_name"])
    config = family.config_cls.from_dict(meta["config"])
    dtype = jnp.dtype(meta["dtype"])
    graphdef, abs_state = nnx.split(abstract_model(family, config, dtype))
    target = nnx.to_pure_dict(abs_state)
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(directory / "state", target)
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state)
