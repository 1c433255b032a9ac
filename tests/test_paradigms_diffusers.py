"""ParaDiGMS against diffusers' StableDiffusionParadigmsPipeline on the tiny random SD folder.

Both sides get the same x_T and the same per-step noise: with ``latents=`` given, diffusers'
generator draws only the noise, one ``randn(latents.shape)`` per step (NCHW, later scaled by
each step's std), so a fresh generator with the same seed reproduces the draws for jaxdiff
(transposed to NHWC). Float32, classifier-free guidance 7.5, output_type="latent". Each case
checks that the Picard loops took the same path (same iteration count and the same window
start at every iteration), that the loop really ran in parallel (fewer iterations than
steps), and that the final latents agree to relative L2 1e-4.

The diffusers iteration path is recorded by wrapping ``scheduler.batch_step_no_noise``,
which the pipeline calls exactly once per Picard iteration with the window's timesteps.
(The pipeline's ``callback`` cannot be used: it indexes ``block_t[begin_idx]``, a
[window, batch] tensor, with the absolute step index, and raises IndexError as soon as the
window start passes the window length.)

Scheduler configs are chosen where diffusers' parallel schedulers agree with their sequential
schedulers, which jaxdiff follows:

* DDIMParallelScheduler with ``set_alpha_to_one=True``: its ``batch_step_no_noise`` uses
  alpha_prev = 1 at the last step whatever ``set_alpha_to_one`` says (the sequential DDIM
  uses ``alphas_cumprod[0]`` when it is False). Both use prev_t = t - T // n, which matches
  the sequential step only for "leading" spacing (the tiny config's; its steps_offset=1 is
  fine since the last step's prev_t < 0 takes alpha_prev = 1 on both sides).
* DDIM also with ``clip_sample=False`` (as SD's shipped scheduler configs). With x0
  clipping on and this untrained UNet, x0 is clipped almost everywhere and the DDIM step
  becomes x_{k+1} ~ sqrt(abar_prev) clip(x0) + sqrt(1 - abar_prev) eps(x_k): the drift
  x_{k+1} - x_k has Jacobian about -I + d eps/dx instead of about 0, so Picard iterations
  do not contract (the error ratios grow every iteration; both implementations then accept
  one step per iteration, iterations == steps) and the trajectory amplifies float32
  rounding (even sequential diffusers vs sequential jaxdiff differ by 2.6e-2 relative at 20
  steps), so no 1e-4 comparison is possible. DDPM keeps its default clipping: its posterior
  mean c0 clip(x0) + c1 x_k has c1 close to 1 and stays contracting.

The grid crosses scheduler, window size and batch so that each scheduler sees both window
sizes and both batch sizes with four jit compilations in all (tolerance is a traced
argument, so both tolerances share a compilation).
"""

import numpy as np
import pytest
import torch

import conversion
from jaxdiff import solvers
from jaxdiff.sampling import Picard
from tiny import nhwc, rel_l2, write_tiny_pipeline

STEPS = 20
SCHEDULERS = {  # diffusers parallel scheduler -> (jaxdiff's sequential class, config overrides)
    "DDPMParallelScheduler": ("DDPMScheduler", {}),
    "DDIMParallelScheduler": ("DDIMScheduler", {"set_alpha_to_one": True, "clip_sample": False}),
}
PROMPTS = {1: dict(prompt=["the cat"]),
           2: dict(prompt=["the cat", "a dog"], negative_prompt=["a dog", ""])}
CASES = [(name, parallel, batch, tol)
         for name, parallel, batch in [("DDPMParallelScheduler", 4, 1),
                                       ("DDPMParallelScheduler", 10, 2),
                                       ("DDIMParallelScheduler", 4, 2),
                                       ("DDIMParallelScheduler", 10, 1)]
         for tol in (0.1, 0.5)]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_paradigms")
    ref = write_tiny_pipeline(folder)
    parts = {k: getattr(ref, k) for k in ("vae", "text_encoder", "tokenizer", "unet")}
    # One torch thread: on a shared 2-core machine, torch's spinning intra-op threads slow
    # these tiny forward passes down by 10-40x whenever a core is busy elsewhere.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield parts, ref.scheduler.config, conversion.load_pipeline(folder)
    torch.set_num_threads(threads)


def _diffusers(parts, base_config, name, prompts, latents, *, parallel, tolerance, seed):
    """diffusers' ParaDiGMS -> (final latents NCHW, window start of every iteration)."""
    import diffusers

    sched = getattr(diffusers, name).from_config(base_config, **SCHEDULERS[name][1])
    pipe = diffusers.StableDiffusionParadigmsPipeline(
        **parts, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    begins = []
    step = sched.batch_step_no_noise

    def recorded(model_output, timesteps, sample, **kw):
        begins.append(int((sched.timesteps == timesteps[0]).nonzero()[0, 0]))
        return step(model_output, timesteps, sample, **kw)

    sched.batch_step_no_noise = recorded
    with torch.no_grad():
        out = pipe(**prompts, num_inference_steps=STEPS, parallel=parallel, tolerance=tolerance,
                   guidance_scale=7.5, latents=latents, output_type="latent",
                   generator=torch.Generator().manual_seed(seed)).images
    return out.numpy(), np.array(begins), sched.config


@pytest.mark.parametrize("name,parallel,batch,tolerance", CASES)
def test_matches_diffusers_paradigms(pipes, name, parallel, batch, tolerance):
    parts, base_config, pipe = pipes
    prompts = PROMPTS[batch]
    latents = torch.randn((batch, 4, 16, 16), generator=torch.Generator().manual_seed(batch))
    seed = 100 + batch
    want, want_begins, config = _diffusers(parts, base_config, name, prompts, latents,
                                           parallel=parallel, tolerance=tolerance, seed=seed)
    # the same draws diffusers' generator made for the per-step noise (std 1; scaled by both)
    g = torch.Generator().manual_seed(seed)
    noise = np.stack([nhwc(torch.randn(latents.shape, generator=g).numpy())
                      for _ in range(STEPS)])
    solver = solvers.from_diffusers({**dict(config), "_class_name": SCHEDULERS[name][0]}, STEPS)
    got, stats = pipe.generate(**prompts, num_inference_steps=STEPS, guidance_scale=7.5,
                               solver=solver, latents=nhwc(latents.numpy()), noise=noise,
                               sampler=Picard(parallel=parallel, tolerance=tolerance),
                               output_type="latent")
    err = rel_l2(got, nhwc(want))
    print(f"{name} parallel={parallel} batch={batch} tolerance={tolerance}: iterations "
          f"jaxdiff {stats.iterations}, diffusers {len(want_begins)} of {STEPS} steps; "
          f"relative L2 {err:.1e}")
    assert stats.iterations == len(want_begins)
    np.testing.assert_array_equal(stats.begins, want_begins)
    assert stats.iterations < STEPS            # the window really advanced by several steps
    assert np.asarray(got).shape == (batch, 16, 16, 4)
    assert err <= 1e-4
