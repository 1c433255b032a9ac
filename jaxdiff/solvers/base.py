"""What every solver shares: the pytree dataclass, model-output conversions, config checks.

A solver is a frozen dataclass registered as a pytree. Per-step tables (timesteps, alphas,
sigmas, multistep coefficients; arrays of length ``num_steps``) are leaves, so a driver takes
the solver as a ``jax.jit`` argument and indexes the tables with the traced step index ``i``
inside ``lax.scan``. Options that change the program (prediction type, order, clipping) are
static fields. All tables are computed once on the host in float64 from diffusers' float32
schedule and stored as float32.

Interface (``Solver``)::

    timesteps                      # [num_steps] float32: the t passed to the model, in order
    num_steps                      # static int, == len(timesteps): one per model evaluation
    prediction_type                # "epsilon" | "v_prediction" | "sample"
    init_noise_sigma               # x = x_T * init_noise_sigma before the first step
    stochastic                     # static bool: step consumes its noise argument
    scale_model_input(x, i)        # model input at step i
    init(x) -> state               # NamedTuple of fixed-shape arrays (multistep history)
    step(state, i, x, model_output, noise) -> (x_next, state)

Solvers declare their Picard support as ``picard``: "single" ones have
``picard_terms(i, x, model_output) -> (drift, noise_scale)`` with
``x_{i+1} = x_i + drift + noise_scale * noise_i`` (ParaDiGMS sums these over a window),
"multistep" ones ``picard_history`` / ``picard_step`` / ``picard_multistep`` over a history
of data predictions; both have ``picard_variance()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.schedule_files import FORMAT as RATIOS_FORMAT
from jaxdiff.schedule_files import load_ratios, load_schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def static_field(**kw):
    return dataclasses.field(metadata={"static": True}, **kw)


def solver_dataclass(cls):
    """Frozen dataclass + pytree registration (fields with ``static_field`` are metadata)."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


class EmptyState(NamedTuple):
    """State of solvers without history."""


def f32(a) -> jax.Array:
    return jnp.asarray(np.asarray(a, np.float64).astype(np.float32))


