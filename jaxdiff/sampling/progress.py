"""One progress protocol for every driver and the tuner: ``progress(done, total)``.

``done`` is the number of steps (or iterations) finished so far and ``total`` the number
there are; drivers call it from inside their jitted loops through ``jax.debug.callback``
(``report``), host loops call it directly. ``resolve`` turns what a user passes into such
a callable: False/None (no progress), True (a tqdm bar) or any callable ``f(done, total)``.
The tqdm bars are module-level objects, one per description, so that passing
``progress=True`` twice does not recompile a jitted driver (the callback is a static
argument, compared by identity).

Step callbacks (``callback(step, timestep, latents)`` every ``callback_steps`` steps, e.g. to
keep previews) use the same route out of the jitted loop, with one difference: the user's
function is not part of the compiled program. The driver registers it under a fresh integer
token (``listening``), passes the token as a traced scalar and only ``callback_steps`` as a
static value, and the host-side dispatcher looks the function up by token. So a new
callback, or one whose state changes between calls, reuses the compiled program.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

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


StepCallback = Callable[[int, float, np.ndarray], None]
_LISTENERS: dict = {}             # token -> the user's callback, while its run lasts
_TOKENS = itertools.count(1)


@contextlib.contextmanager
def listening(callback: Optional[StepCallback], every: int = 1, driver: str = "sampling",
              x=None):
    """-> (every, token) for a driver's jitted loop: ``every`` static (0: no callback),
    ``token`` a traced int32 naming ``callback`` for the host dispatcher. On exit waits for
    the pending callbacks (``jax.effects_barrier``), then forgets the callback. ``x``: the
    driver's input, to refuse a callback when the driver itself is being traced."""
    if callback is None:
        yield 0, jnp.int32(0)
        return
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{driver}: callback= needs the driver called outside jax.jit / "
                         f"vmap (under a trace the run happens after this call returns); "
                         f"use progress= or return the trajectory instead")
    if not callable(callback):
        raise ValueError(f"{driver}: callback must be a callable f(step, timestep, latents), "
                         f"got {callback!r}")
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"{driver}: callback_steps must be a positive integer, got {every!r}")
    token = next(_TOKENS)
    _LISTENERS[token] = callback
    try:
        yield int(every), jnp.int32(token)
    finally:
        jax.effects_barrier()
        _LISTENERS.pop(token, None)


def _dispatch(token, step, timestep, latents):
    fn = _LISTENERS.get(int(token))
    if fn is not None:
        fn(int(step), float(timestep), np.asarray(latents))


def notify(every: int, token, before, done, total: int, timesteps, x) -> None:
    """From inside jitted code, after steps ``before .. done - 1`` (``done``: steps finished,
    ``x``: the latents after step ``done - 1``): call the step callback with that step if one
    of the finished steps is a multiple of ``every`` or the run is over (the final latents
    are always reported). Sequential drivers finish one step at a time, Picard windows
    several."""
    if not every:
        return
    before, done = jnp.asarray(before, jnp.int32), jnp.asarray(done, jnp.int32)
    hit = ((jnp.floor_divide(done - 1, every) > jnp.floor_divide(before - 1, every))
           | (done >= total)) & (done > before)
    last = jnp.clip(done - 1, 0, total - 1)
    jax.lax.cond(hit, lambda: jax.debug.callback(_dispatch, token, last,
                                                  jnp.asarray(timesteps)[last], x),
                 lambda: None)


__all__ = ["Progress", "StepCallback", "TqdmBar", "listening", "notify", "report", "resolve",
           "tqdm_bar"]
