"""The conversion demo (`jaxdiff demo --conversion`): a full-size Stable Diffusion 1.5 UNet from a diffusers folder to jaxdiff.

1. builds (once) a diffusers-format SD 1.5 UNet folder with seeded random weights
   (no model hub is reachable here);
2. converts it to jaxdiff, timed; saves it as an orbax checkpoint and reloads it, timed;
3. runs one jitted forward pass at latents 32x32 (batch 2) and checks it against
   diffusers' PyTorch UNet on the same inputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def main(out_dir: str | Path = "outputs/demo") -> int:
    import jax
    from flax import nnx

    import conversion
    from conversion.testing import random_unet_folder

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    src = random_unet_folder(out_dir / "sd15_unet")
    print(f"[1/4] diffusers SD 1.5 UNet folder: {src} ({time.perf_counter() - t0:.1f} s)")

    t0 = time.perf_counter()
    unet = conversion.load_unet(src)
    jax.block_until_ready(nnx.state(unet))
    t_convert = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(unet)))
    print(f"[2/4] converted {n_params / 1e6:.1f}M parameters in {t_convert:.2f} s")

    t0 = time.perf_counter()
    conversion.save_model(unet, out_dir / "sd15_unet_jaxdiff", overwrite=True)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    unet = conversion.load_model(out_dir / "sd15_unet_jaxdiff")
    jax.block_until_ready(nnx.state(unet))
    t_load = time.perf_counter() - t0
    print(f"[3/4] orbax checkpoint: saved in {t_save:.2f} s, reloaded in {t_load:.2f} s")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 4), dtype=np.float32)
    t = np.array([999.0, 500.0], np.float32)
    ctx = rng.standard_normal((2, 77, 768), dtype=np.float32)
    graphdef, state = nnx.split(unet)
    fwd = jax.jit(lambda state, x, t, c: nnx.merge(graphdef, state)(x, t, c))
    t0 = time.perf_counter()
    y = np.asarray(fwd(state, x, t, ctx))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = np.asarray(fwd(state, x, t, ctx))
    t_jax = time.perf_counter() - t0
    del unet, state

    import torch
    from diffusers import UNet2DConditionModel

    ref_model = UNet2DConditionModel.from_pretrained(src).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        ref = ref_model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                        torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
        t_torch = time.perf_counter() - t0
    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    print(f"[4/4] forward, batch 2, latents 32x32: jaxdiff {t_jax:.2f} s (first call with "
          f"compilation {t_first:.1f} s), diffusers PyTorch {t_torch:.2f} s; relative L2 "
          f"difference {err:.1e}")
    ok = err <= 1e-4
    print("OK" if ok else "MISMATCH: jaxdiff and diffusers disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
