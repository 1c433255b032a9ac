"""``jaxdiff tune``: learn TimeTuner ratios for a model, write them with a loss log and a plot.

    jaxdiff tune --model digits --steps 10 --tune-type parallel --iters 500 \\
                 --out outputs/ratios.json [--checkpoint-dir ckpt] [--eval 100]

Writes three files next to each other:

* ``--out`` (e.g. ``ratios.json``): the ratios, via ``tuning.save_ratios``; its meta records
  the solver's timesteps in network units (``meta["timesteps"]``), which
  ``Solver.with_ratios`` checks, and the config of the jaxdiff solver whose steps are the
  tuned grid (``meta["scheduler_config"]``, ``meta["jaxdiff_solver"]``):

      solver = jaxdiff.solvers.make(meta["jaxdiff_solver"], meta["scheduler_config"], K,
                                    ratios="ratios.json")

* ``<stem>_loss.csv``: one row per (step index, iteration): iteration, index, loss, ratio;
* ``<stem>.png``: the loss curve of every tuned step, the ratio trajectories, and the
  learned ratios against the step.

The grids. DDIM is tuned on TimeTuner's reference grid: DDIM's "leading" spacing with
offset 1 and a last step to t = 1/N (alphas_cumprod[0], not alpha = 1), which is jaxdiff's
DDIM with ``timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False`` (and no
sample clipping: TimeTuner's sampler does not clip). DPM-Solver++'s "leading" spacing is
another grid (N // (K + 1) apart), so DPM-Solver++ is tuned on the timesteps of jaxdiff's
DPMSolverPP with ``timestep_spacing="leading", steps_offset=1,
final_sigmas_type="sigma_min"`` (its last step also ends at t = 1/N). ``solver_config``
returns these configs; the digits pipeline samples with them via ``solver=``:

    pipe(labels, solver=jaxdiff_solver(pipe.schedule, "ddim", K), ratios="ratios.json")

(the pipeline's own default grid is "trailing": ``Solver.with_ratios`` refuses the file
there, by design).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

MODELS = ("digits",)
METHODS = ("timetuner", "ld3", "gits")       # timetuner: ratios file; ld3/gits: schedule file
TUNE_TYPES = ("parallel", "sequential")      # tuning.TUNE_TYPES, default first
SOLVERS = {"ddim": "ddim", "dpmsolver++": "dpm++"}   # tuner name -> jaxdiff solver name
DEFAULT_OUT = "outputs/ratios.json"
RUN_FILE = "jaxdiff_tune_args.json"          # what the data depends on, kept for resuming


class UsageError(ValueError):
    """A bad command-line value: the command exits with status 2 and this message."""


# ------------------------------------------------------------------------------ helpers
def solver_config(schedule: dict, solver: str = "ddim") -> dict:
    """The scheduler config of the jaxdiff solver (``solver``: 'ddim' or 'dpmsolver++')
    that samples on the grid ``jaxdiff tune`` tunes, for a discrete model with this
    ``schedule`` (a diffusers scheduler config)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose {' or '.join(SOLVERS)}")
    cfg = {k: v for k, v in dict(schedule).items() if not str(k).startswith("_")}
    cfg.update(timestep_spacing="leading", steps_offset=1, clip_sample=False)
    if solver == "ddim":
        cfg.update(set_alpha_to_one=False)
    else:
        cfg.update(final_sigmas_type="sigma_min")
    return cfg


def jaxdiff_solver(schedule: dict, solver: str, steps: int):
    """The jaxdiff solver (no ratios yet) of ``solver_config(schedule, solver)``."""
    from jaxdiff import solvers
    return solvers.make(SOLVERS[solver], solver_config(schedule, solver), steps)


def output_paths(out) -> tuple:
    """--out -> (ratios JSON, loss CSV, PNG)."""
    out = Path(out)
    return out, out.with_name(out.stem + "_loss.csv"), out.with_suffix(".png")


class RandomBatches:
    """``count`` random (images, labels) batches of ``batch`` distinct examples; every pass
    yields the same batches in the same order (TimeTuner re-reads the data for each index
    and when resuming), and nothing is held in memory beyond one batch."""

    def __init__(self, images, labels, batch: int, count: int, seed: int = 0):
        self.images, self.labels = images, labels
        self.batch, self.count, self.seed = int(batch), int(count), int(seed)

    def __len__(self):
        return self.count

    def __iter__(self):
        import numpy as np
        rng = np.random.default_rng(self.seed)
        n = len(self.labels)
        for _ in range(self.count):
            i = rng.choice(n, self.batch, replace=False)
            yield self.images[i], self.labels[i]


