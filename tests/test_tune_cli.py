"""``jaxdiff tune`` (tuning/cli.py), run in-process on the digits model with tiny settings:
the ratios file loads and carries the timesteps of jaxdiff's DDIM on TimeTuner's grid, the
solver and the digits pipeline accept it, the CSV and the PNG are written, bad input
exits 2 with a message naming the problem."""

import contextlib
import csv
import io

import numpy as np
import pytest

from jaxdiff import cli

STEPS, ITERS, BATCH, EVAL = 3, 2, 4, 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "r.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["tune", "--model", "digits", "--steps", str(STEPS), "--iters",
                         str(ITERS), "--batch", str(BATCH), "--tune-type", "parallel",
                         "--out", str(out), "--eval", str(EVAL), "--no-progress"])
    return code, out, printed.getvalue()


def tuner_grid_solver(k=STEPS):
    """jaxdiff's DDIM on TimeTuner's grid: leading spacing, offset 1, last step to
    alphas_cumprod[0], no clipping (as in tests/test_ratios.py)."""
    from jaxdiff import solvers
    from jaxdiff.zoo.digits import SCHEDULE
    return solvers.make("ddim", dict(SCHEDULE, timestep_spacing="leading", steps_offset=1,
                                     set_alpha_to_one=False, clip_sample=False), k)


def test_ratios_file_and_meta_timesteps(run):
    from tuning import load_ratios
    code, out, _ = run
    assert code == 0
    ratios, meta = load_ratios(out)
    assert ratios.shape == (STEPS,) and ratios[-1] == 1.0 and np.all(np.isfinite(ratios))
    assert meta["tune_type"] == "parallel" and meta["model"] == "digits"
    sol = tuner_grid_solver()
    np.testing.assert_allclose(meta["timesteps"], np.asarray(sol.timesteps), atol=1e-6)
    np.testing.assert_allclose(meta["timesteps"], [667, 334, 1])    # leading, offset 1
    # the recorded config builds the same solver; the ratios retime it
    from jaxdiff import solvers
    tuned = solvers.make("ddim", meta["scheduler_config"], STEPS, ratios=out)
    np.testing.assert_allclose(np.asarray(tuned.timesteps),
                               np.asarray(sol.with_ratios(ratios).timesteps))
    np.testing.assert_allclose(np.asarray(sol.with_ratios(out).timesteps),
                               ratios * (np.asarray(sol.timesteps) + 1.0) - 1.0, rtol=1e-6)
    # the pipeline's default grid (trailing spacing) is another grid: refused, by name
    from jaxdiff.zoo.digits import SCHEDULE
    with pytest.raises(ValueError, match="tuned for timesteps"):
        solvers.make("ddim", SCHEDULE, STEPS).with_ratios(out)


def test_digits_pipeline_samples_with_the_file(run):
    import jaxdiff.zoo.digits as digits
    out = run[1]
    pipe = digits.load()
    labels = list(range(EVAL))          # the --eval shapes: the compiled program is reused
    tuned = pipe(labels=labels, solver=tuner_grid_solver(), ratios=out, seed=3)
    plain = pipe(labels=labels, solver=tuner_grid_solver(), seed=3)
    assert tuned.shape == (EVAL, 16, 16, 1) and np.all(np.isfinite(tuned))
    assert 0.0 <= tuned.min() and tuned.max() <= 1.0
    assert not np.array_equal(tuned, plain)


def test_csv_png_and_printed_eval(run):
    code, out, printed = run
    rows = list(csv.DictReader(out.with_name("r_loss.csv").open()))
    assert len(rows) == (STEPS - 1) * ITERS
    assert list(rows[0]) == ["iteration", "index", "loss", "ratio"]
    assert sorted({int(r["index"]) for r in rows}) == list(range(STEPS - 1))
    assert all(np.isfinite(float(r["loss"])) and float(r["loss"]) >= 0 for r in rows)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "timesteps 667 334 1" in printed and str(out) in printed
    assert f"eval on {EVAL} digits" in printed
    for tag in ("plain", "tuned"):
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"  {tag} "))
        assert "accuracy" in line and "FD-digits" in line


