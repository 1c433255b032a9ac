"""AutoencoderTiny (TAESD) against diffusers, and as a pipeline's VAE."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import conversion
from tiny import latents_and_images_error, nchw, nhwc, rel_l2, write_tiny_pipeline

# (diffusers' TAESD blocks keep one width throughout, as the released 64-wide model)
TINY = dict(encoder_block_out_channels=(12, 12, 12), decoder_block_out_channels=(12, 12, 12),
            num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(1, 2, 1), latent_channels=4)


def _torch_taesd(seed=0, **kw):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(**{**TINY, **kw}).eval()


def test_taesd_matches_diffusers(tmp_path):
    ref = _torch_taesd()
    ref.save_pretrained(tmp_path / "taesd")
    mine = conversion.load_tiny_vae(tmp_path / "taesd")
    rng = np.random.default_rng(0)
    img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32) * 2
    with torch.no_grad():
        want_z = nhwc(ref.encode(torch.from_numpy(nchw(img))).latents.numpy())
        want_x = nhwc(ref.decode(torch.from_numpy(nchw(z))).sample.numpy())
    assert rel_l2(mine.encode(jnp.asarray(img)).mean, want_z) <= 1e-4
    assert rel_l2(mine.decode(jnp.asarray(z)), want_x) <= 1e-4
    assert mine.config.downsample_factor == 4


def test_pipeline_with_taesd_matches_diffusers(tmp_path):
    """The tiny SD pipeline with its VAE swapped for TAESD (factor 2 to fit the tiny UNet),
    against diffusers with the same swap."""
    from diffusers import EulerDiscreteScheduler

    ref = write_tiny_pipeline(tmp_path / "sd")
    pipe = conversion.load_pipeline(tmp_path / "sd")
    taesd = _torch_taesd(seed=1, encoder_block_out_channels=(8, 8),
                         decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 2),
                         num_decoder_blocks=(2, 1))
    ref.vae = taesd
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    pipe.vae = conversion.convert(taesd)
    pipe._jitted.clear()
    lat = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(prompt=["the cat"], guidance_scale=4.0, num_inference_steps=6)
    with torch.no_grad():
        want = ref(**kw, latents=lat, output_type="latent").images
    from jaxdiff import solvers
    cfg = {**dict(ref.scheduler.config), "_class_name": "EulerDiscreteScheduler"}
    got = pipe(**kw, latents=nhwc(lat.numpy()), solver=solvers.from_diffusers(cfg, 6),
               output_type="latent")
    lat_err, err, inside = latents_and_images_error(ref, pipe, want, got)
    print(f"pipeline with TAESD: latents rel L2 {lat_err:.1e}, max abs image difference "
          f"{err:.2e} ({inside:.0%} unsaturated)")
    assert lat_err <= 5e-4 and err <= 2e-3 and inside > 0.2
    with pytest.raises(ValueError, match="unsupported upsample_fn"):
        from jaxdiff.models import TinyAutoencoderConfig
        TinyAutoencoderConfig(upsample_fn="bilinear")
