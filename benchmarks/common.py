"""Shared benchmark helpers: reference model folders with fixed random weights, timing."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".work"          # large generated artefacts (git-ignored)
RESULTS = ROOT / "RESULTS.md"

# diffusers' config of runwayml/stable-diffusion-v1-5 unet/config.json (values only).
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}


def make_sd15_unet_folder(path: Path | None = None, seed: int = 0) -> Path:
    """A diffusers-format SD 1.5 UNet folder (config.json + 3.4 GB float32 safetensors)
    with fixed random weights; created once and reused."""
    path = Path(path or WORK / "sd15_unet")
    if (path / "diffusion_pytorch_model.safetensors").exists():
        return path
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**SD15_UNET_CONFIG)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, max_shard_size="100GB")
    return path


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times
