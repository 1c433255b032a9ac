"""End to end against diffusers' StableDiffusionPipeline on a tiny random SD folder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import conversion
from jaxdiff import solvers
from tiny import nhwc, write_tiny_pipeline

SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
              "PNDMScheduler"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_e2e")
    ref = write_tiny_pipeline(folder)
    return ref, conversion.load_pipeline(folder)


def _scheduler(ref, name):
    import diffusers

    sched = getattr(diffusers, name).from_config(ref.scheduler.config)
    return sched, {**dict(sched.config), "_class_name": name}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_images_match_diffusers(pipes, name):
    ref, pipe = pipes
    sched, cfg = _scheduler(ref, name)
    ref.scheduler = sched
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 16, 16), generator=g)
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["a dog", ""], guidance_scale=7.5,
              num_inference_steps=12)
    with torch.no_grad():
        want = ref(**kw, latents=latents, output_type="np").images
    got = pipe(**kw, latents=nhwc(latents.numpy()),
               solver=solvers.from_diffusers(cfg, kw["num_inference_steps"]))
    assert got.shape == want.shape == (2, 32, 32, 3)
    err = float(np.abs(got - want).max())
    print(f"{name}: max abs image difference {err:.2e}")
    assert err <= 2e-3


def test_seeds_are_per_image_and_reproducible(pipes):
    _, pipe = pipes
    kw = dict(num_inference_steps=4, solver="ddim", output_type="latent")
    both = pipe(["the cat", "a dog"], seed=[3, 7], **kw)
    alone = pipe(["a dog"], seed=[7], **kw)
    # same image whatever its batch-mates (up to float32 reduction order in batched matmuls)
    np.testing.assert_allclose(both[1], alone[0], atol=5e-4)
    again = pipe(["the cat", "a dog"], seed=[3, 7], **kw)
    np.testing.assert_array_equal(both, again)
    assert not np.allclose(both[0], pipe(["the cat"], seed=[4], **kw)[0])


def test_bad_inputs_named(pipes):
    _, pipe = pipes
    with pytest.raises(ValueError, match=r"multiples of \d+ \(the VAE's factor 2"):
        pipe("the cat", height=33, num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        pipe("the cat", num_inference_steps=0)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe("the cat", latents=np.zeros((1, 4, 16, 16)), num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe("the cat", output_type="tensor")


def test_outputs_and_grid(pipes, tmp_path):
    from jaxdiff.pipeline import image_grid

    _, pipe = pipes
    imgs = pipe(["the cat"] * 3, num_inference_steps=2, solver="euler", output_type="pil")
    assert len(imgs) == 3 and imgs[0].size == (32, 32)
    arr = pipe(["the cat"] * 3, num_inference_steps=2, solver="euler")
    assert arr.shape == (3, 32, 32, 3) and arr.min() >= 0 and arr.max() <= 1
    grid = image_grid(arr, 2, 2)
    assert grid.size == (64, 64)
    grid.save(tmp_path / "grid.png")


def test_second_call_does_not_recompile(pipes):
    _, pipe = pipes
    from jaxdiff.sampling import sequential

    kw = dict(num_inference_steps=3, solver="dpm++", output_type="latent")
    pipe(["the cat"], guidance_scale=7.5, seed=0, **kw)
    before = sequential._run._cache_size()
    pipe(["a dog"], guidance_scale=3.0, seed=11, guidance_rescale=0.3, **kw)
    assert sequential._run._cache_size() == before


def test_cli_sample(pipes, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    folder = tmp_path / "sd"
    write_tiny_pipeline(folder)
    out = tmp_path / "cat.png"
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "sample", str(folder), "the cat",
                        "--solver", "euler", "--steps", "3", "--num", "4", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)  # 2x2 grid of 32x32 images
    r = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "sample", str(folder), "the cat",
                        "--height", "31"], capture_output=True, text=True)
    assert r.returncode == 2 and "positive multiples of" in r.stderr and "31x" in r.stderr


def test_tuned_ratios_and_sampler_options(pipes):
    """ratios= retimes the pipeline's solver (the same as passing the retimed solver);
    sampler_options reach the driver and bad ones are named."""
    _, pipe = pipes
    kw = dict(num_inference_steps=4, output_type="latent", seed=[1], guidance_scale=3.0)
    r = np.array([1.02, 0.97, 1.05, 0.99])
    tuned = pipe(["the cat"], solver="ddim", ratios=r, **kw)
    solver = pipe.make_solver("ddim", 4).with_ratios(r)
    np.testing.assert_array_equal(tuned, pipe(["the cat"], solver=solver, **kw))
    assert not np.allclose(tuned, pipe(["the cat"], solver="ddim", **kw))
    chunked = pipe(["the cat"], solver=solver, sampler="paradigms",
                   sampler_options={"parallel": 4, "tolerance": 1e-4, "chunk": 2}, **kw)
    np.testing.assert_allclose(chunked, tuned, atol=1e-3)
    with pytest.raises(ValueError, match="takes \\[\\]"):
        pipe(["the cat"], solver="ddim", sampler_options={"chunk": 2}, **kw)


def test_learned_schedule_file(pipes, tmp_path):
    """schedule= puts the pipeline's solver on a learned grid (= passing the rebuilt solver)."""
    from jaxdiff import schedule_files, time_grids
    from jaxdiff.schedules import NoiseScheduleVP

    _, pipe = pipes
    ac = solvers.alphas_cumprod(pipe.scheduler)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=ac)
    t = time_grids.make_grid("karras", ns, 4)
    path = schedule_files.save_schedule(tmp_path / "s.json", solver="ddim", t=t,
                                        network_t=t[:-1] * 0.98, alphas_cumprod=ac)
    kw = dict(num_inference_steps=4, output_type="latent", seed=[1], guidance_scale=3.0)
    got = pipe(["the cat"], solver="ddim", schedule=path, **kw)
    want = pipe(["the cat"], solver=pipe.make_solver("ddim", 4).with_schedule(path), **kw)
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, pipe(["the cat"], solver="ddim", **kw))
    with pytest.raises(ValueError, match="made for 4 steps"):
        pipe(["the cat"], solver="ddim", schedule=path, **{**kw, "num_inference_steps": 5})
