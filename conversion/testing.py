"""Reference models with fixed random weights (needs the torch extra).

No model hub is reachable from our machines, so demos, tests and benchmarks build
diffusers-format folders of the real architectures with seeded random weights.
"""

from __future__ import annotations

from pathlib import Path

# Values of runwayml/stable-diffusion-v1-5's unet/config.json.
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


def random_unet_folder(path, config: dict = SD15_UNET_CONFIG, seed: int = 0) -> Path:
    """A diffusers-format UNet folder (config.json + float32 safetensors) with seeded random
    weights; created once and reused."""
    path = Path(path)
    if (path / "diffusion_pytorch_model.safetensors").exists():
        return path
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        raise ImportError("building a reference diffusers model needs the torch extra: "
                          "pip install 'jaxdiff[torch]'") from e
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
    for f in tmp.iterdir():
        f.rename(path / f.name)
    tmp.rmdir()
    return path