def write_loss_csv(path, log) -> Path:
    """log['loss'], log['ratio'] [K-1, iters] -> CSV rows (iteration, index, loss, ratio),
    ordered by index, then iteration."""
    import numpy as np
    loss, ratio = np.asarray(log["loss"]), np.asarray(log["ratio"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iteration", "index", "loss", "ratio"])
        for idx in range(loss.shape[0]):
            for it in range(loss.shape[1]):
                w.writerow([it, idx, repr(float(loss[idx, it])), repr(float(ratio[idx, it]))])
    return path


def plot_tuning(log, ratios, fig=None, title: Optional[str] = None):
    """Three panels: loss per iteration of every tuned step, each ratio's trajectory, and
    the learned ratios against the step (network timestep on the axis). Draws into ``fig``
    (e.g. ``plt.figure()``) or a new, pyplot-free Agg ``Figure``; returns the figure."""
    import matplotlib
    import numpy as np
    if fig is None:
        from matplotlib.figure import Figure
        fig = Figure(figsize=(13, 3.6))
    loss, hist = np.asarray(log["loss"]), np.asarray(log["ratio"])
    ratios = np.asarray(ratios, np.float64)
    m, iters = loss.shape
    ts = log.get("meta", {}).get("timesteps")
    labels = [f"{i} (t={ts[i]:g})" if ts is not None else str(i) for i in range(m)]
    ax1, ax2, ax3 = fig.subplots(1, 3)
    it = np.arange(iters)
    cmap = matplotlib.colormaps["viridis"]
    for i in range(m):
        c = cmap(i / max(m - 1, 1))
        ax1.plot(it, loss[i], color=c, lw=1, label=labels[i] if m <= 12 else None)
        ax2.plot(it, hist[i], color=c, lw=1)
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("tuning loss")
    if np.all(loss[np.isfinite(loss)] > 0):
        ax1.set_yscale("log")
    ax1.set_title("loss per tuned step")
    if m <= 12:
        ax1.legend(fontsize=6, title="step index", title_fontsize=7)
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("ratio")
    ax2.set_title("ratio trajectories")
    k = len(ratios)
    ax3.axhline(1.0, color="k", lw=0.8, ls="--")
    ax3.plot(np.arange(k), ratios, "o-")
    ax3.set_xlabel("step index" + (" (network timestep)" if ts is not None else ""))
    if ts is not None and len(ts) == k:
        ax3.set_xticks(np.arange(k))
        ax3.set_xticklabels([f"{i}\n({ts[i]:g})" for i in range(k)], fontsize=6)
    ax3.set_ylabel("learned ratio r_i")
    ax3.set_title("learned ratios (last step fixed at 1)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ checks
def _positive_int(args, name, lo=1, hi=None, why=""):
    v = getattr(args, name.replace("-", "_"))
    if v < lo or (hi is not None and v > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise UsageError(f"--{name} must be {bound}{why}, got {v}")


def check_args(args) -> None:
    """Every check that needs no model; raises UsageError naming the bad option."""
    if args.model not in MODELS:
        raise UsageError(f"unknown --model {args.model!r}; supported: {', '.join(MODELS)} "
                         f"(the embedded digits model)")
    if args.method not in METHODS:
        raise UsageError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.method != "timetuner":
        from jaxdiff.time_grids import GRIDS
        if args.init not in GRIDS + ("auto", "gits"):
            raise UsageError(f"unknown --init {args.init!r}; choose auto, gits or one of "
                             f"{', '.join(GRIDS)}")
        for name, lo in (("pairs", 2), ("valid", 1), ("epochs", 1), ("fine", 2),
                         ("teacher-steps", 2)):
            _positive_int(args, name, lo)
    if args.tune_type not in TUNE_TYPES:
        raise UsageError(f"unknown --tune-type {args.tune_type!r}; choose "
                         f"{' or '.join(TUNE_TYPES)}")
    if args.solver not in SOLVERS:
        raise UsageError(f"unknown --solver {args.solver!r}; choose {' or '.join(SOLVERS)}")
    _positive_int(args, "steps", 1 if args.method != "timetuner" else 2, 1000,
                  " (TimeTuner does not tune the last step's ratio, so it needs at least 2 "
                  "steps; the digits model has 1000 training steps)")
    _positive_int(args, "iters", 1)
    _positive_int(args, "batch", 1)
    _positive_int(args, "checkpoint-every", 1)
    if args.eval != 0 and args.eval < 10:
        raise UsageError(f"--eval must be 0 (off) or >= 10 (at least one of each digit), "
                         f"got {args.eval}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {args.lr}")
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise UsageError(f"--out must be a .json path (the CSV and PNG go next to it), "
                         f"got {args.out!r}")
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {args.out!r} is a directory")


def _check_run_file(ckpt_dir, run: dict) -> None:
    """The tuner's checkpoint fingerprint does not cover the data; this file does."""
    path = Path(ckpt_dir) / RUN_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        diff = {k: (saved.get(k), v) for k, v in run.items() if saved.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise UsageError(f"--checkpoint-dir {ckpt_dir} holds a run with other settings "
                             f"({what}); use another directory or the same settings")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run, indent=1) + "\n")


# ------------------------------------------------------------------------------ the command
class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as it is, and every option's default."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``jaxdiff tune`` on an argparse parser."""
    p.add_argument("--method", default="timetuner",
                   help="timetuner (per-step ratios on a fixed grid), ld3 (the whole grid and "
                        "network times, by backpropagation through the solve) or gits "
                        "(dynamic programming over a fine teacher grid)")
    p.add_argument("--model", default="digits", help="only 'digits' (the embedded model)")
    p.add_argument("--steps", type=int, default=10, help="sampler steps K (>= 2)")
    p.add_argument("--tune-type", default="parallel",
                   help="parallel (all steps at once, from noised data) or sequential "
                        "(step by step along the sampler's own trajectory)")
    p.add_argument("--solver", default="ddim", help="ddim or dpmsolver++")
    p.add_argument("--iters", type=int, default=500, help="iterations per tuned step")
    p.add_argument("--batch", type=int, default=16, help="training images per iteration")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate (default: 2e-3 TimeTuner, 0.02 LD3)")
    p.add_argument("--seed", type=int, default=0, help="data order and noise")
    p.add_argument("--checkpoint-dir", default=None,
                   help="orbax checkpoints; running again with the same settings resumes")
    p.add_argument("--checkpoint-every", type=int, default=50, help="iterations between "
                   "checkpoints (each tuned step's end and the run's are saved too)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="ratios JSON; <stem>_loss.csv and <stem>.png are written next "
                        "to it")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="afterwards, sample N digits (labels 0..9 in turn) from the same x_T "
                        "without and with the ratios and print accuracy and FD-digits "
                        "(0: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("ld3 / gits")
    g.add_argument("--init", default="auto", help="LD3's starting grid: one of "
                   "jaxdiff.time_grids.GRIDS, auto (the one best on the held-out pairs) or "
                   "gits (GITS's grid with a free start, found first)")
    g.add_argument("--pairs", type=int, default=100, help="teacher pairs (LD3 training, "
                   "GITS trajectories)")
    g.add_argument("--valid", type=int, default=50, help="LD3 held-out pairs")
    g.add_argument("--epochs", type=int, default=40, help="LD3 epochs (early stopping)")
    g.add_argument("--fine", type=int, default=100, help="GITS fine grid steps")
    g.add_argument("--teacher-steps", type=int, default=500, help="teacher DPM-Solver++(2M) "
                   "steps")
    g.add_argument("--guidance-scale", type=float, default=1.0, help="digits guidance")


def _digits_setup(args):
    """-> (tuner, data, pipeline) for the embedded digits model."""
    import jaxdiff.zoo.digits as digits
    from jaxdiff.zoo.digits import data
    from tuning.digits import build_tuner

    train = data.load("train")
    if args.batch > len(train.labels):
        raise UsageError(f"--batch must be in [1, {len(train.labels)}] (the digits training "
                         f"split has {len(train.labels)} images), got {args.batch}")
    batches = RandomBatches(train.images, train.labels, args.batch, args.iters, args.seed)
    return build_tuner(), batches, digits.load()


def evaluate_digits(pipe, solver: str, steps: int, ratios, n: int, seed: int = 1) -> dict:
    """Accuracy and FD-digits of n digits (labels 0..9 in turn) from the same x_T, plain
    vs tuned, with the solver on TimeTuner's grid; ``ratios`` an array or a JSON path."""
    from jaxdiff.zoo.digits import metrics

    labels = [i % 10 for i in range(n)]
    plain = jaxdiff_solver(pipe.schedule, solver, steps)
    out = {"n": n, "steps": steps, "solver": solver}
    for tag, sol in (("plain", plain), ("tuned", plain.with_ratios(ratios))):
        images = pipe(labels=labels, solver=sol, seed=seed)
        out[tag] = {"accuracy": metrics.accuracy(images, labels),
                    "fd_digits": metrics.fd_digits(images)}
    out["fd_floor"] = metrics.fd_floor(n)
    return out


def tune_main(args) -> int:
    """Run ``jaxdiff tune`` with parsed ``args``; -> exit status (0, 1 on a failed run,
    2 on bad input, with the reason on stderr)."""
    def fail(msg, code=2):
        print(f"jaxdiff tune: {msg}", file=sys.stderr)
        return code

    try:
        check_args(args)
    except UsageError as e:
        return fail(e)
    if args.method != "timetuner":
        from tuning.grid_cli import grid_main
        return grid_main(args)
    if args.lr is None:
        args.lr = 2e-3
    json_path, csv_path, png_path = output_paths(args.out)

    import jax
    import numpy as np

    from jaxdiff.sampling.progress import resolve
    from tuning import NonFiniteLossError, save_ratios

    try:
        tuner, batches, pipe = _digits_setup(args)
        if args.checkpoint_dir is not None:
            _check_run_file(args.checkpoint_dir, {
                "model": args.model, "batch": args.batch, "seed": args.seed,
                "solver": args.solver, "data": "digits train split, RandomBatches"})
    except UsageError as e:
        return fail(e)

    # one tqdm bar over all (index, iteration) updates, fed progress(done, total)
    bar = resolve(not args.no_progress, "TimeTuner")
    target = jaxdiff_solver(pipe.schedule, args.solver, args.steps)
    target_ts = np.asarray(target.timesteps, np.float64)
    # DDIM: TimeTuner's reference grid (= target_ts); DPM-Solver++: the jaxdiff solver's grid
    kwargs = {} if args.solver == "ddim" else {"timesteps": target_ts}
    print(f"TimeTuner: {args.model}, {args.solver} K={args.steps}, {args.tune_type}, "
          f"{args.iters} iterations x batch {args.batch}, lr {args.lr:g}", flush=True)
    t0 = time.perf_counter()
    try:
        ratios, log = tuner.optimize_timesteps(
            batches, args.steps, tune_type=args.tune_type, lr=args.lr,
            total_iters=args.iters, key=jax.random.key(args.seed),
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            progress=bar, verbose=False, solver=args.solver, **kwargs)
    except (ValueError, NonFiniteLossError) as e:
        return fail(e, code=1 if isinstance(e, NonFiniteLossError) else 2)
    seconds = time.perf_counter() - t0

    meta = dict(log["meta"])          # its "timesteps" are the network-unit grid
    if not np.allclose(meta["timesteps"], target_ts, rtol=0, atol=1e-3):
        return fail(f"the tuned grid {meta['timesteps']} is not the timesteps "
                    f"{target_ts.tolist()} of jaxdiff's {SOLVERS[args.solver]} solver "
                    f"(has TimeTuner's grid changed?)", code=1)
    meta.update(model=args.model, batch=args.batch, seed=args.seed,
                scheduler_config=solver_config(pipe.schedule, args.solver),
                jaxdiff_solver=SOLVERS[args.solver], tune_seconds=round(seconds, 1))
    log = dict(log, meta=meta)
    save_ratios(json_path, ratios, meta)
    write_loss_csv(csv_path, log)
    fig = plot_tuning(log, ratios, title=f"TimeTuner on {args.model}: {args.solver} "
                      f"K={args.steps}, {args.tune_type}, {args.iters} iterations")
    fig.savefig(png_path, dpi=110)

    resumed = log.get("resumed_from")
    print(f"tuned in {seconds:.1f} s" + (f" (resumed from iteration {resumed})"
                                         if resumed is not None else ""))
    print("timesteps " + " ".join(f"{t:g}" for t in meta["timesteps"]))
    print("ratios    " + " ".join(f"{r:.4f}" for r in np.asarray(ratios)))
    print(f"wrote {json_path}, {csv_path}, {png_path}")
    print(f"sample with: jaxdiff.solvers.make(meta['jaxdiff_solver'], meta['scheduler_config'], "
          f"{args.steps}, ratios={str(json_path)!r})")

    if args.eval:
        try:
            ev = evaluate_digits(pipe, args.solver, args.steps, json_path, args.eval,
                                 seed=args.seed + 1)
        except ValueError as e:
            return fail(f"--eval: {e}", code=1)
        print(f"eval on {ev['n']} digits, same x_T (FD-digits floor at n={ev['n']}: "
              f"{ev['fd_floor']:.1f}):")
        for tag in ("plain", "tuned"):
            print(f"  {tag:6s} {args.solver}-{args.steps}: accuracy "
                  f"{ev[tag]['accuracy']:.3f}  FD-digits {ev[tag]['fd_digits']:.1f}")
    return 0


def main(argv=None, prog: str = "python -m tuning.cli") -> int:
    """``jaxdiff tune ARGS`` = ``python -m tuning.cli ARGS`` = ``main([ARGS])``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_HelpFormatter)
    add_arguments(p)
    return tune_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