def test_checkpoint_dir_resumes_and_guards_its_settings(run, tmp_path, capsys):
    """Same settings as the fixture (so the compiled tuning step is reused): the same
    ratios; run again: resumed from the last checkpoint, same file; other data settings in
    the same directory: refused."""
    from tuning import load_ratios
    ckpt, out = tmp_path / "ckpt", tmp_path / "r.json"
    argv = ["tune", "--steps", str(STEPS), "--iters", str(ITERS), "--batch", str(BATCH),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    first = load_ratios(out)[0]
    np.testing.assert_array_equal(first, load_ratios(run[1])[0])
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert f"resumed from iteration {ITERS}" in capsys.readouterr().out
    np.testing.assert_array_equal(load_ratios(out)[0], first)
    assert cli.main([*argv, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint-dir" in err and "seed: 0 there, 1 now" in err


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "--steps must be in [2, 1000]"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--tune-type", "diagonal"], "unknown --tune-type 'diagonal'"),
    (["--model", "sd15"], "unknown --model 'sd15'"),
    (["--solver", "euler"], "unknown --solver 'euler'"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--eval", "3"], "--eval must be 0 (off) or >= 10"),
    (["--out", "ratios.txt"], "--out must be a .json path"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    code = cli.main(["tune", "--out", str(tmp_path / "r.json"), *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("jaxdiff tune: ")
    assert not list(tmp_path.iterdir())            # nothing written


def test_batch_larger_than_the_data_exits_2(capsys, tmp_path):
    code = cli.main(["tune", "--batch", "5000", "--out", str(tmp_path / "r.json")])
    assert code == 2 and "--batch must be in [1, 1437]" in capsys.readouterr().err


def test_help_lists_tune(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "jaxdiff tune" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "--help"])
    assert e.value.code == 0 and "--tune-type" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["ld3", "gits"])
def test_grid_methods_write_a_schedule_file_the_pipeline_takes(method, tmp_path, capsys):
    """``--method ld3 | gits`` write a schedule file; the digits pipeline samples with it,
    exactly as the solver rebuilt from the file; a teacher no finer than the student exits 2.
    LD3 starts from GITS's grid here (``--init gits``: one run covers both tuners)."""
    from jaxdiff import schedule_files, solvers
    from jaxdiff.zoo import digits
    from jaxdiff.zoo.digits import SCHEDULE

    out = tmp_path / f"{method}.json"
    init = ["--init", "gits"] if method == "ld3" else []
    argv = ["tune", "--method", method, *init, "--steps", "2", "--solver", "dpmsolver++",
            "--pairs", "6", "--valid", "3", "--epochs", "2", "--batch", "3", "--fine", "10",
            "--teacher-steps", "20", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "schedule=" in printed and out.with_suffix(".png").exists()
    doc = schedule_files.load_schedule(out)
    assert doc["solver"] == "dpmsolver++" and doc["num_steps"] == 2
    assert doc["meta"]["method"] == method and doc["meta"]["tune_seconds"] > 0
    if method == "ld3":
        assert "starts from GITS's free-start grid" in printed
        assert doc["meta"]["init"] == "gits" and len(doc["meta"]["gits_t"]) == 3
        # LD3 keeps its starting grid's ends: GITS's (possibly free) start and the final time
        assert abs(doc["t"][0] - doc["meta"]["gits_t"][0]) < 1e-6
        assert abs(doc["t"][-1] - doc["meta"]["gits_t"][-1]) < 1e-6
    pipe = digits.load()
    cfg = dict(SCHEDULE, clip_sample=False)
    sol = solvers.make("dpm++", cfg, 2, schedule=out)
    got = pipe([3, 8], solver=solvers.make("dpm++", cfg, 2), schedule=out, seed=4)
    np.testing.assert_array_equal(got, pipe([3, 8], solver=sol, seed=4))
    assert not np.allclose(got, pipe([3, 8], solver=solvers.make("dpm++", cfg, 2), seed=4))
    code = cli.main([*argv[:-3], "--teacher-steps", "2", "--out", str(tmp_path / "x.json")])
    assert code == 2 and "teacher must take more steps" in capsys.readouterr().err
    code = cli.main(["tune", "--method", "ld4", "--out", str(tmp_path / "y.json")])
    assert code == 2 and "unknown --method 'ld4'" in capsys.readouterr().err
