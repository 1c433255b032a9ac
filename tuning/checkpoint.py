"""Resumable tuning runs: orbax checkpoints of the optimisation state.

Tuning a real model takes hours of network evaluations; a preempted job must continue
where it stopped and end with exactly the ratios an uninterrupted run would have produced.
That works because every source of randomness is a function of (key, step index,
iteration) and the data are replayed from the start of the current pass, so a checkpoint
only has to hold the optimiser state, the finished ratios and the logs.

A run's settings are stored with each checkpoint (``fingerprint``): resuming a directory
written with other settings raises instead of silently mixing two runs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import numpy as np


def _normalise(d: dict) -> dict:
    return json.loads(json.dumps(d))


class RunCheckpoints:
    """Checkpoints of one tuning run in ``directory``, numbered by completed iterations."""

    def __init__(self, directory, fingerprint: dict, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.fingerprint = _normalise(fingerprint)
        # Synchronous saves: the state is tiny, and a SIGKILL can then never leave a
        # save half-done behind the last checkpoint the run reported. Temporary
        # directories of a save that a kill interrupted are removed on the next start.
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=False,
                                            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        """``state``: any pytree of arrays (stored leaf by leaf, so NamedTuple optimiser
        states and empty nodes need no special handling)."""
        ocp = self._ocp
        leaves = jax.tree_util.tree_leaves(state)
        arrays = {f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
        meta = {"fingerprint": self.fingerprint, "step": int(step)}
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, like: Any) -> Any:
        """The state saved at ``step``, with the structure, shapes and dtypes of ``like``."""
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        saved = meta.get("fingerprint")
        if saved != self.fingerprint:
            diff = sorted(k for k in set(saved or {}) | set(self.fingerprint)
                          if (saved or {}).get(k) != self.fingerprint.get(k))
            raise ValueError(f"checkpoint_dir {self.directory} holds a tuning run with "
                             f"different settings ({', '.join(diff)} differ); use a new "
                             f"directory or delete this one to start over")
        leaves, treedef = jax.tree_util.tree_flatten(like)
        abstract = {f"leaf_{i:04d}": jax.ShapeDtypeStruct(np.shape(leaf), np.asarray(leaf).dtype)
                    for i, leaf in enumerate(leaves)}
        arrays = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))["state"]
        restored = [np.asarray(arrays[f"leaf_{i:04d}"]) for i in range(len(leaves))]
        return jax.tree_util.tree_unflatten(treedef, restored)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
