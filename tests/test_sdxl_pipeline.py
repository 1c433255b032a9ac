"""SDXL base and refiner against diffusers on tiny random folders (float32, fixed latents)."""

import numpy as np
import pytest
import torch

import conversion
from jaxdiff import solvers
from jaxdiff.pipeline import StableDiffusionXLPipeline
from jaxdiff.sampling import Picard
from tiny import latents_and_images_error, nhwc, write_tiny_sdxl

SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    base, refiner = write_tiny_sdxl(folder)
    return (base, refiner, conversion.load_pipeline(folder / "base"),
            conversion.load_pipeline(folder / "refiner"), folder)


def _use(ref, name):
    """Give the diffusers pipeline scheduler ``name`` -> the config jaxdiff builds from."""
    import diffusers

    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config)
    return {**dict(ref.scheduler.config), "_class_name": name}


def _latents(seed=0, n=2):
    return torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(seed))


def test_folders_load_as_sdxl(xl):
    _, _, base, refiner, _ = xl
    assert isinstance(base, StableDiffusionXLPipeline) and base.text_encoder is not None
    assert isinstance(refiner, StableDiffusionXLPipeline) and refiner.text_encoder is None
    assert base.force_zeros_for_empty_prompt and not base.requires_aesthetics_score
    assert refiner.requires_aesthetics_score and not refiner.force_zeros_for_empty_prompt


@pytest.mark.parametrize("name", SCHEDULERS)
def test_base_matches_diffusers(xl, name):
    ref, _, pipe, _, _ = xl
    cfg = _use(ref, name)
    lat = _latents()
    cases = [dict(negative_prompt=["a dog", ""]),                      # encoded negatives
             dict(negative_prompt=None, guidance_rescale=0.7,          # zeros (force_zeros)
                  original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(32, 32))]
    for extra in cases:
        kw = dict(prompt=["the cat", "a dog"], guidance_scale=5.0, num_inference_steps=8, **extra)
        with torch.no_grad():
            want = ref(**kw, latents=lat, output_type="latent").images
        got = pipe(**kw, latents=nhwc(lat.numpy()), solver=solvers.from_diffusers(cfg, 8),
                   output_type="latent")
        lat_err, err, inside = latents_and_images_error(ref, pipe, want, got)
        print(f"SDXL base {name} {sorted(extra)}: latents rel L2 {lat_err:.1e}, max abs image "
              f"difference {err:.2e} ({inside:.0%} of values unsaturated)")
        assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


@pytest.mark.parametrize("name", SCHEDULERS)
def test_base_plus_refiner_matches_diffusers(xl, name):
    """denoising_end 0.8 on the base, denoising_start 0.8 on the refiner (aesthetic score,
    second text encoder only), latents handed over."""
    ref, ref_refiner, pipe, refiner, _ = xl
    cfg = _use(ref, name)
    ref_refiner.scheduler = ref.scheduler
    lat = _latents(1)
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["", "the cat"], guidance_scale=5.0,
              num_inference_steps=10)
    with torch.no_grad():
        handed = ref(**kw, latents=lat, denoising_end=0.8, output_type="latent").images
        want = ref_refiner(**kw, image=handed, denoising_start=0.8, aesthetic_score=7.0,
                           output_type="latent").images
    solver = solvers.from_diffusers(cfg, 10)
    mine = pipe(**kw, latents=nhwc(lat.numpy()), denoising_end=0.8, output_type="latent",
                solver=solver)
    np.testing.assert_allclose(np.asarray(mine), nhwc(handed.numpy()), atol=1e-3, rtol=1e-4)
    got = refiner(**kw, image=mine, denoising_start=0.8, aesthetic_score=7.0, solver=solver,
                  output_type="latent")
    lat_err, err, inside = latents_and_images_error(ref, refiner, want, got)
    print(f"SDXL base + refiner {name}: latents rel L2 {lat_err:.1e}, max abs image difference "
          f"{err:.2e} ({inside:.0%} of values unsaturated)")
    assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


def test_sdxl_under_picard_and_encoder_propagation(xl):
    _, _, pipe, _, _ = xl
    kw = dict(prompt=["the cat"], guidance_scale=5.0, num_inference_steps=8, solver="ddim",
              output_type="latent", seed=2)
    seq = pipe(**kw)
    par = pipe(**kw, sampler=Picard(parallel=4, tolerance=1e-5))
    np.testing.assert_allclose(np.asarray(par), np.asarray(seq), atol=1e-3, rtol=1e-4)
    fast = pipe(**kw, sampler="faster", sampler_options=dict(key_steps=[0, 2, 4]))
    assert np.all(np.isfinite(np.asarray(fast)))
    img = pipe(**{**kw, "output_type": "latent"}, image=np.full((1, 32, 32, 3), 0.5, np.float32),
               strength=0.5)
    assert img.shape == seq.shape


