"""Frozen config dataclasses built from diffusers / transformers ``config.json`` dicts.

``from_dict`` is strict: a key jaxdiff does not know raises ValueError naming it, so a
checkpoint that needs a feature we lack fails loudly instead of sampling garbage. Keys that
only carry bookkeeping (``_class_name``, ``_diffusers_version``, ...) are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


def _freeze(value):
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    # Keys accepted but not used (no numerical effect at inference).
    IGNORED: ClassVar[frozenset] = frozenset()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in d.items():
            if key.startswith("_") or key in cls.IGNORED:
                continue
            if key not in names:
                unknown.append(key)
                continue
            kwargs[key] = _freeze(value)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config field(s) {sorted(unknown)}; "
                             "jaxdiff does not know how to honour them")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    def _require(self, field: str, allowed) -> None:
        value = getattr(self, field)
        if value not in allowed:
            raise ValueError(f"{type(self).__name__}: unsupported {field}={value!r}; "
                             f"jaxdiff supports {list(allowed)}")


def per_block(value, n: int, field: str) -> tuple:
    """An int/str/bool/None broadcast to n blocks, or a length-n sequence checked."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"config field {field} has {len(value)} entries for {n} blocks")
        return tuple(value)
    return (value,) * n
