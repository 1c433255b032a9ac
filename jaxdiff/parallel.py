"""Meshes, replication and the sharded window evaluation used by ParaDiGMS.

A mesh's window axis is named ``"data"``; an optional second axis ``"prompts"`` splits the
batch (many prompts, data-parallel), so a 2-D mesh runs windows x prompts at once. Everything
works the same on one host with
several devices, on fake CPU devices (``--xla_force_host_platform_device_count=8``) and
across hosts under ``jax.distributed`` (one process per host: every process runs the same
program on identical inputs; the mesh spans all processes' devices).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
PROMPTS = "prompts"


def make_mesh(devices=None, axis: str = DATA, *, prompts: int = 1) -> Mesh:
    """A mesh over ``devices`` (default: every device of every process): 1-D ``(axis,)``, or
    with ``prompts > 1`` 2-D ``("data", "prompts")`` of shape (devices / prompts, prompts)."""
    devices = jax.devices() if devices is None else list(devices)
    if isinstance(prompts, bool) or not isinstance(prompts, (int, np.integer)) or prompts < 1:
        raise ValueError(f"prompts must be a positive int, got {prompts!r}")
    if prompts == 1:
        return Mesh(np.asarray(devices), (axis,))
    if len(devices) % prompts:
        raise ValueError(f"{len(devices)} devices do not split into a prompts axis of "
                         f"{prompts}")
    grid = np.asarray(devices).reshape(len(devices) // prompts, prompts)
    return Mesh(grid, (DATA, PROMPTS))


def check_mesh(mesh: Mesh) -> int:
    """-> size of the mesh's window axis ``"data"`` (errors name what is wrong)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA not in mesh.axis_names:
        raise ValueError(f"the mesh needs an axis named {DATA!r} (the window axis); it has "
                         f"{mesh.axis_names}")
    extra = set(mesh.axis_names) - {DATA, PROMPTS}
    if extra:
        raise ValueError(f"unknown mesh axes {sorted(extra)}: jaxdiff uses {DATA!r} (window) "
                         f"and optionally {PROMPTS!r} (batch)")
    return int(mesh.shape[DATA])


def prompt_shards(mesh: Optional[Mesh]) -> int:
    """Size of the mesh's ``"prompts"`` (batch) axis, 1 without one."""
    if mesh is None or PROMPTS not in mesh.axis_names:
        return 1
    return int(mesh.shape[PROMPTS])


def place(tree, mesh: Mesh, spec: P = P()):
    """Put every array leaf of ``tree`` on the mesh with ``spec`` (default: replicated).

    Works across processes: each process supplies its (identical) local copy, so this is
    safe under ``jax.distributed`` where ``device_put`` onto non-addressable devices is not.
    Leaves already laid out that way are kept as they are.
    """
    sharding = NamedSharding(mesh, spec)

    def put(leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            return leaf
        if isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim):
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` on all of the mesh's devices (fully replicated)."""
    return place(tree, mesh, P())


def shard_batch(tree, mesh: Mesh, axis: int = 0):
    """Split every array leaf of ``tree`` along dimension ``axis`` (the batch) over the mesh's
    ``"prompts"`` axis, e.g. the conditioning of a model function for a 2-D mesh."""
    if PROMPTS not in mesh.axis_names:
        raise ValueError(f"the mesh has no {PROMPTS!r} axis to split the batch over "
                         f"(axes {mesh.axis_names})")
    k = int(mesh.shape[PROMPTS])
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and (len(leaf.shape) <= axis or leaf.shape[axis] % k):
            raise ValueError(f"cannot split an array of shape {tuple(leaf.shape)} along "
                             f"dimension {axis} into {k} prompt shards")
    return place(tree, mesh, P(*([None] * axis), PROMPTS))


def batch_leaf_specs(leaves, mesh: Mesh):
    """Per array leaf: ``P("prompts")`` if it is laid out split along its first dimension
    over the mesh's prompts axis (see ``shard_batch``), else ``P()`` (replicated)."""
    if PROMPTS not in mesh.axis_names:
        return tuple(P() for _ in leaves)
    want = NamedSharding(mesh, P(PROMPTS))
    specs = []
    for leaf in leaves:
        split = (isinstance(leaf, jax.Array)
                 and leaf.ndim >= 1 and leaf.sharding.is_equivalent_to(want, leaf.ndim))
        specs.append(P(PROMPTS) if split else P())
    return tuple(specs)


def window_evaluator(model_fn_call: Callable, mesh: Optional[Mesh], *,
                     chunk: Optional[int] = None, leaf_specs=None) -> Callable:
    """``f(leaves, x [W, B, ...], t [W, B], active [W]) -> [W, B, ...]``: the model over a
    window (``model_fn_call(leaves, x, t)``; ``leaves`` is a list of arrays).

    Without a mesh, one vmapped (batched) call over the window. With a mesh, the window axis
    W (a multiple of the mesh's data size) is split over ``"data"`` with ``shard_map``, and
    with a ``"prompts"`` axis the batch B too; ``leaf_specs`` (one ``PartitionSpec`` per
    leaf, default all replicated) says which leaves are split with the batch.
    ``chunk``: evaluate the (local) window ``chunk`` positions per call in a ``lax.map``
    instead of all at once: the same arithmetic in smaller batches (CPUs, where very large
    batches run slower per sample, or to bound memory); chunks with no ``active`` position
    (the window hanging past the end of the trajectory) are skipped and give zeros.
    """
    batched = jax.vmap(model_fn_call, in_axes=(None, 0, 0))

    def local(leaves, x, t, active):
        w = x.shape[0]
        if chunk is None or chunk >= w:
            return batched(leaves, x, t)
        k = -(-w // chunk)
        pad = k * chunk - w
        if pad:
            edge = lambda a, fill: jnp.concatenate(  # noqa: E731
                [a, jnp.broadcast_to(fill, (pad,) + a.shape[1:]).astype(a.dtype)])
            x, t, active = edge(x, x[-1:]), edge(t, t[-1:]), edge(active, False)
        split = lambda a: a.reshape((k, chunk) + a.shape[1:])  # noqa: E731
        shape = jax.eval_shape(lambda: batched(leaves, x[:chunk], t[:chunk]))

        def one(args):
            xc, tc, ac = args
            return jax.lax.cond(jnp.any(ac), lambda: batched(leaves, xc, tc),
                                lambda: jnp.zeros(shape.shape, shape.dtype))

        out = jax.lax.map(one, (split(x), split(t), split(active)))
        return out.reshape((k * chunk,) + out.shape[2:])[:w]

    if mesh is None:
        return local
    batch = P(DATA, PROMPTS) if PROMPTS in mesh.axis_names else P(DATA)
    return lambda leaves, x, t, active: jax.shard_map(
        local, mesh=mesh,
        in_specs=(list(leaf_specs) if leaf_specs is not None else P(), batch, batch, P(DATA)),
        out_specs=batch, check_vma=False)(leaves, x, t, active)


__all__ = ["DATA", "P", "PROMPTS", "batch_leaf_specs", "check_mesh", "make_mesh", "place",
           "prompt_shards", "replicate", "shard_batch", "window_evaluator"]