class Solver:
    """Base class: defaults for solvers without input scaling, state or noise."""

    stochastic = False          # overridden by a static field where it depends on options
    # Picard support, declared: "single" (picard_terms), "multistep" (picard_history,
    # picard_step, picard_multistep) or None; picard_unsupported says why not, where it
    # depends on the options
    picard = None
    picard_unsupported = None

    def scale_model_input(self, x, i):
        return x

    def init(self, x):
        return EmptyState()

    def step(self, state, i, x, model_output, noise):
        raise NotImplementedError

    def picard_terms(self, i, x, model_output):
        raise NotImplementedError(f"{type(self).__name__} is a multistep solver: its step depends "
                                  "on history, so it has no single-step Picard split")

    def data_prediction(self, i, x, model_output):
        """x0 predicted at step i from x and the model output (after clipping/thresholding)."""
        raise NotImplementedError(f"{type(self).__name__} has no data prediction")

    def output_for_x0(self, i, x, x0):
        """The model output at step i whose data prediction is ``x0`` (ParaSolver fills new
        window positions by steps with the data prediction held fixed)."""
        raise NotImplementedError(f"{type(self).__name__} has no x0 -> output map")

    def picard_variance(self):
        """[num_steps] per-step noise variance that scales ParaDiGMS' tolerance: the error of
        the latent entering step k is compared with tolerance^2 * picard_variance()[k]."""
        raise NotImplementedError(f"{type(self).__name__} does not support ParaDiGMS")

    def with_ratios(self, ratios, *, expect_timesteps=None) -> "Solver":
        """This solver with TimeTuner ratios: at step i the network is asked at the time of
        ratios[i] * t_i while the update keeps step i's coefficients (Xia et al. 2024).

        ``ratios``: [num_steps] positive numbers, or the path of a ratios JSON file written by
        ``tuning.save_ratios`` (whose meta, when it records ``timesteps``, must match this
        solver's grid). For discrete-time models TimeTuner's continuous time of timestep t
        is (t + 1) / T, so the network time becomes ``ratios[i] * (t_i + 1) - 1``. Only the
        ``timesteps`` table (what drivers pass to the model) changes, so ``jaxdiff.sample``,
        ``jaxdiff.paradigms`` and the pipelines sample with tuned ratios unchanged; ratios of
        all ones give back this solver exactly.
        """
        meta = {}
        if isinstance(ratios, (str, bytes)) or hasattr(ratios, "__fspath__"):
            ratios, meta = load_ratios(ratios)
        r = np.asarray(ratios, np.float64)
        ts = np.asarray(self.timesteps, np.float64)
        name = type(self).__name__
        if r.ndim != 1 or r.shape[0] != ts.shape[0]:
            raise ValueError(f"{name}: ratios must be 1-D with one entry per model evaluation "
                             f"({ts.shape[0]}), got shape {r.shape}")
        if not np.all(np.isfinite(r)) or np.any(r <= 0):
            raise ValueError(f"{name}: ratios must be finite and positive, got {r.tolist()}")
        want = meta.get("timesteps") if expect_timesteps is None else expect_timesteps
        if want is not None:
            want = np.asarray(want, np.float64).reshape(-1)
            if want.shape != ts.shape or not np.allclose(want, ts, rtol=0, atol=1e-3):
                raise ValueError(f"{name}: these ratios were tuned for timesteps "
                                 f"{want.tolist()}, but the solver's timesteps are "
                                 f"{ts.tolist()} (same solver, steps and spacing needed)")
        return dataclasses.replace(self, timesteps=f32(r * (ts + 1.0) - 1.0))

    # a solver whose tables can be rebuilt on any time grid names its family here
    # ("ddim", "dpmsolver++": the ``solver`` field of a schedule file) and implements
    # ``_on_grid(noise_schedule, t, network_times)``
    grid_family = None

    def grid_alpha_bars(self) -> np.ndarray:
        """alpha_bar at the points of this solver's own time grid (to check a schedule file
        against the noise schedule this solver was built from)."""
        raise NotImplementedError

    def with_schedule(self, schedule) -> "Solver":
        """This solver on a learned time grid (a schedule file written by
        ``jaxdiff.schedule_files.save_schedule`` / ``jaxdiff tune``, or its dict): step i
        moves from t[i] to t[i + 1] with the network asked at network_t[i]. The file must
        have been made for this solver family, this step count and this noise schedule
        (its alpha_bar table is compared with this solver's tables), else ValueError says
        which. Static options (prediction type, clipping, thresholding) stay this solver's.
        A TimeTuner ratios file is accepted too (``with_ratios``).
        """
        doc = load_schedule(schedule)
        name = type(self).__name__
        if doc["format"] == RATIOS_FORMAT:
            return self.with_ratios(schedule)
        where = doc["where"]
        if self.grid_family is None:
            raise ValueError(f"{name} cannot take a learned time grid ({where}); the solvers "
                             f"that can are DDIM and DPMSolverPP")
        if doc["solver"] != self.grid_family:
            raise ValueError(f"{where} was made for solver {doc['solver']!r}, not for "
                             f"{name} ({self.grid_family!r})")
        if doc["num_steps"] != self.num_steps:
            raise ValueError(f"{where} was made for {doc['num_steps']} steps, but this "
                             f"{name} has {self.num_steps}")
        ac = np.asarray(doc["alphas_cumprod"], np.float64)
        mine = np.asarray(self.grid_alpha_bars(), np.float64).reshape(-1)
        near = np.min(np.abs(mine[:, None] - ac[None, :]) / ac[None, :], axis=1)
        if np.any(near > 1e-4):
            bad = int(np.argmax(near))
            raise ValueError(
                f"{where} was made for another noise schedule: this {name}'s alpha_bar "
                f"{mine[bad]:.6g} (grid point {bad}) is not in the file's alpha_bar table "
                f"({ac.size} training steps, {ac[0]:.6g} .. {ac[-1]:.6g}); build the "
                f"solver from the model's own scheduler config")
        from jaxdiff.schedules import NoiseScheduleVP, model_input_time
        ns = NoiseScheduleVP("discrete", alphas_cumprod=doc["alphas_cumprod"])
        t = jnp.asarray(doc["t"], jnp.float32)
        times = model_input_time(ns, jnp.asarray(doc["network_t"], jnp.float32))
        return self._on_grid(ns, t, times, doc["options"], where)

    def _on_grid(self, noise_schedule, t, network_times, options, where):
        raise NotImplementedError

    def with_network_times(self, times) -> "Solver":
        """This solver with the network asked at ``times`` [num_steps] (in the network's
        units) while every update keeps its coefficients. ``times`` may be traced: this is
        how TimeTuner's ratios (and gradients with respect to them) enter ``jaxdiff.sample``."""
        times = jnp.asarray(times)
        if times.shape != (self.num_steps,):
            raise ValueError(f"{type(self).__name__}: network times must have shape "
                             f"[num_steps] = ({self.num_steps},), got {tuple(times.shape)}")
        if not jnp.issubdtype(times.dtype, jnp.floating):
            times = times.astype(jnp.float32)
        return dataclasses.replace(self, timesteps=times)

    # solvers whose per-step tables can be cut at any step (``segment``)
    segmentable = False

    def segment(self, start: int = 0, stop=None) -> "Solver":
        """Steps ``start`` .. ``stop - 1`` of this solver as a solver of their own: the later
        start of image-to-image (strength) and the base/refiner hand-over of SDXL
        (``denoising_end`` / ``denoising_start``), as diffusers' ``set_begin_index`` and its
        early stop. Tables are cut on the host; a multistep solver warms up again at its new
        first step (it has no history there), while the final-step order rules keep counting
        from the full schedule, as in diffusers. The result runs under every sampler.
        Start a segment from a latent made by ``add_noise(x0, noise, start)`` of the full
        solver (or a previous segment's output), divided by the segment's
        ``init_noise_sigma`` (which the drivers multiply back)."""
        n, name = self.num_steps, type(self).__name__
        start = int(start)
        stop = n if stop is None else int(stop)
        if not 0 <= start < stop <= n:
            raise ValueError(f"{name}: a segment needs 0 <= start < stop <= {n} steps, got "
                             f"start={start}, stop={stop}")
        if (start, stop) == (0, n):
            return self
        if not self.segmentable:
            raise ValueError(f"{name} cannot run part of its steps (image-to-image strength, "
                             f"denoising_start/end); use DDIM, DDPM, Euler, Euler a or "
                             f"DPM-Solver++")
        cut = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("static") or not jnp.ndim(value):
                continue
            size = jnp.shape(value)[0]
            if size == n:
                cut[f.name] = value[start:stop]
            elif size == n + 1:
                cut[f.name] = value[start:stop + 1]
            else:  # pragma: no cover - a table layout segment does not know
                raise ValueError(f"{name}: table {f.name} has {size} rows for {n} steps")
        out = dataclasses.replace(self, num_steps=stop - start, **cut)
        return out._restart(start) if start else out

    def _restart(self, start: int) -> "Solver":
        """A segment that begins at step ``start`` > 0 of the full schedule (multistep solvers
        drop to lower order there)."""
        return self

    def add_noise(self, x0, noise, i):
        """The latent at step i for clean latents x0 and standard-normal noise (diffusers'
        ``scheduler.add_noise`` at ``timesteps[i]``)."""
        raise NotImplementedError(f"{type(self).__name__} has no add_noise")

    def __len__(self):
        return self.num_steps


