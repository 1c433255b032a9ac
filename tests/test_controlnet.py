"""ControlNet: the model against diffusers' ControlNetModel, the SD and SDXL ControlNet
pipelines against diffusers', several ControlNets, guess mode, and encoder propagation."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import conversion
from jaxdiff import solvers
from jaxdiff.sampling import EncoderPropagation, Picard
from tiny import (SD_PIPE_UNET, UNET_CONFIGS, latents_and_images_error, nchw, nhwc, rel_l2,
                  torch_controlnet, unet_inputs, write_tiny_pipeline, write_tiny_sdxl)

SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@pytest.mark.parametrize("variant", ["plain", "guess", "bgr", "pooled"])
def test_controlnet_model_matches_diffusers(name, variant):
    extra = {"bgr": dict(controlnet_conditioning_channel_order="bgr"),
             "pooled": dict(global_pool_conditions=True)}.get(variant, {})
    ref = torch_controlnet(UNET_CONFIGS[name], **extra)
    mine = conversion.convert(ref)
    x, t, ctx, kw = unet_inputs(UNET_CONFIGS[name], np.random.default_rng(0))
    cond = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    guess = variant == "guess"
    targs = {}
    if "added_cond" in kw:
        targs["added_cond_kwargs"] = {k: torch.from_numpy(v) for k, v in kw["added_cond"].items()}
    with torch.no_grad():
        out = ref(torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ctx),
                  torch.from_numpy(nchw(cond)), conditioning_scale=0.7, guess_mode=guess,
                  **targs)
    down, mid = mine(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(cond),
                     conditioning_scale=0.7, guess_mode=guess, added_cond=kw.get("added_cond"))
    want = list(out.down_block_res_samples) + [out.mid_block_res_sample]
    assert len(down) + 1 == len(want)
    for got, w in zip(list(down) + [mid], want):
        assert rel_l2(got, nhwc(w.numpy())) < 1e-5


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_controlnet")
    ref = write_tiny_pipeline(folder)
    cfg = {**SD_PIPE_UNET, "sample_size": 16}
    nets = [torch_controlnet(cfg, seed=s) for s in (1, 2)]
    for j, net in enumerate(nets):
        net.save_pretrained(folder / f"controlnet{j}")
    return ref, conversion.load_pipeline(folder), nets, [
        conversion.load_controlnet(folder / f"controlnet{j}") for j in range(2)]


def _controls(seed, n=2, size=32):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


# each scheduler with one ControlNet case (the schedulers themselves are checked one by one in
# test_pipeline_e2e.py; here what matters is that each case meets each solver family once)
@pytest.mark.parametrize("name,case", list(zip(SCHEDULERS, ["1 net", "guess", "2 nets"])))
def test_sd_controlnet_pipeline_matches_diffusers(sd, name, case):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers import MultiControlNetModel

    ref, pipe, nets, mine = sd
    import diffusers
    sched = getattr(diffusers, name).from_config(ref.scheduler.config)
    lat = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["", "the cat"], guidance_scale=6.0,
              num_inference_steps=8)
    ref_net, my_net, image, scale, guess = {
             "1 net": (nets[0], mine[0], _controls(0), 0.8, False),
             "guess": (nets[0], mine[0], _controls(0), 0.8, True),
             "2 nets": (MultiControlNetModel(nets), mine, [_controls(0), _controls(1)],
                        [0.8, 0.5], False)}[case]
    ctl = StableDiffusionControlNetPipeline(**{**ref.components, "scheduler": sched},
                                            controlnet=ref_net)
    cfg = {**dict(ctl.scheduler.config), "_class_name": name}
    t_image = ([torch.from_numpy(nchw(i)) for i in image] if isinstance(image, list)
               else torch.from_numpy(nchw(image)))
    with torch.no_grad():
        want = ctl(**kw, image=t_image, latents=lat, controlnet_conditioning_scale=scale,
                   guess_mode=guess, output_type="latent").images
    got = pipe(**kw, latents=nhwc(lat.numpy()), control_image=image, controlnet=my_net,
               controlnet_conditioning_scale=scale, guess_mode=guess, output_type="latent",
               solver=solvers.from_diffusers(cfg, 8))
    lat_err, err, inside = latents_and_images_error(ref, pipe, want, got)
    print(f"SD ControlNet {name} {case}: latents rel L2 {lat_err:.1e}, max abs image "
          f"difference {err:.2e} ({inside:.0%} unsaturated)")
    assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


@pytest.mark.parametrize("name,guess", [("DDIMScheduler", False),
                                        ("DPMSolverMultistepScheduler", True)])
def test_sdxl_controlnet_pipeline_matches_diffusers(tmp_path_factory, name, guess):
    from diffusers import StableDiffusionXLControlNetPipeline

    folder = tmp_path_factory.mktemp("sdxl_controlnet")
    base, _ = write_tiny_sdxl(folder)
    pipe = conversion.load_pipeline(folder / "base")
    net = torch_controlnet({**UNET_CONFIGS["sdxl"], "sample_size": 16}, seed=3)
    mine = conversion.convert(net)
    import diffusers
    sched = getattr(diffusers, name).from_config(base.scheduler.config)
    ctl = StableDiffusionXLControlNetPipeline(**{**base.components, "scheduler": sched},
                                              controlnet=net)
    cfg = {**dict(ctl.scheduler.config), "_class_name": name}
    lat = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    image = _controls(2)
    kw = dict(prompt=["the cat", "a dog"], negative_prompt=["", "the cat"],
              guidance_scale=5.0, num_inference_steps=8, controlnet_conditioning_scale=0.6,
              guess_mode=guess)
    with torch.no_grad():
        want = ctl(**kw, image=torch.from_numpy(nchw(image)), latents=lat,
                   output_type="latent").images
    got = pipe(**kw, control_image=image, controlnet=mine, latents=nhwc(lat.numpy()),
               output_type="latent", solver=solvers.from_diffusers(cfg, 8))
    lat_err, err, inside = latents_and_images_error(base, pipe, want, got)
    print(f"SDXL ControlNet {name} guess={guess}: latents rel L2 {lat_err:.1e}, max abs "
          f"image difference {err:.2e} ({inside:.0%} unsaturated)")
    assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2


def test_controlnet_under_picard_and_encoder_propagation(sd):
    _, pipe, _, mine = sd
    kw = dict(prompt=["the cat"], control_image=_controls(3, n=1), controlnet=mine[0],
              num_inference_steps=6, solver="euler", output_type="latent", seed=4)
    # (Euler: DDIM's x0 clipping turns float32 reordering of the batched window into ~5e-4
    # differences, with or without a ControlNet)
    seq = np.asarray(pipe(**kw))
    par = np.asarray(pipe(**kw, sampler=Picard(parallel=3, tolerance=1e-7)))
    np.testing.assert_allclose(par, seq, atol=1e-4)
    every = np.asarray(pipe(**kw, sampler=EncoderPropagation(key_steps=list(range(6)),
                                                             noise_injection=0.0)))
    np.testing.assert_allclose(every, seq, atol=1e-4)     # all steps key steps: exact
    fast = np.asarray(pipe(**kw, sampler=EncoderPropagation(key_steps=[0, 1, 3])))
    assert rel_l2(fast, seq) < 0.5 and not np.allclose(fast, seq)
    no_control = np.asarray(pipe(**{k: v for k, v in kw.items()
                                    if k not in ("control_image", "controlnet")}))
    assert rel_l2(no_control, seq) > 1e-3                 # the control matters


def test_controlnet_bad_inputs_named(sd):
    _, pipe, _, mine = sd
    kw = dict(prompt="the cat", num_inference_steps=4, solver="ddim", output_type="latent")
    with pytest.raises(ValueError, match="pass control_image="):
        pipe(**kw, controlnet=mine[0])
    with pytest.raises(ValueError, match="has no controlnet"):
        pipe(**kw, control_image=_controls(0, 1))
    with pytest.raises(ValueError, match="control_image 0 is 24x24 pixels"):
        pipe(**kw, controlnet=mine[0], control_image=_controls(0, 1, size=24))
    with pytest.raises(ValueError, match="2 ControlNets need as many control images"):
        pipe(**kw, controlnet=mine, control_image=[_controls(0, 1)])
    other = conversion.convert(torch_controlnet(UNET_CONFIGS["sd1"]))
    with pytest.raises(ValueError, match="does not fit the UNet: block_out_channels"):
        pipe(**kw, controlnet=other, control_image=_controls(0, 1))
