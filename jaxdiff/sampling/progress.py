"""One progress protocol for every driver and the tuner: ``progress(done, total)``.

``done`` is the number of steps (or iterations) finished so far and ``total`` the number
there are; drivers call it from inside their jitted loops through ``jax.debug.callback``
(``report``), host loops call it directly. ``resolve`` turns what a user passes into such
a callable: False/None (no progress), True (a tqdm bar) or any callable ``f(done, total)``.
The tqdm bars are module-level objects, one per description, so that passing
``progress=True`` twice does not recompile a jitted driver (the callback is a static
argument, compared by identity).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax

Progress = Callable[[int, int], None]


class TqdmBar:
    """A host-side tqdm bar fed with ``(done, total)``; a new run starts when ``done`` does
    not exceed what was already shown (e.g. the first step of the next call)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None
        self.shown = 0

    def __call__(self, done, total):
        done, total = int(done), int(total)
        if self.bar is None or done <= self.shown and done < total or self.bar.total != total:
            from tqdm.auto import tqdm
            if self.bar is not None:
                self.bar.close()
            self.bar, self.shown = tqdm(total=total, desc=self.desc), 0
        self.bar.update(max(done - self.shown, 0))
        self.shown = max(done, self.shown)
        if done >= total:
            self.bar.close()
            self.bar, self.shown = None, 0


_BARS: dict = {}


def tqdm_bar(desc: str) -> TqdmBar:
    """The module's bar for ``desc`` (one object per description: a stable static argument)."""
    if desc not in _BARS:
        _BARS[desc] = TqdmBar(desc)
    return _BARS[desc]


def resolve(progress: Union[bool, Progress, None], desc: str = "sampling") -> Optional[Progress]:
    """User input -> None or a host callable ``f(done, total)``."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return tqdm_bar(desc)
    if not callable(progress):
        raise ValueError(f"progress must be a bool or a callable f(done, total), got "
                         f"{progress!r}")
    return progress


def report(progress: Optional[Progress], done, total) -> None:
    """From inside jitted code: call ``progress(done, total)`` on the host (if any)."""
    if progress is not None:
        jax.debug.callback(progress, done, total)


__all__ = ["Progress", "TqdmBar", "report", "resolve", "tqdm_bar"]