class VPPrediction:
    """Data prediction and its inverse for solvers with VP tables ``sqrt_abar`` /
    ``sqrt_1m_abar`` and diffusers' clipping / thresholding fields (DDPM, DDIM)."""

    def _post(self, x0):
        return postprocess_x0(x0, thresholding=self.thresholding, clip_sample=self.clip_sample,
                              clip_sample_range=self.clip_sample_range,
                              dynamic_thresholding_ratio=self.dynamic_thresholding_ratio,
                              sample_max_value=self.sample_max_value)

    def data_prediction(self, i, x, model_output):
        return self._post(vp_x0(self.prediction_type, model_output, x, at(self.sqrt_abar, i),
                                at(self.sqrt_1m_abar, i)))

    def output_for_x0(self, i, x, x0):
        return vp_output(self.prediction_type, x0, x, at(self.sqrt_abar, i),
                         at(self.sqrt_1m_abar, i))

    def add_noise(self, x0, noise, i):
        return (at(self.sqrt_abar, i) * x0 + at(self.sqrt_1m_abar, i) * noise).astype(x0.dtype)


class VEPrediction:
    """The same for k-diffusion (VE) solvers with ``sigmas`` [N + 1] (Euler, Euler a)."""

    def data_prediction(self, i, x, model_output):
        return ve_x0(self.prediction_type, model_output, x, at(self.sigmas, i))

    def output_for_x0(self, i, x, x0):
        return ve_output(self.prediction_type, x0, x, at(self.sigmas, i))

    def add_noise(self, x0, noise, i):
        return (x0 + at(self.sigmas, i) * noise).astype(x0.dtype)