def test_sdxl_bad_inputs_named(xl, tmp_path):
    import json
    import shutil

    _, _, pipe, refiner, folder = xl
    kw = dict(prompt="the cat", num_inference_steps=4, solver="ddim", output_type="latent")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['prompt_3'\\]"):
        pipe(**kw, prompt_3="x")
    # VAE factor 2, one UNet downsampling: 30 pixels are 15 latents, which the UNet's skips
    # cannot meet without interpolation
    with pytest.raises(ValueError, match=r"multiples of 4 \(the VAE's factor 2 x the UNet's 2\), "
                                         r"got 30x32; the nearest are 28 or 32 x 32"):
        pipe(**kw, height=30, width=32)
    with pytest.raises(ValueError, match="multiples of 4"):
        refiner(**kw, image=np.zeros((1, 30, 30, 3), np.float32))
    with pytest.raises(ValueError, match="needs pooled_prompt_embeds"):
        pipe(prompt_embeds=np.zeros((1, 16, 24), np.float32), num_inference_steps=4)
    # the refiner's UNet takes 5 time ids: as a base it would get 6
    bad = StableDiffusionXLPipeline(**{k: getattr(refiner, k) for k in refiner.COMPONENTS},
                                    requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="added embedding takes 56 features"):
        bad(**kw)
    broken = tmp_path / "no_te2"
    shutil.copytree(folder / "base", broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="needs 'text_encoder_2'"):
        conversion.load_pipeline(broken)


def _mode_latents(monkeypatch, module):
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample": out.latent_dist.mode())


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_sdxl_img2img_and_inpaint_match_diffusers(xl, name, monkeypatch):
    """The base folder as StableDiffusionXLImg2ImgPipeline (strength 0.6) and
    StableDiffusionXLInpaintPipeline (latent blending, strength 0.9999 and 1)."""
    import diffusers
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_img2img as img_mod,
        pipeline_stable_diffusion_xl_inpaint as inp_mod)

    ref, _, pipe, _, _ = xl
    _mode_latents(monkeypatch, img_mod)
    _mode_latents(monkeypatch, inp_mod)
    rng = np.random.default_rng(7)
    image = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    mask = np.zeros((2, 32, 32, 1), np.float32)
    mask[:, 6:22, 10:26] = 1.0
    cases = [(StableDiffusionXLImg2ImgPipeline, dict(strength=0.6), {}),
             (StableDiffusionXLInpaintPipeline, dict(strength=0.9999), dict(mask_image=mask)),
             (StableDiffusionXLInpaintPipeline, dict(strength=1.0), dict(mask_image=mask))]
    for cls, kw_s, extra in cases:
        sched = getattr(diffusers, name).from_config(ref.scheduler.config)
        other = cls(**{**ref.components, "scheduler": sched})
        cfg = {**dict(other.scheduler.config), "_class_name": name}
        kw = dict(prompt=["the cat", "a dog"], negative_prompt=["", "the cat"],
                  guidance_scale=5.0, num_inference_steps=8, **kw_s)
        with torch.no_grad():
            want = other(**kw, image=image, generator=torch.Generator().manual_seed(0),
                         output_type="latent", **extra).images
        noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
        got = pipe(**kw, image=image, latents=nhwc(noise.numpy()), output_type="latent",
                   solver=solvers.from_diffusers(cfg, 8), **extra)
        lat_err, err, inside = latents_and_images_error(ref, pipe, want, got)
        print(f"SDXL {cls.__name__} {name} {kw_s}: latents rel L2 {lat_err:.1e}, max abs "
              f"image difference {err:.2e} ({inside:.0%} unsaturated)")
        assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


def test_sdxl_every_picard_method_and_a_learned_schedule(xl, tmp_path):
    """ParaSolver and ParaTAA agree with sequential SDXL sampling; a schedule file applies
    to SDXL text-to-image and to image-to-image (a segment of the learned grid)."""
    from jaxdiff import schedule_files, time_grids
    from jaxdiff.schedules import NoiseScheduleVP

    _, _, pipe, _, _ = xl
    kw = dict(prompt=["the cat"], guidance_scale=5.0, num_inference_steps=6, solver="euler",
              output_type="latent", seed=5)
    seq = np.asarray(pipe(**kw))
    for method in ("parasolver", "taa"):
        par = np.asarray(pipe(**kw, sampler=Picard(parallel=3, tolerance=1e-6, method=method)))
        np.testing.assert_allclose(par, seq, atol=2e-3, rtol=1e-4)
    ac = solvers.alphas_cumprod(pipe.scheduler)
    ns = NoiseScheduleVP("discrete", alphas_cumprod=ac)
    t = time_grids.make_grid("karras", ns, 6)
    path = schedule_files.save_schedule(tmp_path / "xl.json", solver="dpmsolver++", t=t,
                                        alphas_cumprod=ac, options={"order": 2})
    kw = {**kw, "solver": "dpm++"}
    got = np.asarray(pipe(**kw, schedule=path))
    want = np.asarray(pipe(**{**kw, "solver": pipe.make_solver("dpm++", 6).with_schedule(path)}))
    np.testing.assert_array_equal(got, want)
    assert not np.allclose(got, np.asarray(pipe(**kw)))
    image = np.full((1, 32, 32, 3), 0.4, np.float32)
    part = np.asarray(pipe(**kw, schedule=path, image=image, strength=0.5))
    assert part.shape == seq.shape and np.all(np.isfinite(part))
