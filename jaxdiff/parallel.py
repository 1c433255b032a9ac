"""Meshes, replication and the sharded window evaluation used by ParaDiGMS.

A mesh's window/batch axis is named ``"data"``. Everything works the same on one host with
several devices, on fake CPU devices (``--xla_force_host_platform_device_count=8``) and
across hosts under ``jax.distributed`` (one process per host: every process runs the same
program on identical inputs; the mesh spans all processes' devices).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None, axis: str = DATA) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (axis,))


def check_mesh(mesh: Mesh) -> int:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named {DATA!r} (the window axis); it has "
                         f"{mesh.axis_names}")
    return int(mesh.shape[DATA])


def replicate(tree, mesh: Mesh):
    """Put every array leaf of ``tree`` on all of the mesh's devices (fully replicated).

    Works across processes: each process supplies its (identical) local copy, so this is
    safe under ``jax.distributed`` where ``device_put`` onto non-addressable devices is not.
    """
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            return leaf
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def window_evaluator(model_fn_call: Callable, mesh: Optional[Mesh]) -> Callable:
    """``f(leaves, x [W, B, ...], t [W, B]) -> [W, B, ...]``: the model over a window
    (``model_fn_call(leaves, x, t)``; ``leaves`` is a pytree of arrays, replicated).

    Without a mesh, one vmapped (batched) call. With a mesh, the window axis W (a multiple of
    the mesh's data size) is split over ``"data"`` with ``shard_map``: each device evaluates
    its W / devices positions with the replicated model function.
    """
    batched = jax.vmap(model_fn_call, in_axes=(None, 0, 0))
    if mesh is None:
        return batched
    return jax.shard_map(batched, mesh=mesh, in_specs=(P(), P(DATA), P(DATA)),
                         out_specs=P(DATA), check_vma=False)


__all__ = ["DATA", "check_mesh", "make_mesh", "replicate", "window_evaluator"]
