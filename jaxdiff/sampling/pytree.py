"""Split a pytree into its array leaves (traced jit arguments) and a hashable static part.

Drivers take ``(model_fn, solver)`` as one pytree: ``partition`` returns the array leaves,
which become traced arguments of a jitted function, and a hashable description of the rest
(tree structure, Python callables, static options), which becomes a static argument; inside
the jitted function ``combine`` puts them back together. Non-hashable static leaves are
compared by identity, so a new object of that kind compiles again but never aliases.
"""

from __future__ import annotations

import jax
import numpy as np


class ByIdentity:
    """Static leaf that is not hashable: compare by identity."""

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, ByIdentity) and other.obj is self.obj


def is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def partition(tree):
    """-> (array leaves, hashable static description of everything else)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dynamic = [leaf if is_array(leaf) else None for leaf in leaves]
    static = []
    for leaf in leaves:
        if is_array(leaf):
            static.append(None)
            continue
        try:
            hash(leaf)
        except TypeError:
            leaf = ByIdentity(leaf)
        static.append((leaf,))
    return dynamic, (treedef, tuple(static))


def combine(dynamic, spec):
    treedef, static = spec
    leaves = [d if s is None else (s[0].obj if isinstance(s[0], ByIdentity) else s[0])
              for d, s in zip(dynamic, static)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


__all__ = ["ByIdentity", "combine", "is_array", "partition"]
