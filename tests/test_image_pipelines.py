"""Image-to-image (and the solver segments it runs on) against diffusers on the tiny SD folder."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import conversion
import jaxdiff
from jaxdiff import solvers
from jaxdiff.sampling import Picard, Sequential
from tiny import latents_and_images_error, nchw, nhwc, write_tiny_pipeline

SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_img2img")
    ref = write_tiny_pipeline(folder)
    return ref, conversion.load_pipeline(folder)


def _scheduler(ref, name, **kw):
    import diffusers

    sched = getattr(diffusers, name).from_config(ref.scheduler.config, **kw)
    return sched, {**dict(sched.config), "_class_name": name}


def _mode_latents(monkeypatch, module):
    """diffusers samples the VAE posterior; jaxdiff uses its mean: make diffusers do so too
    (the generator then draws only the added noise)."""
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


def _images(seed, n=2, size=32):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_matches_diffusers(pipes, name, monkeypatch):
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod

    ref, pipe = pipes
    sched, _ = _scheduler(ref, name)
    _mode_latents(monkeypatch, mod)
    img2img = StableDiffusionImg2ImgPipeline(**{**ref.components, "scheduler": sched})
    # (the pipeline's constructor edits its scheduler's config: clip_sample -> False)
    cfg = {**dict(img2img.scheduler.config), "_class_name": name}
    image = _images(0)
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["a dog", ""], guidance_scale=7.5,
              num_inference_steps=10, strength=0.6)
    with torch.no_grad():
        want = img2img(**kw, image=image, generator=torch.Generator().manual_seed(0),
                       output_type="latent").images
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    got = pipe(**kw, image=image, latents=nhwc(noise.numpy()), output_type="latent",
               solver=solvers.from_diffusers(cfg, kw["num_inference_steps"]))
    lat_err, err, inside = latents_and_images_error(ref, pipe, want, got)
    print(f"img2img {name}: latents rel L2 {lat_err:.1e}, max abs image difference {err:.2e} "
          f"({inside:.0%} of values unsaturated)")
    assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


def test_segment_warms_up_again_like_diffusers():
    """DPM-Solver++ 3M cut at step 4 of 12: the first two steps of the segment drop to first
    and second order (diffusers' lower_order_nums restarts after set_begin_index)."""
    from diffusers import DPMSolverMultistepScheduler

    for solver_type in ("midpoint", "heun"):
        sched = DPMSolverMultistepScheduler(solver_order=3, solver_type=solver_type,
                                            beta_schedule="scaled_linear", beta_start=0.00085,
                                            beta_end=0.012)
        sched.set_timesteps(12)
        sched.set_begin_index(4)
        cfg = {**dict(sched.config), "_class_name": "DPMSolverMultistepScheduler"}
        seg = solvers.from_diffusers(cfg, 12).segment(4)
        rng = np.random.default_rng(0)
        x0 = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        eps = rng.standard_normal((8, 1, 4, 4, 4)).astype(np.float32)
        x = torch.from_numpy(nchw(x0))
        for j, t in enumerate(sched.timesteps[4:]):
            x = sched.step(torch.from_numpy(nchw(eps[j])), t, x).prev_sample
        fn = lambda z, t: jnp.asarray(eps)[jnp.argmax(seg.timesteps == t[0])]  # noqa: E731
        got = jaxdiff.sample(fn, seg, jnp.asarray(x0))
        np.testing.assert_allclose(np.asarray(got), nhwc(x.numpy()), rtol=1e-4, atol=1e-4)


def test_segments_compose_and_run_under_picard(pipes):
    """Steps 0..5 then 5..12 equal the 12 steps at once; Picard on a later start equals
    sequential at a tight tolerance."""
    _, pipe = pipes
    full = solvers.make("ddim", pipe.scheduler, 12)
    fn = lambda x, t: jnp.sin(x) * 0.1 + 1e-3 * t[:, None, None, None]  # noqa: E731
    x_T = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 4)), jnp.float32)
    whole = jaxdiff.sample(fn, full, x_T)
    half = jaxdiff.sample(fn, full.segment(0, 5), x_T)
    both = jaxdiff.sample(fn, full.segment(5), half)
    np.testing.assert_allclose(np.asarray(both), np.asarray(whole), atol=1e-5)
    tail = full.segment(7)
    seq, _ = jaxdiff.sampling.run(Sequential(), fn, tail, x_T)
    par, stats = jaxdiff.sampling.run(Picard(parallel=5, tolerance=1e-6), fn, tail, x_T)
    np.testing.assert_allclose(np.asarray(par), np.asarray(seq), atol=1e-5)
    with pytest.raises(ValueError, match="0 <= start < stop <= 12"):
        full.segment(12)
    with pytest.raises(ValueError, match="cannot run part of its steps"):
        solvers.make("unipc", pipe.scheduler, 12).segment(3)


def test_img2img_under_every_sampler(pipes):
    _, pipe = pipes
    kw = dict(prompt=["the cat"], image=_images(1, n=1), strength=0.5, num_inference_steps=8,
              solver="ddim", output_type="latent", seed=3)
    seq = pipe(**kw)
    par = pipe(**kw, sampler=Picard(parallel=4, tolerance=1e-5))
    np.testing.assert_allclose(np.asarray(par), np.asarray(seq), atol=1e-4)
    fast = pipe(**kw, sampler="faster", sampler_options=dict(key_steps=[0, 2]))
    assert np.all(np.isfinite(np.asarray(fast))) and fast.shape == seq.shape