def vp_step_variance(a_t, a_prev):
    """DDPM posterior variance of each step from abar_t, abar_prev [N]:
    (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), as diffusers' DDIM
    ``_get_variance`` (it ignores eta: the tolerance scale of its parallel scheduler)."""
    return (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)


def ve_step_variance(sigmas):
    """Ancestral (eta = 1) variance of each VE step from sigmas [N + 1]: sigma_up^2."""
    s, s_next = sigmas[:-1], sigmas[1:]
    return s_next ** 2 * (s ** 2 - s_next ** 2) / (s ** 2)


# ----------------------------------------------------------------------------- conversions
def vp_x0(prediction_type: str, model_output, x, alpha, sigma):
    """x0 prediction in the VP parametrisation x = alpha x0 + sigma eps (alpha, sigma are
    sqrt(abar), sqrt(1 - abar))."""
    if prediction_type == "epsilon":
        return (x - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * model_output
    return model_output


def vp_output(prediction_type: str, x0, x, alpha, sigma):
    """The model output whose x0 prediction at x is ``x0`` (inverse of ``vp_x0``): what the
    network would have to say for a given data estimate (ParaSolver's extrapolation)."""
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x - x0) / sigma
    return x0


def ve_output(prediction_type: str, x0, x, sigma):
    """Inverse of ``ve_x0``: the model output whose x0 prediction at x is ``x0``."""
    if prediction_type == "epsilon":
        return (x - x0) / sigma
    if prediction_type == "v_prediction":
        s2 = sigma * sigma + 1
        return (x / s2 - x0) * jnp.sqrt(s2) / sigma
    return x0


def vp_eps(prediction_type: str, model_output, x, alpha, sigma):
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x
    return (x - alpha * model_output) / sigma


def ve_x0(prediction_type: str, model_output, x, sigma):
    """x0 prediction in the VE parametrisation x = x0 + sigma eps (k-diffusion solvers;
    x here is the unscaled latent, the model saw x / sqrt(sigma^2 + 1))."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + x / (sigma * sigma + 1)
    return model_output


def threshold(x0, ratio: float, max_value: float):
    """Dynamic thresholding (Imagen): per sample, s = the ``ratio`` quantile of |x0| clamped
    to [1, max_value]; x0 -> clip(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1).astype(jnp.float32)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def postprocess_x0(x0, *, thresholding=False, clip_sample=False, clip_sample_range=1.0,
                   dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    if thresholding:
        return threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return jnp.clip(x0, -clip_sample_range, clip_sample_range)
    return x0


def push(history, value):
    """Append ``value`` to a [K, ...] history buffer, dropping the oldest (index 0)."""
    return jnp.concatenate([history[1:], value[None].astype(history.dtype)], axis=0)


def at(table, i):
    """Entry i of a per-step table, as a scalar of the table's dtype."""
    return jnp.asarray(table)[i]


# ----------------------------------------------------------------------------- config checks
# Keys of a diffusers scheduler config that never affect sampling.
METADATA_KEYS = frozenset({"_class_name", "_diffusers_version", "_use_default_values",
                           "_name_or_path"})


def choose(cfg: Mapping[str, Any], key: str, allowed, solver: str):
    value = cfg[key]
    if value not in allowed:
        raise ValueError(f"{solver}: unsupported {key}={value!r}; jaxdiff implements "
                         f"{list(allowed)}")
    return value


def require_default(cfg: Mapping[str, Any], defaults: Mapping[str, Any], keys, solver: str):
    """Options jaxdiff does not implement must keep diffusers' default (no-op) value."""
    for key in keys:
        if cfg[key] != defaults[key] and not (cfg[key] in (None, False, [], ())
                                              and defaults[key] in (None, False, [], ())):
            raise ValueError(f"{solver}: unsupported {key}={cfg[key]!r}; jaxdiff implements "
                             f"only {key}={defaults[key]!r}")


def schedule_from(cfg: Mapping[str, Any]):
    from jaxdiff.schedules import Schedule
    tb = cfg.get("trained_betas")
    return Schedule(num_train_timesteps=int(cfg["num_train_timesteps"]),
                    beta_start=float(cfg["beta_start"]), beta_end=float(cfg["beta_end"]),
                    beta_schedule=cfg["beta_schedule"],
                    trained_betas=None if tb is None else tuple(float(b) for b in tb),
                    rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)))


def check_prediction_type(cfg, solver: str, allowed=PREDICTION_TYPES) -> str:
    return choose(cfg, "prediction_type", allowed, solver)