def test_img2img_bad_inputs_named(pipes):
    _, pipe = pipes
    kw = dict(prompt="the cat", num_inference_steps=4, solver="ddim", output_type="latent")
    with pytest.raises(ValueError, match="strength must be in"):
        pipe(**kw, image=_images(0, 1), strength=1.5)
    with pytest.raises(ValueError, match="strength must be in"):
        pipe(**kw, image=_images(0, 1), strength=0.0)
    with pytest.raises(ValueError, match="no step left"):
        pipe(**kw, image=_images(0, 1), strength=0.1)
    with pytest.raises(ValueError, match="image is 32x32 pixels, but height x width is 48x48"):
        pipe(**kw, image=_images(0, 1), height=48, width=48)
    with pytest.raises(ValueError, match=r"multiples of \d+ \(the VAE's factor 2 .*got 33x33"):
        pipe(**kw, image=_images(0, 1, size=33))
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        pipe(**kw, image=_images(0, 1) * 2)
    with pytest.raises(ValueError, match="3 images for 2 images"):
        pipe(**{**kw, "prompt": ["a", "b"]}, image=_images(0, 3))
    with pytest.raises(ValueError, match="denoising_start needs image"):
        pipe(**kw, denoising_start=0.5)


@pytest.fixture(scope="module")
def inpaint_pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_inpaint9")
    ref = write_tiny_pipeline(folder, seed=1, in_channels=9)
    return ref, conversion.load_pipeline(folder)


def _mask(seed, n=2, size=32):
    """A rectangle to repaint per image, plus a soft edge (values in (0, 1) get binarised)."""
    m = np.zeros((n, size, size), np.float32)
    rng = np.random.default_rng(seed)
    for j in range(n):
        r, c = rng.integers(4, 14, 2)
        m[j, r:r + 14, c:c + 12] = 1.0
        m[j, r - 1, c:c + 12] = 0.6
    return m


@pytest.mark.parametrize("channels,name", [(4, "DDIMScheduler"), (9, "DDIMScheduler"),
                                           (4, "EulerDiscreteScheduler"),
                                           (9, "DPMSolverMultistepScheduler")])
def test_inpaint_matches_diffusers(pipes, inpaint_pipes, channels, name, monkeypatch):
    """StableDiffusionInpaintPipeline, for a plain UNet (latent blending) and a 9-channel
    inpainting UNet (mask + masked-image latents), at full strength and at 0.7."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as mod

    ref, pipe = pipes if channels == 4 else inpaint_pipes
    sched, _ = _scheduler(ref, name)
    _mode_latents(monkeypatch, mod)
    inpaint = StableDiffusionInpaintPipeline(**{**ref.components, "scheduler": sched})
    cfg = {**dict(inpaint.scheduler.config), "_class_name": name}
    image, mask = _images(2), _mask(3)
    for strength in (1.0, 0.7):
        kw = dict(prompt=["the cat", "a dog"], negative_prompt=["", "the cat"],
                  guidance_scale=6.0, num_inference_steps=10, strength=strength)
        with torch.no_grad():
            want = inpaint(**kw, image=image, mask_image=mask[..., None], output_type="latent",
                           generator=torch.Generator().manual_seed(0)).images
        noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        got = pipe(**kw, image=image, mask_image=mask, latents=nhwc(noise.numpy()),
                   output_type="latent", solver=solvers.from_diffusers(cfg, 10))
        lat_err, err, inside = latents_and_images_error(ref, pipe, want, got)
        print(f"inpaint {channels}-channel {name} strength {strength}: latents rel L2 "
              f"{lat_err:.1e}, max abs image difference {err:.2e} ({inside:.0%} unsaturated)")
        assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


def test_inpaint_keeps_the_image_and_runs_under_picard(pipes):
    _, pipe = pipes
    image, mask = _images(4, n=1), _mask(5, n=1)
    kw = dict(prompt=["the cat"], image=image, mask_image=mask, num_inference_steps=6,
              solver="ddim", output_type="latent", seed=1)
    seq = np.asarray(pipe(**kw))
    keep = np.asarray(mask[:, ::2, ::2] < 0.5)
    known = np.asarray(pipe.encode_images(image))
    np.testing.assert_allclose(seq[keep], known[keep], atol=1e-6)   # the kept region is the image
    assert np.abs(seq[~keep] - known[~keep]).mean() > 0.05            # the rest is repainted
    par = np.asarray(pipe(**kw, sampler=Picard(parallel=3, tolerance=1e-5)))
    np.testing.assert_allclose(par, seq, atol=1e-4)
    dpm = pipe(**{**kw, "solver": "dpm++"}, sampler=Picard(parallel=3, tolerance=1e-5))
    np.testing.assert_allclose(np.asarray(dpm), np.asarray(pipe(**{**kw, "solver": "dpm++"})),
                               atol=1e-4)


def test_inpaint_bad_inputs_named(pipes, inpaint_pipes):
    _, pipe = pipes
    kw = dict(prompt="the cat", num_inference_steps=4, solver="ddim", output_type="latent")
    with pytest.raises(ValueError, match="mask_image needs image="):
        pipe(**kw, mask_image=_mask(0, 1))
    with pytest.raises(ValueError, match="mask_image is 24x24 pixels"):
        pipe(**kw, image=_images(0, 1), mask_image=_mask(0, 1, size=24))
    with pytest.raises(ValueError, match=r"mask_image values must lie in \[0, 1\]"):
        pipe(**kw, image=_images(0, 1), mask_image=_mask(0, 1) * 3)
    with pytest.raises(ValueError, match="inpainting UNet"):
        inpaint_pipes[1](**kw)
